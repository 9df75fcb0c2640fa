"""``data.augment`` method ``paraphrase``: parsing, the filters, an OpenAI-compatible endpoint (a fake one on
loopback), a tiny random PyTorch model, and the embedded SmolLM2 on the quickstart data (real_model)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loratui.pipeline.config import AugmentSection, ConfigError, load_config
from loratui.pipeline.data import augment as aug
from loratui.pipeline.data import paraphrase as para
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data.cache import cache_key
from loratui.pipeline.data.formats import Example
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink, MemoryWriter
from loratui.pipeline.steps import run_step
from tests.pipeline.data.test_augment import _args as data_args
from tests.pipeline.data.test_augment import _write_jsonl
from tests.threaded_server import ThreadedServer, free_port

REPO = Path(__file__).resolve().parents[3]
KEY_ENV = "LORATUI_TEST_PARAPHRASE_KEY"

# training question -> (its reply, what the fake endpoint answers when asked to paraphrase it)
CANNED = {
    "What time does the first ferry to Tallinn leave in the morning?": (
        "At 7:30 from the west harbour.",
        'Sure! Here is a paraphrase:\n\n"When does the morning\'s first ferry to Tallinn depart?"',
    ),
    "Where is the ferry terminal in Turku?": ("Next to the castle.", ""),
    "Can I bring my bicycle on board?": ("Yes, for a fee of five euros.", "can I bring my bicycle on board"),
    "How many cabins does the night ferry to Stockholm have?": (
        "The night ferry to Stockholm has 120 cabins on four decks.",
        "The night ferry to Stockholm has 120 cabins.",
    ),
    "Is breakfast included in the cabin price?": ("No, it costs twelve euros.", "What is the capital of France?"),
    "What time does the last ferry to Helsinki leave in the evening?": (
        "At 23:00.",
        "Paraphrase: What time does the last ferry to Helsinki leave at night?",
    ),
    "Do pets need a passport to travel?": (
        "Yes, an EU pet passport.",
        "1. **Does my dog or cat need a passport for travelling?**",
    ),
}
HELD_OUT = "What time does the last ferry to Helsinki leave at night?"  # a test question


def _chat(body: dict) -> str:
    return body["messages"][-1]["content"]


class FakeEndpoint:
    """A tiny OpenAI-compatible server (FastAPI under uvicorn in a thread, on a free loopback port) answering
    each paraphrase request from ``answers``: the question found in the prompt -> its outputs, one per call."""

    def __init__(self, answers: dict[str, list[str]]):

        self.answers = {q: list(outs) for q, outs in answers.items()}
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> dict:
            return {
                "object": "list",
                "data": [{"id": "fake-rewriter", "object": "model", "created": 0, "owned_by": "t"}],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.calls.append(body)
                self.auth.append(request.headers.get("authorization"))
                if body["model"] != "fake-rewriter":
                    return JSONResponse({"error": {"message": f"no model {body['model']!r}"}}, status_code=404)
                question = next(q for q in self.answers if q in _chat(body))
                outs = self.answers[question]
                text = outs.pop(0) if len(outs) > 1 else outs[0]
            message = {"role": "assistant", "content": text}
            return {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        self.http = ThreadedServer(app, "/v1")
        self.url = self.http.url

    def stop(self) -> None:
        self.http.stop()


@pytest.fixture
def endpoint():
    server = FakeEndpoint({q: [out] for q, (_, out) in CANNED.items()})
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    train = [{"question": q, "answer": a} for q, (a, _) in CANNED.items()]
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", train),
        "test": _write_jsonl(tmp_path / "test.jsonl", [{"question": HELD_OUT, "answer": "At 23:00."}]),
        "validation": _write_jsonl(tmp_path / "val.jsonl", [{"question": "Is there wifi on board?", "answer": "Yes."}]),
    }
    return {"tmp": tmp_path, "model": tiny_model_factory(tokenizer="bpe"), "files": files}


def _args(env, name, *overrides):
    return data_args(env, name, "data.augment.methods=[paraphrase]", *overrides)


def _run(env, name, *overrides):
    cfg = load_config(None, _args(env, name, *overrides))
    mem = MemoryWriter()
    code, result, _ = run_step("data", data_step.run, cfg, writers=[mem])
    return code, mem, env["tmp"] / "runs" / name / "data"


def _train_users(data: Path) -> list[str]:
    from datasets import load_from_disk

    ds = load_from_disk(str(data / "processed" / "train"))
    return [[m["content"] for m in json.loads(msgs) if m["role"] == "user"][-1] for msgs in ds["messages"]]


# --------------------------------------------------------------------------------------------
# The endpoint, through the data step
# --------------------------------------------------------------------------------------------


def test_endpoint_outputs_are_parsed_filtered_and_counted(env, endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    code, mem, data = _run(
        env,
        "e",
        f"data.augment.paraphrase.endpoint={endpoint.url}",
        f"data.augment.paraphrase.api_key_env={KEY_ENV}",
        "data.augment.variations=1",
        "data.augment.paraphrase.tries=1",
    )
    assert code == 0, [e.message for e in mem.of_type("error")]
    report = json.loads((data / "report.json").read_text())["augment"]
    assert report["added"] == {"paraphrase": 2}
    assert report["dropped"] == {"empty": 1, "copy": 1, "answer": 1, "off": 1, "held-out": 1}
    assert report["held_out"][0]["matched"] == HELD_OUT
    assert report["examples"]["answer"][0]["variation"] == "The night ferry to Stockholm has 120 cabins."
    assert report["examples"]["off"][0]["variation"] == "What is the capital of France?"
    users = _train_users(data)
    assert sorted(set(users) - set(CANNED)) == [
        "Does my dog or cat need a passport for travelling?",
        "When does the morning's first ferry to Tallinn depart?",
    ]
    assert len(users) == len(CANNED) + 2
    assert HELD_OUT not in users
    # one request per training row, the key from the environment variable as the Bearer token
    assert len(endpoint.calls) == len(CANNED)
    assert set(endpoint.auth) == {"Bearer sk-test-123"}
    call = endpoint.calls[0]
    assert call["model"] == "fake-rewriter" and call["temperature"] == 0.9 and call["max_tokens"] == 48
    assert "Do not answer it" in _chat(call) and _chat(call).endswith("Rewritten:")
    # the drops show in the data report with examples
    md = (data / "report.md").read_text()
    assert "Dropped as answer (1)" in md and "Dropped as off (1)" in md
    assert any(p.task == "paraphrase" for p in mem.of_type("progress"))


def test_rows_whose_outputs_were_dropped_are_asked_again(env):
    rows = list(CANNED.items())[:2]
    # the first question: a copy, then a good paraphrase; the second: empty three times
    server = FakeEndpoint(
        {
            rows[0][0]: [
                "What time does the first ferry to Tallinn leave in the morning?",
                "When does Tallinn's first morning ferry leave?",
            ],
            rows[1][0]: [""],
        }
    )
    try:
        settings = AugmentSection(methods=["paraphrase"], variations=1, paraphrase={"endpoint": server.url, "tries": 3})
        train = [
            Example("t.jsonl", 1, messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, (a, _) in rows
        ]
        out, report = aug.augment(settings, {"train": train, "validation": [], "test": []})
    finally:
        server.stop()
    assert report.added == {"paraphrase": 1}
    assert report.dropped == {"copy": 1, "empty": 3}
    assert len(server.calls) == 5  # row 0: twice (kept on its second try), row 1: three times
    assert out[-1].messages[0]["content"] == "When does Tallinn's first morning ferry leave?"


def test_a_key_in_the_config_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.augment.paraphrase.api_key=sk-secret-value"])
    assert "api_key_env" in str(e.value) and "environment variable" in str(e.value)
    assert "sk-secret-value" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(
            None, ["data.augment.paraphrase.endpoint=http://x/v1", "data.augment.paraphrase.api_key_env=sk-abc.1"]
        )
    assert "NAME of an environment variable" in str(e.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.augment.paraphrase.prompt=Rewrite it.", "must hold {question}"),
        ("data.augment.paraphrase.endpoint=localhost:8000", "base URL of an OpenAI-compatible server"),
        ("data.augment.paraphrase.endpoint_model=gpt", "set endpoint too"),
        ("data.augment.paraphrase.temperature=3", "less than or equal to 2"),
        ("data.augment.paraphrase.tries=0", "greater than or equal to 1"),
        ("data.augment.paraphrase.min_similarity=1.5", "less than or equal to 1"),
    ],
)
def test_bad_paraphrase_settings_are_clear_config_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert words in str(e.value) and "data.augment.paraphrase" in str(e.value)


def test_an_unreachable_endpoint_is_a_clear_error(env):
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, mem, _ = _run(env, "u", f"data.augment.paraphrase.endpoint={url}", "data.augment.paraphrase.endpoint_model=m")
    errors = [e.message for e in mem.of_type("error")]
    assert code != 0 and errors
    assert f"cannot reach the endpoint {url}" in errors[0] and "Traceback" not in errors[0]


def test_a_missing_key_variable_or_model_is_a_clear_error(endpoint, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    ctx = aug.MethodContext()
    p = AugmentSection(paraphrase={"endpoint": endpoint.url, "api_key_env": KEY_ENV}).paraphrase
    with pytest.raises(LoratuiError, match=f"names the environment variable {KEY_ENV}, which is not set"):
        para.open_rewriter(p, ctx)
    p = AugmentSection(paraphrase={"endpoint": endpoint.url, "endpoint_model": "nope"}).paraphrase
    rewriter = para.open_rewriter(p, ctx)
    with pytest.raises(LoratuiError) as e:
        rewriter.generate(["Rewrite: Where is the ferry terminal in Turku?"], [1])
    assert f"{endpoint.url} answered HTTP 404" in e.value.message and "no model 'nope'" in e.value.message


def test_paraphrase_settings_and_rewriter_enter_the_cache_key(env):
    def key(*overrides):
        cfg = load_config(None, _args(env, "k", *overrides))
        return cache_key(cfg, {"train": [env["files"]["train"]], "validation": [], "test": []}, env["model"], "")

    base = key()
    assert key("data.augment.paraphrase.temperature=0.5") != base
    assert key("data.augment.paraphrase.endpoint=http://127.0.0.1:1/v1") != base
    assert key("data.augment.paraphrase.model=smollm2-135m-instruct") != base
    # template-only keys ignore the paraphrase settings
    template = ("data.augment.methods=[template]",)
    assert key(*template) == key(*template, "data.augment.paraphrase.temperature=0.5")
    assert aug.cache_settings(AugmentSection(methods=["paraphrase"]), "x")["versions"]["paraphrase"] == (
        para.PARAPHRASE_VERSION
    )


# --------------------------------------------------------------------------------------------
# Parsing and the filters
# --------------------------------------------------------------------------------------------

Q = "How many cabins does the night ferry to Stockholm have?"


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('Sure! Here is a paraphrase:\n\n"What is the number of cabins on the Stockholm night ferry?"', "What is the number of cabins on the Stockholm night ferry?"),
        ("Paraphrase: **How many cabins are there on the night boat to Stockholm?**", "How many cabins are there on the night boat to Stockholm?"),
        ("1. How many cabins has the overnight ferry to Stockholm?\n2. Something else?", "How many cabins has the overnight ferry to Stockholm?"),
        (f"Original: {Q}\nRewritten question: What is the cabin count of the Stockholm night ferry?", "What is the cabin count of the Stockholm night ferry?"),
        ('Let\'s reword it as "How many cabins are on the Stockholm night ferry?"', "How many cabins are on the Stockholm night ferry?"),
        ("<think>The user wants a rewording.</think>\n> What number of cabins does the Stockholm night ferry have?", "What number of cabins does the Stockholm night ferry have?"),
        ("Sure!", ""),
        ("", ""),
    ],
)  # fmt: skip
def test_outputs_are_parsed_robustly(raw, parsed):
    assert para.parse_paraphrase(raw, Q) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("What is the number of cabins on the night ferry to Stockholm?", None),
        ("Tell me how many cabins the Stockholm night ferry has.", None),  # a request still asks
        ("The night ferry to Stockholm has 120 cabins.", "answer"),  # not a question
        ("How many cabins? It has 120 cabins on four decks, I think?", "answer"),  # holds five words of the reply
        ("How many cabins does the night ferry to Helsinki have?", "off"),  # a name lost
        ("What is the capital of France?", "off"),
        ("", "empty"),
    ],
)
def test_filters(text, reason):
    assert para.verdict(Q, "It has 120 cabins on four decks.", text, 0.5) == reason


def test_similarity_is_the_share_of_content_words_kept():
    share, missing = para.similarity(
        "Can children under 6 travel for free to Mariehamn?", "Do kids below 6 travel free?"
    )
    # content words: children, 6, travel, free, mariehamn ("under" is a stopword) -> kept: 6, travel, free
    assert share == pytest.approx(3 / 5) and missing == ["mariehamn"]
    assert para.similarity("Which deck has the restaurant?", "On which deck is the restaurants area?") == (1.0, [])


# --------------------------------------------------------------------------------------------
# A tiny random PyTorch model: the plumbing
# --------------------------------------------------------------------------------------------


def test_a_tiny_torch_model_runs_seeded_and_its_garbage_is_filtered(tiny_model_factory):
    model = tiny_model_factory(tokenizer="smollm2")
    questions = [q for q in CANNED][:3]
    settings = AugmentSection(
        methods=["paraphrase"], variations=2, paraphrase={"model": str(model), "max_tokens": 8, "tries": 2}
    )
    mem = MemoryWriter()
    ctx = aug.MethodContext(events=EventSink("data", [mem]))
    train = [
        Example("t.jsonl", 1, messages=[{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}])
        for q in questions
    ]
    splits = {"train": train, "validation": [], "test": []}
    out, report = aug.augment(settings, splits, ctx)
    again, report2 = aug.augment(settings, splits, ctx)
    assert report.model_dump() == report2.model_dump()  # seeded: the same outputs, the same verdicts
    assert [e.messages for e in out] == [e.messages for e in again]
    outputs = sum(report.added.values()) + sum(report.dropped.values())
    assert len(questions) * 2 <= outputs <= len(questions) * 2 * 2
    assert set(report.dropped) <= {"empty", "copy", "answer", "off", "held-out"}
    assert len(out) == len(train) + report.added["paraphrase"]
    progress = [p for p in mem.of_type("progress") if p.task == "paraphrase"]
    assert progress and progress[0].total == len(questions) * 2

    # cancellation is asked before each batch
    with pytest.raises(StepCancelled):
        aug.augment(settings, splits, aug.MethodContext(should_stop=lambda: True))


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2 on the quickstart data
# --------------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow  # about 32 llama.cpp generations: over a minute on 2 shared cores
def test_smollm2_paraphrases_quickstart_questions_offline(tmp_path, monkeypatch):
    """The data step with ``methods: [paraphrase]`` and the embedded SmolLM2 (in llama.cpp) on a slice of the
    bundled quickstart training rows, against its own validation and test questions."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    quick = REPO / "loratui" / "data" / "quickstart"
    # 16 rows x 2 x up to 3 rounds: about 14% of SmolLM2's outputs pass here (AVX-512), and another CPU's
    # kernels sample other outputs, so enough of them that "some pass" does not hang on a few draws
    train = (quick / "train.jsonl").read_text().splitlines()[:16]
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(train) + "\n")
    cfg = load_config(
        REPO / "examples" / "quickstart.yaml",
        [
            f"runs_dir={tmp_path / 'runs'}",
            f"data.source={source}",
            f"data.val_source={quick / 'validation.jsonl'}",
            f"data.test_source={quick / 'test.jsonl'}",
            "data.augment.methods=[paraphrase]",
            "data.augment.variations=2",
            "data.augment.paraphrase.runtime=llama.cpp",
            "data.augment.paraphrase.tries=3",
        ],
    )
    mem = MemoryWriter()
    started = time.monotonic()
    code, _, _ = run_step("data", data_step.run, cfg, writers=[mem])
    assert code == 0, [e.message for e in mem.of_type("error")]
    data = tmp_path / "runs" / "quickstart" / "data"
    report = json.loads((data / "report.json").read_text())["augment"]
    added, dropped = report["added"]["paraphrase"], sum(report["dropped"].values())
    print(f"SmolLM2 paraphrases: {added} passed of {added + dropped} generated {report['dropped']} "
          f"in {time.monotonic() - started:.0f}s")  # fmt: skip
    assert added > 0
    held = {
        aug.normalize(json.loads(r)["question"])
        for f in ("validation", "test")
        for r in (quick / f"{f}.jsonl").read_text().splitlines()
    }
    assert not {aug.normalize(u) for u in _train_users(data)} & held
