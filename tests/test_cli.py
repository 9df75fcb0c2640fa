"""The `loratui` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline.test_config import THREE_MISTAKES

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "examples/quickstart.yaml"
HEAVY = ("torch", "transformers", "textual")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "LORATUI_HOME": str(tmp_path / "home")}


def loratui(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loratui", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_exits_zero(env):
    proc = loratui("--help", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: loratui")
    for command in ("config", "models", "tui"):
        assert command in proc.stdout
    assert "examples:" in proc.stdout
    assert proc.stderr == ""


def test_help_imports_nothing_heavy(env):
    probe = (
        "import json, sys\n"
        "import loratui.cli\n"
        "try:\n"
        "    loratui.cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "else:\n"
        "    code = 'no exit'\n"
        "mods = ('torch', 'transformers', 'textual', 'pydantic', 'argparse')\n"
        "print('RESULT ' + json.dumps({'code': code, 'loaded': {m: m in sys.modules for m in mods}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["code"] == 0
    assert result["loaded"]["argparse"] is True  # the probe does see what was imported
    for heavy in HEAVY:
        assert result["loaded"][heavy] is False, f"`loratui --help` imported {heavy}"
    # the module docstring promises pydantic stays out too
    assert result["loaded"]["pydantic"] is False


def test_help_entry_point_import_profile(env):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "loratui", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "loratui.cli" in imported
    for heavy in HEAVY:
        assert not {m for m in imported if m == heavy or m.startswith(heavy + ".")}, heavy


def test_console_script_help_is_fast(env):
    script = Path(sys.executable).parent / "loratui"
    assert script.is_file(), f"console script not installed at {script}"
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=30)
        timings.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
        assert "usage: loratui" in proc.stdout
    assert min(timings) < 0.5, f"loratui --help took {min(timings):.3f}s at best ({timings})"


def test_version(env):
    proc = loratui("--version", env=env)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "loratui 0.1.0"


def test_config_validate_reports_three_problems(tmp_path, env):
    bad = tmp_path / "bad-run.yaml"
    bad.write_text(THREE_MISTAKES)
    proc = loratui("config", "validate", str(bad), env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "bad-run.yaml" in ln]
    assert len(lines) == 3, proc.stderr
    expected = {"lora.method": 3, "train.lrr": 6, "train.lr": 7}
    for field, line_no in expected.items():
        (hit,) = [ln for ln in lines if f": {field}: " in ln]
        assert f"bad-run.yaml:{line_no}: {field}: " in hit
    assert "did you mean 'lr'" in proc.stderr
    assert "3 problems" in proc.stderr
    assert "ok" not in proc.stdout


def test_config_validate_quickstart_ok(env):
    proc = loratui("config", "validate", QUICKSTART, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{QUICKSTART}: ok"


def test_config_validate_missing_file(tmp_path, env):
    proc = loratui("config", "validate", str(tmp_path / "absent.yaml"), env=env)
    assert proc.returncode == 2
    assert "absent.yaml" in proc.stderr and "file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_show_with_override(env):
    proc = loratui("config", "show", "--config", QUICKSTART, "train.lr=0.001", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["lr"] == 0.001
    assert shown["name"] == "quickstart"
    assert shown["export"]["gguf_quants"] == ["q8_0"]  # from the file, not the defaults


def test_config_show_defaults(env):
    proc = loratui("config", "show", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["lr"] == pytest.approx(2e-4)
    assert set(shown) >= {"model", "data", "lora", "train", "eval", "merge", "export", "serve"}


def test_config_reference(env):
    proc = loratui("config", "reference", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| field | type | default | description |" in proc.stdout
    assert "| `train.lr` |" in proc.stdout
    assert "### `lora`" in proc.stdout


def test_config_show_bad_override_names_the_override(env):
    proc = loratui("config", "show", "train.lr=abc", env=env)
    assert proc.returncode == 2
    assert "override 'train.lr=abc'" in proc.stderr
    assert "train.lr" in proc.stderr and "'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_config_show_override_without_equals(env):
    proc = loratui("config", "show", "train.lr", env=env)
    assert proc.returncode == 2
    assert "override 'train.lr'" in proc.stderr and "KEY=VALUE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_error_with_brackets_is_printed_literally(env):
    proc = loratui("config", "show", "train.lr=a[/b]", env=env)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    assert "override 'train.lr=a[/b]'" in proc.stderr
