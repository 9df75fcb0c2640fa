"""Fixtures for the data step's tests: ``loratui data`` through the real CLI, in-process."""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loratui.cli import main

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class CliResult:
    code: int | None  # None: main() raised instead of returning an exit code
    err: str
    report: dict[str, Any] | None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def tiny(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory(tokenizer="bpe")


@pytest.fixture
def data_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, tiny: Path):
    """``run(source, *overrides) -> CliResult``: ``loratui data`` in-process on a fresh home and runs dir
    (``tmp_path/runs/x``)."""
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    runs = tmp_path / "runs"

    def run(source: str, *overrides: str) -> CliResult:
        capfd.readouterr()
        argv = ["data", f"runs_dir={runs}", "name=x", f"model.base={tiny}", f"data.source={source}", *overrides]
        try:
            code: int | None = main(argv)
            tb = ""
        except (Exception, SystemExit):  # a traceback would reach the user: record it as one
            code, tb = None, traceback.format_exc()
        err = ANSI.sub("", capfd.readouterr().err) + tb
        report_path = runs / "x" / "data" / "report.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
        return CliResult(code, err, report)

    return run
