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
