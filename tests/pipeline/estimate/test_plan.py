"""``loratui estimate`` end to end: a tiny model with and without the probe (which leaves no trace), the
7B config that cannot fit here, the command line and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.estimate.plan import estimate
from loratui.pipeline.runs import RunDir

REPO = Path(__file__).resolve().parents[3]


def _cfg(tmp_path: Path, model: Path, *overrides: str):
    return load_config(
        None,
        [
            "name=est",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.epochs=2",
            "train.device=cpu",
            *overrides,
        ],
    )


def test_no_probe_estimate_of_a_tiny_model(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    result = estimate(cfg, probe=False)
    assert result.fits and result.device == "cpu" and result.time.source == "analytic"
    assert result.settings["rows"] == 100 and result.settings["tokens_per_epoch"] > 1000
    assert set(result.time.parts) == {"data", "train", "eval", "merge", "export gguf"}
    assert all(v >= 0 for v in result.time.parts.values()) and result.time.parts["train"] > 0
    assert result.time.steps == 2 * -(-100 // (result.settings["batch_size"] * result.settings["grad_accum"]))
    assert result.memory.available and result.memory.total < result.memory.available
    assert result.disk.parts["merged"] > 0 and "gguf q8_0" in result.disk.parts
    assert not RunDir.for_config(cfg).path.exists()  # nothing written into the run
    text = "\n".join(result.lines())
    assert "fits:" in text and "micro-batch" in text


def test_the_probe_measures_real_steps_and_leaves_no_trace(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    result = estimate(cfg, probe=True)
    m = result.measured
    assert result.time.source == "probe" and m["steps_timed"] == 3
    assert 0 < m["seconds_per_token"] < 1 and m["peak_rss"] > 100 << 20
    assert m["trainable"] > 0 and m["checkpoint_bytes"] > 0
    assert result.memory.total == m["peak"]  # the measured peak, its parts rebalanced
    assert not RunDir.for_config(cfg).path.exists()


def test_a_cancelled_probe_stops(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    start = time.monotonic()
    with pytest.raises(LoratuiError, match="cancelled"):
        estimate(cfg, probe=True, should_stop=lambda: time.monotonic() - start > 1.0)


def test_a_7b_model_does_not_fit_and_the_changes_that_would_are_listed(monkeypatch):
    from loratui.pipeline.estimate import plan

    monkeypatch.setattr(plan, "device_memory", lambda device: (22 << 30, "RAM available"))  # this machine kind
    cfg = load_config(REPO / "examples" / "estimate-7b.yaml", ["train.device=cpu"])
    start = time.monotonic()
    result = estimate(cfg, probe=False)
    assert time.monotonic() - start < 30  # the CLI's own timing (< 5 s) is asserted by the bench, not here
    assert result.params == 7_241_732_096
    assert "characters" in result.settings["tokens_from"]  # no tokenizer beside the config
    assert not result.fits and result.memory.fits is False and result.memory.parts["weights"] > 26 << 30
    assert result.changes and all(c.fits and c.memory < 22 << 30 for c in result.changes)
    qlora = next(c for c in result.changes if c.overrides == ["lora.method=qlora"])
    assert qlora.memory < 8 << 30


def test_no_probe_where_the_memory_model_says_it_cannot_fit(monkeypatch):
    from loratui.pipeline.estimate import plan
    from loratui.pipeline.train import probe

    monkeypatch.setattr(plan, "device_memory", lambda device: (22 << 30, "RAM available"))
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("a 28 GiB probe on 22 GiB"))
    result = estimate(load_config(REPO / "examples" / "estimate-7b.yaml", ["train.device=cpu"]), probe=True)
    assert result.time.source == "analytic" and any(n.startswith("no probe:") for n in result.notes)
    assert not result.fits and result.changes


def test_the_command_prints_json_and_exits_3_when_it_does_not_fit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loratui",
            "estimate",
            "--config",
            "examples/estimate-7b.yaml",
            "--no-probe",
            "--json",
            "train.device=cpu",
            "train.save_total_limit=3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    data = json.loads(out.stdout)
    assert data["params"] == 7_241_732_096 and data["settings"]["precision"] == "fp32"
    fits = data["memory"]["available"] is None or sum(data["memory"]["parts"].values()) <= data["memory"]["available"]
    assert out.returncode == (0 if fits else 3), out.stderr


def test_estimate_help_does_not_import_torch():
    code = (
        "import sys\nfrom loratui.cli import main\n"
        "try:\n    main(['estimate', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=60)


def test_a_hub_model_not_in_the_cache_fetches_only_its_config(tmp_path, monkeypatch):
    """No weights are downloaded for an estimate: config and tokenizer files into a folder of its own."""
    import huggingface_hub

    from loratui.pipeline import models
    from loratui.pipeline.estimate import plan

    calls = []

    def fake_snapshot(spec, revision=None, allow_patterns=None, cache_dir=None, **kwargs):
        calls.append((spec, allow_patterns, cache_dir, kwargs.get("local_files_only", False)))
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(spec)  # not in the Hugging Face cache
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text((REPO / "examples" / "mistral-7b" / "config.json").read_text())
        return str(folder)

    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    cfg = load_config(None, ["model.base=mistralai/Mistral-7B-v0.1"])
    folder = plan.model_dir(cfg)
    assert (folder / "config.json").is_file()
    spec, patterns, cache_dir, _ = calls[-1]
    assert spec == "mistralai/Mistral-7B-v0.1" and "*.safetensors" not in patterns
    assert Path(cache_dir) == tmp_path / "home" / "estimate-configs"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoratuiError, match="unreachable"):
        plan.model_dir(cfg)
