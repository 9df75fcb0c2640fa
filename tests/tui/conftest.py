import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio; anyio's pytest plugin drives the async tests


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory, monkeypatch):
    """Recent runs go to a throwaway folder, never the user's ~/.local/state."""
    monkeypatch.setenv("LORATUI_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Runs resolve against the working folder: each test gets its own, so no test sees another's runs."""
    monkeypatch.chdir(tmp_path)


class Estimates(list):
    """The estimate as the TUI calls it, stubbed: each call's (cfg, probe) is kept; ``outcome`` is what it
    returns (an exception is raised; a function of (cfg, probe) is called); ``hold``, when set, is waited on
    first (until ``should_stop``)."""

    def __init__(self) -> None:
        super().__init__()
        from tests.tui.fake_run import fake_estimate

        self.outcome: object = fake_estimate()
        self.hold = None  # a threading.Event the call waits for (polling should_stop meanwhile)
        self.ignore_stop = False  # wait for ``hold`` even when told to stop (a step that reacts late)
        self.stopped: list[bool] = []  # the calls that saw should_stop (their probe flag)
        self.returned = 0

    def __call__(self, cfg, *, probe=True, events=None, should_stop=lambda: False, facts=None):
        import time

        self.append((cfg, probe))
        if events is not None:
            events.progress(1, 3, task="probe" if probe else "data", unit="steps" if probe else "rows")
        given_up = time.monotonic() + 30  # a test that failed never leaves a thread waiting forever
        while self.hold is not None and not self.hold.is_set() and time.monotonic() < given_up:
            if should_stop() and not self.ignore_stop:
                self.stopped.append(probe)
                from loratui.pipeline.errors import LoratuiError

                raise LoratuiError("the estimate's probe was cancelled")
            time.sleep(0.01)
        try:
            outcome = self.outcome(cfg, probe) if callable(self.outcome) else self.outcome
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            self.returned += 1


@pytest.fixture(autouse=True)
def estimates(monkeypatch) -> Estimates:
    """No TUI test runs the real estimate (it imports torch and reads a model): the Train view gets a
    hand-built one at once. A test that wants the real one sets ``plan.estimate`` back."""
    from loratui.pipeline.estimate import plan

    stub = Estimates()
    monkeypatch.setattr(plan, "estimate", stub)
    return stub
