"""run_logged: the exporters' converter processes, with fake commands."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from loratui.exporters.common import run_logged
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.process import alive


def _run(tmp_path, code: str, should_stop=lambda: False, **kw) -> None:
    run_logged(
        [sys.executable, "-c", textwrap.dedent(code)],
        dict(os.environ),
        tmp_path / "out.log",
        should_stop,
        what="converting",
        **kw,
    )


def test_the_output_goes_to_the_log_under_a_heading(tmp_path):
    (tmp_path / "out.log").write_text("earlier\n")
    _run(tmp_path, "import sys; print('converted'); print('a warning', file=sys.stderr)")
    _run(tmp_path, "import os; print(os.getcwd())", cwd=tmp_path)
    lines = (tmp_path / "out.log").read_text().splitlines()
    assert lines == ["earlier", "", "# converting", "converted", "a warning", "", "# converting", str(tmp_path)]


def test_a_failure_names_the_error_line_and_the_log(tmp_path):
    with pytest.raises(LoratuiError) as e:
        _run(tmp_path, "import sys; print('ValueError: bad tensor'); print('bye'); sys.exit(3)")
    assert e.value.message == "converting failed (exit 3): ValueError: bad tensor"
    assert e.value.hint == f"The full output is in {tmp_path / 'out.log'}."


def test_an_expected_refusal_is_the_message(tmp_path):
    with pytest.raises(LoratuiError) as e:
        _run(tmp_path, "import sys; print('loratui-refused: no such tensor'); sys.exit(2)")
    assert e.value.message == "no such tensor"
    assert e.value.hint == f"The converter's output is in {tmp_path / 'out.log'}."


def test_a_cancel_stops_the_whole_group_then_kills_it(tmp_path):
    code = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a converter that does not stop: SIGKILL after the grace
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """
    log = tmp_path / "out.log"
    started = time.monotonic()
    with pytest.raises(StepCancelled, match="cancelled while converting; nothing was written"):
        _run(tmp_path, code, should_stop=lambda: log.read_text().split()[-1].isdigit(), grace_s=0.5)
    assert time.monotonic() - started < 30
    child = int(log.read_text().split()[-1])
    deadline = time.monotonic() + 10
    while alive(child):  # the converter's own children go too
        assert time.monotonic() < deadline
        time.sleep(0.05)
