"""``data.augment``: template variations of the training rows only, seeded, with the leakage filter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loratui.pipeline.config import AugmentSection, ConfigError, load_config
from loratui.pipeline.data import augment as aug
from loratui.pipeline.data import build as data_build
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data.cache import cache_key
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.steps import run_step

REPO = Path(__file__).resolve().parents[3]
QUESTIONS = [
    "What time does the first ferry to Tallinn leave in the morning?",
    "Where is the ferry terminal in Turku?",
    "How many cabins does the night ferry to Stockholm have?",
    "Can I bring my bicycle on board?",
    "Is there a discount for students with a valid card?",
    "What is the luggage allowance for foot passengers?",
    "How early should I arrive before departure?",
    "Do pets need a passport to travel?",
    "Which deck has the restaurant?",
    "How do I change the date of my booking online?",
    "What happens if the crossing is cancelled because of storms?",
    "Are there charging points for electric cars?",
    "Who should I contact about lost property?",
    "Is breakfast included in the cabin price?",
    "Can children under six travel for free?",
    "How long does the crossing to Mariehamn take?",
    "What is the speed limit in the car deck?",
    "Is there wifi on board during the trip?",
    "Where can I park my car overnight at the harbour?",
    "Explain the refund policy for group tickets.",
    "List the duty free allowances for alcohol.",
    "Describe the accessible cabins for wheelchair users.",
    "When does the summer timetable start?",
    "Why is the evening departure more expensive?",
]
# held-out questions: equal to training question 0 (with another answer), equal after normalization to 1,
# one word away from 2 (test); one word away from 3 (validation); and unrelated ones
TEST = [
    "What time does the first ferry to Tallinn leave in the morning?",
    "where is the ferry terminal in turku",
    "How many cabins does the night ferry to Helsinki have?",
    "Is smoking allowed on the open deck?",
]
VALIDATION = ["Can I bring my scooter on board?", "Do I need to print my ticket?"]
LEAKY = {0, 1, 2, 3}  # training rows that (nearly) equal a held-out question


def _qa(questions, tag="A"):
    return [{"question": q, "answer": f"{tag}{i}: see the timetable at the harbour."} for i, q in enumerate(questions)]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", _qa(QUESTIONS)),
        "test": _write_jsonl(tmp_path / "test.jsonl", _qa(TEST, "T")),
        "validation": _write_jsonl(tmp_path / "val.jsonl", _qa(VALIDATION, "V")),
    }
    return {"tmp": tmp_path, "model": tiny_model_factory(tokenizer="bpe"), "files": files}


def _args(env, name, *overrides):
    f = env["files"]
    return [
        f"runs_dir={env['tmp'] / 'runs'}",
        f"name={name}",
        f"model.base={env['model']}",
        f"data.source={f['train']}",
        f"data.test_source={f['test']}",
        f"data.val_source={f['validation']}",
        *overrides,
    ]


def _run(env, name="r", *overrides):
    cfg = load_config(None, _args(env, name, *overrides))
    mem = MemoryWriter()
    code, result, _ = run_step("data", data_step.run, cfg, writers=[mem])
    errors = mem.of_type("error")
    assert code == 0, errors[0].message if errors else code
    data = env["tmp"] / "runs" / name / "data"
    return result, json.loads((data / "report.json").read_text()), data, mem


def _rows(data: Path, split: str) -> list[tuple[list[dict], dict, str]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(data / "processed" / split))
    return [
        (json.loads(m), json.loads(meta) if meta else {}, src)
        for m, meta, src in zip(ds["messages"], ds["meta"], ds["source"])
    ]


def _user(messages: list[dict]) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def _containment(held: str, text: str) -> float:
    """The filter's measure, computed directly: the share of the held-out question's words and word pairs."""
    a, b = (aug.normalize(t).split() for t in (held, text))
    ga, gb = ({*w, *(" ".join(p) for p in zip(w, w[1:]))} for w in (a, b))
    return len(ga & gb) / len(ga)


def test_no_variation_equal_or_near_equal_to_a_held_out_question_survives(env):
    _, report, data, _ = _run(env, "r", "data.augment.variations=3", "data.augment.typo_rate=0.05")
    train = _rows(data, "train")
    variations = [(m, src) for m, meta, src in train if meta.get("augment") == "template"]
    assert len(variations) > 40, "the unrelated rows keep their variations"
    held = TEST + VALIDATION
    held_norm = {aug.normalize(q) for q in held}
    for messages, _ in variations:
        text = _user(messages)
        assert aug.normalize(text) not in held_norm, text
        assert max(_containment(q, text) for q in held) <= 0.7, text
    # the training rows that (nearly) equal a held-out question have no variation at all ...
    rows_varied = {int(src.rpartition(":")[2]) for _, src in variations}
    assert not rows_varied & {i + 1 for i in LEAKY}  # rows are 1-based lines
    assert rows_varied == {i + 1 for i in range(len(QUESTIONS))} - {i + 1 for i in LEAKY}
    # ... and every one dropped is listed with the question it matched
    a = report["augment"]
    listed = a["held_out"]
    assert len(listed) == a["dropped"]["held-out"] == 3 * len(LEAKY)
    matched = {(e["original"], e["matched"]) for e in listed}
    assert matched == {
        (QUESTIONS[0], TEST[0]),
        (QUESTIONS[1], TEST[1]),
        (QUESTIONS[2], TEST[2]),
        (QUESTIONS[3], VALIDATION[0]),
    }
    assert all(e["overlap"] > 0.7 for e in listed)
    md = (data / "report.md").read_text()
    assert "## Augmentation" in md and f"matched {TEST[2]!r}" in md


def test_only_training_rows_are_augmented_and_replies_are_kept(env):
    _, plain, plain_data, _ = _run(env, "plain")
    _, report, data, mem = _run(env, "aug", "data.augment.variations=2")
    for split in ("validation", "test"):
        assert _rows(data, split) == _rows(plain_data, split)
        assert report["splits"][split] == plain["splits"][split]
    train = _rows(data, "train")
    originals = {src: messages for messages, meta, src in train if "augment" not in meta}
    assert len(originals) == len(QUESTIONS) == plain["splits"]["train"]
    added = sum(report["augment"]["added"].values())
    assert report["splits"]["train"] == len(QUESTIONS) + added
    by_row: dict[str, list[str]] = {}
    for messages, meta, src in train:
        if "augment" not in meta:
            continue
        original = originals[src]
        assert messages[-1] == original[-1], "the reply is kept"
        assert [m["role"] for m in messages] == [m["role"] for m in original]
        assert _user(messages) != _user(original)
        by_row.setdefault(src, []).append(aug.normalize(_user(messages)))
    for src, texts in by_row.items():
        assert len(set(texts)) == len(texts) and aug.normalize(_user(originals[src])) not in texts
    assert any("Augmentation added" in e.message for e in mem.of_type("log"))
    assert mem.of_type("done")[0].summary["augmented"] == added


def test_variations_are_seeded_and_independent_of_the_hash_seed():
    settings = AugmentSection(variations=3, seed=5)
    first = [(c.row, c.text) for c in aug.template_variations(QUESTIONS, settings)]
    assert first == [(c.row, c.text) for c in aug.template_variations(QUESTIONS, settings)]
    other = [(c.row, c.text) for c in aug.template_variations(QUESTIONS, AugmentSection(variations=3, seed=6))]
    assert other != first
    # a row's variations depend on its text and the seed, not on where it is
    moved = [(c.row, c.text) for c in aug.template_variations(QUESTIONS[::-1], settings)]
    n = len(QUESTIONS)
    assert sorted((n - 1 - r, t) for r, t in moved) == sorted(first)
    code = (
        "import json; from loratui.pipeline.config import AugmentSection; from loratui.pipeline.data import augment; "
        f"print(json.dumps([c.text for c in augment.template_variations({QUESTIONS!r}, AugmentSection(variations=3, seed=5))]))"
    )
    outs = []
    for hash_seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        outs.append(
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        )
    assert outs[0] == outs[1] and json.loads(outs[0]) == [t for _, t in first]


def test_template_rewrites_keep_numbers_and_names():
    settings = AugmentSection(variations=5, typo_rate=0.2)
    question = "How long does the 10:30 crossing from Helsinki to Tallinn take with config_file v2.0?"
    for c in aug.template_variations([question], settings):
        for word in ("10:30", "Helsinki", "Tallinn", "config_file", "v2.0"):
            assert word in c.text, (word, c.text)
    assert aug.normalize("  What's   the PORT?? ") == "what s the port"


def test_held_out_index_finds_what_a_full_comparison_finds():
    rng = random.Random(3)
    words = "ferry ticket cabin deck port harbour time price summer winter car bike dog child student".split()
    frames = [
        "what is the {} of the {}",
        "how much is a {} for the {}",
        "where do i find the {} {}",
        "can a {} take the {}",
    ]
    held = [rng.choice(frames).format(rng.choice(words), rng.choice(words)) for _ in range(60)]
    index = aug.HeldOutIndex(held, 0.7)
    for _ in range(300):
        text = rng.choice(["", "please ", "quick question: "]) + rng.choice(frames).format(
            rng.choice(words), rng.choice(words)
        )
        best = max((_containment(q, text), q) for q in held)
        found = index.match(text)
        if best[0] > 0.7:
            assert found is not None and found[1] == pytest.approx(best[0]), text
        else:
            assert found is None, text


def test_augment_settings_enter_the_cache_key(env, monkeypatch):
    def key(*overrides):
        cfg = load_config(None, _args(env, "k", *overrides))
        return cache_key(cfg, {"train": [env["files"]["train"]], "validation": [], "test": []}, env["model"], "")

    off = key()
    assert key("data.augment=null") == off == key("data.augment.methods=[]")
    on = key("data.augment.variations=2")
    assert on != off and on == key("data.augment.variations=2")
    assert len({on, key("data.augment.variations=3"), key("data.augment.seed=1"), key("data.augment.typo_rate=0")}) == 4
    assert key("data.augment.max_overlap=0.5") != on
    # the same settings again: a cache hit, no build
    _run(env, "a", "data.augment.variations=2")

    def no_work(*args, **kwargs):
        raise AssertionError("the cache hit must not rebuild")

    monkeypatch.setattr(data_build, "build", no_work)
    second, _, _, _ = _run(env, "b", "data.augment.variations=2")
    assert second.summary["cache_hit"] is True


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.augment.methods=[paraphrse]", "unknown augmentation method 'paraphrse'; known: template, paraphrase"),
        ("data.augment.typo_rate=0.5", "less than or equal to 0.2"),
        ("data.augment.variations=0", "greater than or equal to 1"),
        ("data.augment=3", "expected a mapping such as {methods: [template], variations: 2}, or empty (off)"),
        ("data.augment.typo=0.1", "unknown field"),
    ],
)
def test_bad_settings_are_clear_config_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert words in str(e.value) and "data.augment" in str(e.value)


def test_preview_and_run_report_show_the_variations(env, capsys):
    from loratui.cli import main
    from loratui.pipeline.report import render_markdown
    from loratui.pipeline.runs import RunDir

    code = main(["data", "preview", "-n", "2", *_args(env, "p", "data.augment.variations=2")])
    out = capsys.readouterr().out
    assert code == 0
    assert "originals and their variations" in out and "Augmentation added" in out
    report = json.loads((env["tmp"] / "runs" / "p" / "data" / "report.json").read_text())
    first = report["augment"]["samples"][0]
    assert first["original"][:20] in out and first["variations"][0][:12] in out
    cfg = load_config(None, _args(env, "p", "data.augment.variations=2"))
    assert "Augmentation added" in render_markdown(cfg, RunDir.for_config(cfg))


def test_only_the_last_user_turn_of_chats_varies_and_other_rows_are_skipped():
    from loratui.pipeline.data.formats import Example

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the ferry terminal in Turku?"},
        {"role": "assistant", "content": "At the harbour."},
        {"role": "user", "content": "How early should I arrive before departure?"},
        {"role": "assistant", "content": "One hour before."},
    ]
    pair = [{"role": "user", "content": "Is breakfast included?"}, {"role": "assistant", "content": "Yes."}]
    train = [
        Example("c.jsonl", 1, messages=chat),
        Example("t.jsonl", 1, text="A plain text row to train on in full."),
        Example("p.jsonl", 1, messages=pair, rejected=[{"role": "assistant", "content": "No."}]),
    ]
    out, report = aug.augment(AugmentSection(variations=3), {"train": train, "validation": [], "test": []})
    assert out[:3] == train and report.rows == 1 and report.skipped == 2
    assert report.added == {"template": len(out) - 3} and len(out) - 3 + sum(report.dropped.values()) == 3
    for ex in out[3:]:
        assert ex.messages[:3] == chat[:3] and ex.messages[4] == chat[4]
        assert aug.normalize(ex.messages[3]["content"]) != aug.normalize(chat[3]["content"])
        assert ex.meta == {"augment": "template"} and (ex.file, ex.row) == ("c.jsonl", 1)
