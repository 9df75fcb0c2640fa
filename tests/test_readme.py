"""README.md stays true: the config reference is the schema's, and the two commands are there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loratui.pipeline.config import SECTIONS, RunConfig, config_reference_markdown

REPO = Path(__file__).resolve().parent.parent


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_in_readme_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert _update_readme().render(readme) == readme, "README's config reference is stale: run `make docs`"
    assert config_reference_markdown() in readme


def test_reference_documents_every_field():
    ref = config_reference_markdown()
    for section in SECTIONS:
        for field in RunConfig.model_fields[section].annotation.model_fields:
            assert f"`{section}.{field}`" in ref


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
