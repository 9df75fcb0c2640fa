"""Fine-tuning over HTTP (files and fine-tuning jobs), driven with the official `openai` client on a tiny model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from loratui.pipeline.config import load_config
from loratui.serving.backends import GenRequest, TorchBackend
from loratui.serving.finetune import JobSettings
from loratui.serving.server import ServeOptions, prepare
from tests.serving.test_app import Server

QUICKSTART = Path(__file__).parents[3] / "loratui" / "data" / "quickstart" / "train.jsonl"
# Fast jobs: few eval rows, no base comparison, no export (the merged model is served on CPU then).
TEMPLATE = [
    "eval.max_samples=2",
    "eval.max_new_tokens=4",
    "eval.comparison_examples=1",
    "eval.compare_base=false",
    "train.lr=1e-2",
    "train.save_every=2",
    "export.formats=[]",
]
LONG = {"train": {"max_steps": 60, "save_every": 2}}  # long enough to be caught running


def _chat_jsonl(rows: int = 40) -> bytes:
    lines = [json.loads(line) for line in QUICKSTART.read_text().splitlines()[:rows]]
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        )
        + "\n"
        for r in lines
    ).encode()


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory(tokenizer="smollm2")


def _start(tmp: Path, model: Path, **limits) -> tuple[Server, JobSettings]:
    from loratui.serving.state import Limits

    template = load_config(None, TEMPLATE).model_dump(mode="json")
    settings = JobSettings(root=tmp / "jobs", runs_dir=tmp / "runs", template=template, grace_s=30)
    opts = ServeOptions(target=model, context_length=256, jobs=settings, model_id="tiny", limits=Limits(**limits))
    _state, app = prepare(opts, lambda m: None)
    srv = Server(app)
    assert srv.wait_ready()["status"] == "ok"
    return srv, settings


def _wait(client: openai.OpenAI, job_id: str, until, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        if job.status == "failed":
            raise AssertionError(f"the job failed: {job.error}")
        time.sleep(0.25)
    raise TimeoutError(f"{job_id}: still {job.status}")


def _messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)]  # every page


def test_a_job_runs_from_upload_to_chat_and_a_queued_job_cancels(tmp_path, tiny):
    srv, _settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        f = client.files.create(file=("support.jsonl", _chat_jsonl()), purpose="fine-tune")
        assert (f.status, f.purpose, f.filename) == ("processed", "fine-tune", "support.jsonl")
        assert "40 examples" in f.status_details and "chat" in f.status_details
        assert client.files.retrieve(f.id).bytes == len(_chat_jsonl())
        assert client.files.content(f.id).content == _chat_jsonl()

        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=f.id,
            hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 2},
            suffix="support",
            seed=7,
            metadata={"team": "search"},
            extra_body={"loratui": {"lora": {"r": 4}}},
        )
        assert job.status in ("validating_files", "queued", "running")
        assert (job.model, job.training_file, job.seed, job.metadata) == ("tiny", f.id, 7, {"team": "search"})
        second = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="later")
        _wait(client, second.id, lambda j: j.status == "queued")  # one job at a time: it waits
        cancelled = client.fine_tuning.jobs.cancel(second.id)
        assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
        with pytest.raises(openai.BadRequestError, match="already cancelled"):
            client.fine_tuning.jobs.cancel(second.id)

        done = _wait(client, job.id, lambda j: j.status == "succeeded")
        short = job.id.removeprefix("ftjob-")
        assert done.fine_tuned_model == f"ft:tiny:support:{short}"
        assert done.trained_tokens and done.trained_tokens > 0
        assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.learning_rate_multiplier == 2
        assert done.hyperparameters.batch_size == 16  # resolved: the effective batch it trained with
        assert done.finished_at >= done.created_at and done.error is None
        assert done.model_extra["loratui"]["run_dir"] == f"ft-{short}"  # a name, never a server path
        shown = json.dumps(done.model_dump()) + "\n".join(_messages(client, job.id))
        assert str(tmp_path) not in shown and "support.jsonl" in shown  # uploads by the client's name
        run = tmp_path / "runs" / done.model_extra["loratui"]["run_dir"]
        assert (run / "merged" / "config.json").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["r"] == 4  # the loratui extension field
        assert client.fine_tuning.jobs.retrieve(second.id).status == "cancelled"  # never started
        assert not (tmp_path / "runs" / f"ft-{second.id.removeprefix('ftjob-')}").exists()

        listed = client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in listed.data] == [second.id] and listed.has_more  # newest first, paginated
        assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]  # auto-pagination
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"}).data] == [job.id]

        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
        messages = [e.message for e in events]
        for expected in (
            "Validating training file",
            "Files validated",
            "Fine-tuning job started",
            "train done",
            "merge done",
            "New fine-tuned model created",
            "successfully completed",
        ):
            assert any(expected in m for m in messages), expected
        losses = [e for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
        assert losses and all(e.data["step"] >= 1 for e in losses)
        first_two = client.fine_tuning.jobs.list_events(job.id, limit=2)
        assert len(first_two.data) == 2 and first_two.has_more
        assert [e.id for e in first_two.data] == [e.id for e in events[:2]]
        assert client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[1].id).data[0].id == events[2].id

        [results] = done.result_files  # OpenAI's step metrics CSV
        assert client.files.retrieve(results).purpose == "fine-tune-results"
        csv = client.files.content(results).text.splitlines()
        assert csv[0] == "step,train_loss,valid_loss,learning_rate" and len(csv) - 1 == len(losses)
        assert float(csv[1].split(",")[1]) == pytest.approx(
            min(losses, key=lambda e: e.data["step"]).data["train_loss"], rel=1e-5
        )
        assert any(row.split(",")[2] for row in csv[1:])  # the validation loss at each evaluation

        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoints and checkpoints[0].step_number >= checkpoints[-1].step_number
        assert (
            checkpoints[0].fine_tuned_model_checkpoint
            == f"{done.fine_tuned_model}:ckpt-step-{checkpoints[0].step_number}"
        )
        assert checkpoints[0].metrics.train_loss is not None

        assert {m.id: m.created for m in client.models.list().data}[done.fine_tuned_model] == done.finished_at
        chat = [{"role": "user", "content": "How long may visitors park at the library?"}]
        reply = client.chat.completions.create(model=done.fine_tuned_model, messages=chat, max_tokens=8, temperature=0)
        assert reply.model == done.fine_tuned_model and reply.usage.prompt_tokens > 0
        merged = TorchBackend(run / "merged", "merged", 256)  # the same greedy answer: the merged model answered
        try:
            req = GenRequest(merged.chat_prompt(chat), 8, temperature=0.0)
            assert "".join(d.text for d in merged.stream(req)) == reply.choices[0].message.content
        finally:
            merged.close()
        ckpt = client.chat.completions.create(
            model=checkpoints[-1].fine_tuned_model_checkpoint, messages=chat, max_tokens=4, temperature=0
        )  # a checkpoint: base + its adapter
        assert ckpt.usage.prompt_tokens == reply.usage.prompt_tokens
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"ft:tiny:support:{'0' * 12}", messages=chat, max_tokens=4)

        third = client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
        with pytest.raises(openai.BadRequestError, match="used by the fine-tuning job"):
            client.files.delete(f.id)
        client.fine_tuning.jobs.cancel(third.id)
        assert client.files.delete(f.id).deleted
        assert f.id not in [x.id for x in client.files.list().data]
    finally:
        srv.stop()


def test_bad_files_and_requests_are_refused_with_what_is_wrong(tmp_path, tiny):
    srv, settings = _start(tmp_path, tiny, max_upload_bytes=64 << 10)
    client = srv.client()
    try:
        good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
        rows = [
            good,
            '{"messages": [{"role": "user", "content": "Hi"}',
            json.dumps({"prompt_text": "x"}),
            json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
            good,
        ]
        bad = ("\n".join(rows) + "\n").encode()
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        message = e.value.body["message"]
        assert "bad.jsonl failed validation: 3 of 5 rows are unusable" in message
        assert "invalid_json 1" in message and "row 2" in message and "row 4" in message
        assert str(settings.root) not in message  # the client's file name, never the server's path
        assert e.value.body["param"] == "file" and e.value.body["code"] == "invalid_file"

        with pytest.raises(openai.BadRequestError, match="unsupported file type .txt"):
            client.files.create(file=("notes.txt", b"hello"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="binary content"):
            client.files.create(file=("x.jsonl", b"\0\1\2" * 100), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="purpose: 'batch' is not supported"):
            client.files.create(file=("ok.jsonl", (good + "\n").encode()), purpose="batch")
        with pytest.raises(openai.APIStatusError, match="over this server's limit") as e:
            client.files.create(file=("big.jsonl", (good + "\n").encode() * 2000), purpose="fine-tune")
        assert e.value.status_code == 413
        assert client.files.list().data == [] and not list((settings.root / "files").glob("file-*"))

        f = client.files.create(file=("ok.jsonl", ((good + "\n") * 8).encode()), purpose="fine-tune")
        for kwargs, match in [
            ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs: expected 'auto' or a positive integer"),
            ({"hyperparameters": {"lr": 1}}, "hyperparameters.lr: unknown"),
            ({"suffix": "a:b"}, "suffix"),
            ({"extra_body": {"loratui": {"data": {"source": "/etc"}}}}, "loratui.data.source: not a setting"),
            ({"extra_body": {"loratui": {"model": {"trust_remote_code": True}}}}, "loratui.model.trust_remote_code"),
            ({"extra_body": {"loratui": {"lora": {"r": "big"}}}}, "lora.r"),
            ({"metadata": {"loratui.train.lr": "-1"}}, "train.lr"),
            ({"method": {"type": "reinforcement"}}, "method.type: 'reinforcement' is not supported"),
        ]:
            with pytest.raises(openai.BadRequestError, match=match):
                client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **kwargs)
        with pytest.raises(openai.BadRequestError, match="model: '/etc' is not a model this server fine-tunes"):
            client.fine_tuning.jobs.create(model="/etc", training_file=f.id)
        with pytest.raises(openai.BadRequestError, match="training_file: no uploaded file"):
            client.fine_tuning.jobs.create(model="tiny", training_file="file-" + "0" * 24)
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-000000000000")
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("../../etc")
        assert client.fine_tuning.jobs.list().data == []

        # the job's own data settings see what the upload could not: these chat rows are not alpaca rows
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=f.id, extra_body={"loratui": {"data": {"format": "alpaca"}}}
        )
        failed = client.fine_tuning.jobs.retrieve(job.id)
        deadline = time.monotonic() + 30
        while failed.status == "validating_files" and time.monotonic() < deadline:
            time.sleep(0.1)
            failed = client.fine_tuning.jobs.retrieve(job.id)
        assert failed.status == "failed" and failed.error.code == "invalid_training_file"
        assert "failed validation" in failed.error.message and failed.error.param == "training_file"
        with pytest.raises(openai.BadRequestError, match="files failed validation"):
            client.fine_tuning.jobs.resume(job.id)

        assert httpx.get(srv.url + "/metrics").text.count('route="/v1/files"') >= 2
    finally:
        srv.stop()


@pytest.mark.slow  # 30-40 s: runs in make test-slow (CI), keeping make test under 15 minutes
def test_cancel_keeps_the_checkpoint_and_resume_finishes_the_job(tmp_path, tiny):
    srv, _settings = _start(tmp_path, tiny)
    client = srv.client()
    try:
        f = client.files.create(file=("support.jsonl", _chat_jsonl()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=f.id, suffix="long", extra_body={"loratui": LONG}
        )
        _wait(client, job.id, lambda j: j.status == "running" and client.fine_tuning.jobs.checkpoints.list(j.id).data)
        stopped = client.fine_tuning.jobs.cancel(job.id)
        assert stopped.status == "cancelled"
        deadline = time.monotonic() + 60
        while not any("process stopped" in m for m in _messages(client, job.id)):
            assert time.monotonic() < deadline, "the job's process did not stop"
            time.sleep(0.2)
        kept = client.fine_tuning.jobs.retrieve(job.id).model_extra["loratui"]["resumable_checkpoint"]
        assert kept and Path(kept).name.startswith("checkpoint-")
        step = int(Path(kept).name.rpartition("-")[2])
        assert step < 60

        resumed = client.fine_tuning.jobs.resume(job.id)
        assert resumed.status == "queued" and resumed.error is None
        done = _wait(client, job.id, lambda j: j.status == "succeeded")
        assert done.fine_tuned_model == f"ft:tiny:long:{job.id.removeprefix('ftjob-')}"
        run = tmp_path / "runs" / done.model_extra["loratui"]["run_dir"]
        run_events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        last_stretch = [e for e in run_events if e["step"] == "train" and e["type"] == "done"][-1]["summary"]["tokens"]
        assert done.trained_tokens > last_stretch  # both stretches of training count
        logs = (run / "events.jsonl").read_text()
        assert f"checkpoint-{step}" in logs and "resum" in logs  # training went on from the kept checkpoint
        assert any("Fine-tuning job resumed" in m for m in _messages(client, job.id))
        with pytest.raises(openai.BadRequestError, match="only a failed or cancelled job resumes"):
            client.fine_tuning.jobs.resume(job.id)
    finally:
        srv.stop()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(config: Path, model: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loratui",
            "serve",
            str(model),
            "--config",
            str(config),
            "--port",
            str(port),
            "--model-name",
            "tiny",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("loratui serve did not get ready")


@pytest.mark.slow  # 30-40 s: runs in make test-slow (CI), keeping make test under 15 minutes
def test_a_server_that_dies_keeps_its_jobs_and_the_running_one_resumes(tmp_path, tiny):
    """`loratui serve` is killed (SIGKILL) mid-training: its job's process stops too, saving a checkpoint; the
    next server lists the jobs, shows the running one failed with a resumable checkpoint, and resume finishes it."""
    data = {"runs_dir": str(tmp_path / "runs"), "serve": {"jobs_dir": str(tmp_path / "jobs")}}
    for override in TEMPLATE:
        key, _, value = override.partition("=")
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump(data))
    port = _port()
    server = _serve(config, tiny, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        f = client.files.create(file=("support.jsonl", _chat_jsonl()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body={"loratui": LONG})
        queued = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="next")
        running = _wait(
            client, job.id, lambda j: j.status == "running" and client.fine_tuning.jobs.checkpoints.list(j.id).data
        )
        pid = json.loads((tmp_path / "jobs" / "jobs" / job.id / "job.json").read_text())["pid"]
        assert (tmp_path / "runs" / running.model_extra["loratui"]["run_dir"]).is_dir()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and b"loratui" in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the job's process outlived its server"
        time.sleep(0.2)

    server = _serve(config, tiny, port)
    try:
        jobs = {j.id: j for j in client.fine_tuning.jobs.list()}
        assert set(jobs) == {job.id, queued.id}
        failed = jobs[job.id]
        assert failed.status == "failed" and failed.error.code == "server_restarted"
        assert "checkpoint-" in failed.error.message and "resume" in failed.error.message
        assert failed.model_extra["loratui"]["resumable_checkpoint"]
        assert jobs[queued.id].status in ("queued", "running")  # the queue goes on after a restart
        client.fine_tuning.jobs.cancel(queued.id)
        client.fine_tuning.jobs.resume(job.id)
        done = _wait(client, job.id, lambda j: j.status == "succeeded")
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
        assert reply.model == done.fine_tuned_model
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
