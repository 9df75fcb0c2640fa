"""DPO over the fine-tuning API (``method: {type: "dpo"}``): the request, the run it makes, what the job shows,
and which training files a DPO (or supervised) job takes, with the official `openai` client where a client sees it.

Tests that need the data step's preference formats are skipped until ``pipeline/data/formats.py`` has them; the
end-to-end DPO job waits for the trainer's ``train.objective: dpo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import yaml

from loratui.pipeline.config import load_config
from loratui.pipeline.data.formats import FORMAT_FIELDS
from loratui.serving.errors import ApiError
from loratui.serving.finetune import JobManager, JobSettings
from loratui.serving.finetune.files import check_objective
from tests.serving.finetune.test_api import QUICKSTART, TEMPLATE, _chat_jsonl, _start, _wait

needs_preference = pytest.mark.skipif(
    "openai_preference" not in FORMAT_FIELDS or "preference" not in FORMAT_FIELDS,
    reason="needs the data step's preference formats (pipeline/data/formats.py)",
)
needs_unpaired = pytest.mark.skipif(
    "unpaired_preference" not in FORMAT_FIELDS, reason="needs the data step's unpaired_preference format"
)
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "learning_rate_multiplier": 0.5}}}


def _pairs(rows: int = 24) -> list[tuple[str, str, str]]:
    """(question, the bundled concise answer, a worse answer) from the quickstart set."""
    lines = [json.loads(line) for line in QUICKSTART.read_text().splitlines()[:rows]]
    return [
        (r["question"], r["answer"], f"I am not sure, maybe ask someone else about {r['question']!r}.") for r in lines
    ]


def _openai_preference(rows: int = 24) -> bytes:
    """OpenAI's preference JSONL (the DPO upload format)."""
    return "".join(
        json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": q}]},
                "preferred_output": [{"role": "assistant", "content": good}],
                "non_preferred_output": [{"role": "assistant", "content": bad}],
            }
        )
        + "\n"
        for q, good, bad in _pairs(rows)
    ).encode()


def _prompt_chosen_rejected(rows: int = 24) -> bytes:
    return "".join(
        json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n" for q, good, bad in _pairs(rows)
    ).encode()


def _unpaired(rows: int = 24) -> bytes:
    return "".join(
        json.dumps({"prompt": q, "completion": good, "label": True})
        + "\n"
        + json.dumps({"prompt": q, "completion": bad, "label": False})
        + "\n"
        for q, good, bad in _pairs(rows // 2)
    ).encode()


# ---------------------------------------------------------------- which files a job's objective takes


@pytest.mark.parametrize(
    ("objective", "fmt", "refused"),
    [
        ("dpo", "openai_preference", None),
        ("dpo", "preference", None),
        ("dpo", "chat", "a dpo job trains on preference pairs, and this file has rows with one reply each"),
        ("dpo", "alpaca", "a dpo job trains on preference pairs"),
        ("dpo", "unpaired_preference", "a dpo job trains on preference pairs, and this file has one reply per row"),
        ("orpo", "qa", "an orpo job trains on preference pairs"),
        ("sft", "chat", None),
        ("sft", "preference", None),  # a supervised job learns the chosen replies
        ("sft", "openai_preference", None),
        ("sft", "unpaired_preference", "a supervised job would learn every reply of this file, those labelled bad"),
        ("kto", "unpaired_preference", None),
        ("kto", "preference", None),
        ("kto", "chat", "a kto job trains on replies labelled good or bad"),
    ],
)
def test_the_objective_says_which_rows_a_job_trains_on(objective, fmt, refused):
    info = {"format": fmt, "reason": "24 of 24 sampled rows have ..."}
    if refused is None:
        check_objective("up.jsonl", objective, info)
        return
    with pytest.raises(ApiError) as e:
        check_objective("up.jsonl", objective, info)
    assert e.value.message.startswith(f"up.jsonl: {refused}") and f"format {fmt} (24 of 24" in e.value.message
    assert (e.value.status, e.value.param, e.value.code) == (400, "file", "invalid_file")


# ---------------------------------------------------------------- the manager, without workers


def _manager(tmp_path: Path, *overrides: str) -> tuple[JobManager, JobSettings]:
    template = load_config(None, [*TEMPLATE, *overrides]).model_dump(mode="json")
    settings = JobSettings(
        root=tmp_path / "jobs", runs_dir=tmp_path / "runs", template=template, served_bases={"tiny": "tiny-base"}
    )
    return JobManager(settings, log=lambda m: None), settings


def _upload(jobs: JobManager, tmp_path: Path, name: str, content: bytes) -> dict:
    upload = tmp_path / name
    upload.write_bytes(content)
    return jobs.files.add(upload, name, "fine-tune", jobs.settings.template)


def _settled(jobs: JobManager, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (job := jobs.get(job_id))["status"] == "validating_files":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_a_dpo_job_on_chat_rows_fails_validation_and_shows_its_method(tmp_path):
    """The run config and the job object of a DPO job; its chat-rows training file is refused when validated."""
    jobs, settings = _manager(tmp_path, "train.lr=1e-3")
    f = _upload(jobs, tmp_path, "chat.jsonl", _chat_jsonl(8))
    created = jobs.create({"model": "tiny", "training_file": f["id"], "method": DPO})
    asked = {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
    assert created["method"] == {"type": "dpo", "dpo": {"hyperparameters": {**asked, "beta": 0.25}}}
    assert created["hyperparameters"] == asked
    config = yaml.safe_load((settings.root / "jobs" / created["id"] / "config.yaml").read_text())
    assert (config["train"]["objective"], config["train"]["beta"], config["train"]["epochs"]) == ("dpo", 0.25, 2)
    assert config["train"]["lr"] == pytest.approx(5e-4)

    failed = _settled(jobs, created["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_file"
    assert failed["error"]["param"] == "training_file"
    assert failed["error"]["message"].startswith(
        "chat.jsonl: a dpo job trains on preference pairs, and this file has rows with one reply each, not a "
        "chosen and a rejected reply: format chat"
    )
    assert "input.messages, preferred_output, non_preferred_output" in failed["error"]["message"]
    assert failed["method"]["type"] == "dpo" and failed["method"]["dpo"]["hyperparameters"]["beta"] == 0.25

    auto = jobs.create({"model": "tiny", "training_file": f["id"], "method": {"type": "dpo"}})
    assert auto["method"]["dpo"]["hyperparameters"]["beta"] == "auto"  # as asked, while its files are checked
    assert _settled(jobs, auto["id"])["method"]["dpo"]["hyperparameters"]["beta"] == 0.1  # the schema's default

    supervised = jobs.create({"model": "tiny", "training_file": f["id"]})  # chat rows: a supervised job is fine
    assert supervised["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": supervised["hyperparameters"]},
    }
    assert _settled(jobs, supervised["id"])["status"] == "queued"
    config = yaml.safe_load((settings.root / "jobs" / supervised["id"] / "config.yaml").read_text())
    assert config["train"]["objective"] == "sft"
    jobs.cancel(supervised["id"])


@needs_preference
def test_preference_uploads_validate_and_go_to_the_jobs_that_train_on_them(tmp_path):
    jobs, settings = _manager(tmp_path)
    for name, content, fmt in (
        ("openai.jsonl", _openai_preference(), "openai_preference"),
        ("pairs.jsonl", _prompt_chosen_rejected(), "preference"),
    ):
        f = _upload(jobs, tmp_path, name, content)
        assert f["status_details"].startswith("24 examples") and f"format {fmt}" in f["status_details"]
        for method in (DPO, {"type": "supervised"}):  # a supervised job learns the chosen replies
            job = jobs.create({"model": "tiny", "training_file": f["id"], "validation_file": f["id"], "method": method})
            assert _settled(jobs, job["id"])["status"] == "queued", job
            jobs.cancel(job["id"])


@needs_unpaired
def test_unpaired_preference_rows_go_to_neither_a_dpo_nor_a_supervised_job(tmp_path):
    jobs, _settings = _manager(tmp_path)
    f = _upload(jobs, tmp_path, "thumbs.jsonl", _unpaired())
    assert "format unpaired_preference" in f["status_details"]
    for method, expected in (
        (DPO, "thumbs.jsonl: a dpo job trains on preference pairs, and this file has one reply per row"),
        ({"type": "supervised"}, "thumbs.jsonl: a supervised job would learn every reply of this file"),
    ):
        job = _settled(jobs, jobs.create({"model": "tiny", "training_file": f["id"], "method": method})["id"])
        assert job["status"] == "failed" and job["error"]["message"].startswith(expected)


# ---------------------------------------------------------------- the official client


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory(tokenizer="smollm2")


def test_the_client_creates_a_dpo_job_and_gets_400s_for_a_bad_method(tmp_path, tiny):
    srv, settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        f = client.files.create(file=("chat.jsonl", _chat_jsonl(8)), purpose="fine-tune")
        for method, match, param in [
            ({"type": "reinforcement"}, "method.type: 'reinforcement' is not supported (loratui fine-tunes with "
             "'supervised' or 'dpo')", "method.type"),
            ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
             "method.dpo.hyperparameters.beta: expected 'auto' or a positive number, got 0",
             "method.dpo.hyperparameters.beta"),
            ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "strong"}}},
             "method.dpo.hyperparameters.beta: expected 'auto' or a positive number, got 'strong'",
             "method.dpo.hyperparameters.beta"),
            ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}},
             "method.dpo.hyperparameters.gamma: unknown", "method.dpo.hyperparameters.gamma"),
        ]:  # fmt: skip
            with pytest.raises(openai.BadRequestError) as e:
                client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=method)
            assert e.value.body["message"].startswith(match) and e.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="loratui.train.objective: set by method.type"):
            client.fine_tuning.jobs.create(
                model="tiny", training_file=f.id, extra_body={"loratui": {"train": {"objective": "dpo"}}}
            )
        assert client.fine_tuning.jobs.list().data == []

        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=f.id, method=DPO, suffix="tone", extra_body={"loratui": {"lora": {"r": 4}}}
        )
        assert job.method.type == "dpo" and job.method.supervised is None
        shown = job.method.dpo.hyperparameters
        assert (shown.beta, shown.n_epochs, shown.learning_rate_multiplier, shown.batch_size) == (0.25, 2, 0.5, "auto")
        config = yaml.safe_load((settings.root / "jobs" / job.id / "config.yaml").read_text())
        assert (config["train"]["objective"], config["train"]["beta"], config["lora"]["r"]) == ("dpo", 0.25, 4)
        # chat rows are no preference data: the job fails, saying so
        failed = _wait(client, job.id, lambda j: j.status != "validating_files", timeout=30)
        assert failed.status == "failed" and failed.error.code == "invalid_training_file"
        assert "a dpo job trains on preference pairs" in failed.error.message and "format chat" in failed.error.message
        assert failed.method.dpo.hyperparameters.beta == 0.25
    finally:
        srv.stop()


def _malformed_preference() -> bytes:
    good = {
        "input": {"messages": [{"role": "user", "content": "When does the library open?"}]},
        "preferred_output": [{"role": "assistant", "content": "At 9 am."}],
        "non_preferred_output": [{"role": "assistant", "content": "Whenever."}],
    }
    same = {**good, "non_preferred_output": good["preferred_output"]}
    user_reply = {**good, "preferred_output": [{"role": "user", "content": "At 9 am."}]}
    no_rejected = {k: v for k, v in good.items() if k != "non_preferred_output"}
    rows = [json.dumps(good), json.dumps(same), '{"input": {"messages": [', json.dumps(user_reply), json.dumps(good)]
    rows.append(json.dumps(no_rejected))
    return ("\n".join(rows) + "\n").encode()


@needs_preference
def test_a_malformed_preference_file_is_refused_with_the_row_summary(tmp_path, tiny):
    srv, settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("prefs.jsonl", _malformed_preference()), purpose="fine-tune")
        message = e.value.body["message"]
        assert message.startswith("prefs.jsonl failed validation: 4 of 6 rows are unusable (")
        for kind in ("identical_replies 1", "invalid_json 1", "reply_not_assistant 1", "missing_field 1"):
            assert kind in message
        assert "format openai_preference" in message
        for row in (2, 3, 4, 6):
            assert f"row {row}" in message
        assert str(settings.root) not in message
        assert (e.value.body["param"], e.value.body["code"]) == ("file", "invalid_file")
        assert client.files.list().data == []
    finally:
        srv.stop()


def _run_config(tmp_path: Path, job) -> dict:
    return yaml.safe_load((tmp_path / "runs" / job.model_extra["loratui"]["run_dir"] / "config.yaml").read_text())


@needs_preference
def test_a_dpo_job_runs_from_a_preference_upload_to_chat(tmp_path, tiny):
    """The issue's acceptance: the official client uploads OpenAI's preference JSONL, creates a DPO job on the tiny
    model, the job succeeds with DPO's metrics, and its model answers."""
    srv, _settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        f = client.files.create(file=("prefs.jsonl", _openai_preference(24)), purpose="fine-tune")
        assert "format openai_preference" in f.status_details
        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=f.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}},
            suffix="tone",
            extra_body={"loratui": {"lora": {"r": 4}}},
        )
        done = _wait(client, job.id, lambda j: j.status == "succeeded")
        assert done.fine_tuned_model == f"ft:tiny:tone:{job.id.removeprefix('ftjob-')}"
        assert done.method.type == "dpo"
        assert done.method.dpo.hyperparameters.beta == 0.1 and done.method.dpo.hyperparameters.n_epochs == 1
        assert done.method.dpo.hyperparameters.batch_size == 16  # resolved: the effective batch it trained with
        assert _run_config(tmp_path, done)["train"]["objective"] == "dpo"
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        steps = [e.data for e in events if e.type == "metrics" and e.data and "step" in e.data]
        trained = [d for d in steps if "train_loss" in d]  # each logged step has DPO's figures
        assert trained and all("reward_accuracy" in d and "reward_margin" in d for d in trained)
        assert any("eval_reward_accuracy" in d and "valid_loss" in d for d in steps)  # and each evaluation

        chat = [{"role": "user", "content": "How long may visitors park at the library?"}]
        reply = client.chat.completions.create(model=done.fine_tuned_model, messages=chat, max_tokens=8, temperature=0)
        assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens > 0
    finally:
        srv.stop()


@needs_preference
@pytest.mark.slow  # two jobs, one after the other: about 2.5 minutes on 2 cores
def test_sft_then_dpo_on_the_sft_jobs_model(tmp_path, tiny):
    """The usual recipe over the API: a supervised job, then a DPO job whose ``model`` is the first job's ft: model
    (it trains a new adapter on those merged weights; DPO's reference is that SFT model)."""
    srv, _settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        chat = client.files.create(file=("support.jsonl", _chat_jsonl()), purpose="fine-tune")
        sft = _wait(
            client,
            client.fine_tuning.jobs.create(model="tiny", training_file=chat.id, suffix="sft").id,
            lambda j: j.status == "succeeded",
        )
        prefs = client.files.create(file=("prefs.jsonl", _prompt_chosen_rejected(24)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=sft.fine_tuned_model, training_file=prefs.id, method={"type": "dpo"}, suffix="dpo"
        )
        done = _wait(client, job.id, lambda j: j.status == "succeeded")
        assert done.method.dpo.hyperparameters.beta == 0.1
        config = _run_config(tmp_path, done)
        assert config["train"]["objective"] == "dpo"
        assert config["model"]["base"] == str(tmp_path / "runs" / sft.model_extra["loratui"]["run_dir"] / "merged")
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.model == done.fine_tuned_model
    finally:
        srv.stop()
