"""`loratui run`: every step in order, skipping what is up to date, resuming an interrupted training."""

from __future__ import annotations

from pathlib import Path

from loratui.pipeline import uptodate
from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.events import MemoryWriter, read_events
from loratui.pipeline.run_all import run_all
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, EXIT_USER, StopFlag, load_step, run_step


def _cfg(tmp_path: Path, model: Path, *overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            f"runs_dir={tmp_path / 'runs'}",
            "name=r",
            f"model.base={model}",
            "data.source=quickstart",
            "train.max_steps=4",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.save_every=1",
            "eval.max_samples=4",
            "eval.max_new_tokens=4",
            "eval.comparison_examples=2",
            "export.formats=[safetensors]",
            *overrides,
        ],
    )


def _statuses(outcomes) -> dict[str, str]:
    return {o.step: o.status for o in outcomes}


def test_the_export_outputs_cover_every_format():
    from loratui.exporters.registry import EXPORTERS

    assert set(uptodate.EXPORT_OUTPUTS) == set(EXPORTERS)


def test_steps_run_once_then_only_what_a_change_touches(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    run = RunDir.for_config(cfg)
    code, outcomes = run_all(cfg)
    assert code == EXIT_OK
    assert _statuses(outcomes) == dict.fromkeys(["data", "train", "eval", "merge", "export"], "ran")
    adapter = (run.adapter / "adapter_model.safetensors").stat().st_mtime_ns
    report = run.report.read_text()  # the whole run on one page, current after the last step
    for section in ("## Data", "## Training", "## Evaluation: base vs tuned", "| loss |", "## Use it"):
        assert section in report, section
    assert f'from_pretrained("{run.merged}")' in report
    page = (run.path / "report.html").read_text()
    assert "<table>" in page and page.count('src="data:image/png;base64,') == 2

    code, outcomes = run_all(cfg)  # the same config again: nothing to do
    assert code == EXIT_OK and set(_statuses(outcomes).values()) == {"skipped"}
    assert (run.adapter / "adapter_model.safetensors").stat().st_mtime_ns == adapter

    code, outcomes = run_all(_cfg(tmp_path, tiny_llama, "eval.max_new_tokens=6"))
    assert _statuses(outcomes) == {
        "data": "skipped",
        "train": "skipped",
        "eval": "ran",
        "merge": "skipped",
        "export": "skipped",
    }

    changed = _cfg(tmp_path, tiny_llama, "eval.max_new_tokens=6", "lora.r=4")
    code, outcomes = run_all(changed)
    assert _statuses(outcomes) == {"data": "skipped", "train": "ran", "eval": "ran", "merge": "ran", "export": "ran"}

    # training again by hand, same settings: another adapter, so what uses it is stale
    assert run_step("train", load_step("train"), changed.model_copy(deep=True))[0] == EXIT_OK
    code, outcomes = run_all(changed)
    assert _statuses(outcomes) == {
        "data": "skipped",
        "train": "skipped",
        "eval": "ran",
        "merge": "ran",
        "export": "ran",
    }

    (run.eval / "metrics.json").unlink()  # an output gone: that step runs again, alone
    code, outcomes = run_all(changed, force=("merge",))
    assert _statuses(outcomes) == {
        "data": "skipped",
        "train": "skipped",
        "eval": "ran",
        "merge": "ran",
        "export": "skipped",
    }


def test_an_interrupted_training_resumes_when_the_run_starts_again(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, "eval.max_samples=2", "train.max_steps=6")
    stop = StopFlag()

    def probe(event):  # Ctrl-C during training, at step 3
        if event.type == "progress" and event.step == "train" and event.task == "train" and event.current >= 3:
            stop.set()

    code, outcomes = run_all(cfg, writers=[probe], stop=stop)
    assert code == EXIT_CANCELLED
    assert _statuses(outcomes) == {
        "data": "ran",
        "train": "cancelled",
        "eval": "not run",
        "merge": "not run",
        "export": "not run",
    }
    run = RunDir.for_config(cfg)
    assert not run.adapter.exists()

    mem = MemoryWriter()
    code, outcomes = run_all(cfg, writers=[mem])
    assert code == EXIT_OK
    assert _statuses(outcomes) == {
        "data": "skipped",
        "train": "resumed",
        "eval": "ran",
        "merge": "ran",
        "export": "ran",
    }
    assert any(e.message.startswith("resuming from") for e in mem.of_type("log"))
    assert [e.summary.get("steps") for e in read_events(run.events) if e.type == "done" and e.step == "train"] == [6]

    # with other settings the checkpoints are not this training's: it starts over
    code, outcomes = run_all(
        _cfg(tmp_path, tiny_llama, "eval.max_samples=2", "train.max_steps=6", "train.lr=2e-2"),
        skip=("eval", "merge", "export"),
    )
    assert _statuses(outcomes) == {"data": "skipped", "train": "ran"}


def test_a_failing_step_stops_the_run_with_its_exit_code(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, f"data.source={tmp_path / 'missing.jsonl'}")
    mem = MemoryWriter()
    code, outcomes = run_all(cfg, writers=[mem])
    assert code == EXIT_USER
    assert _statuses(outcomes) == {
        "data": "failed",
        "train": "not run",
        "eval": "not run",
        "merge": "not run",
        "export": "not run",
    }
    assert "missing.jsonl" in mem.of_type("error")[0].message


def test_the_cli_prints_a_table_of_the_steps(tmp_path, tiny_llama, capsys):
    from loratui.cli import main
    from loratui.pipeline.runs import write_config

    path = tmp_path / "run.yaml"
    write_config(path, _cfg(tmp_path, tiny_llama, f"data.source={tmp_path / 'missing.jsonl'}"))
    assert main(["run", str(path), "--skip", "export"]) == EXIT_USER
    err = capsys.readouterr().err
    assert "1/4 data" in err and "failed" in err and "not run" in err and "export" not in err.split("run r")[-1]


def test_the_fingerprint_sees_edits_to_the_files_a_config_names(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for source in (str(data / "a.jsonl"), str(data), str(data / "*.jsonl")):
        cfg = load_config(None, [f"runs_dir={tmp_path}", f"data.source={source}"])
        before = uptodate.fingerprint(cfg, "train")
        assert uptodate.fingerprint(cfg, "train") == before
        (data / "a.jsonl").write_text('{"question": "q", "answer": "another"}\n')
        assert uptodate.fingerprint(cfg, "train") != before, source
    cfg = load_config(None, [f"runs_dir={tmp_path}", "data.source=quickstart"])
    before = {s: uptodate.fingerprint(cfg, s) for s in uptodate.SECTIONS_OF}
    cfg.export.gguf_quants = ["f16"]
    after = {s: uptodate.fingerprint(cfg, s) for s in uptodate.SECTIONS_OF}
    assert [s for s in before if before[s] != after[s]] == ["export"]
    cfg.train.resume = "latest"  # how a run is invoked is not one of its inputs
    assert uptodate.fingerprint(cfg, "train") == after["train"]
