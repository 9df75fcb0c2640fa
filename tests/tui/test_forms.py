"""The form fields' text for config values (loratui.tui.forms)."""

from __future__ import annotations

import yaml

from loratui.pipeline.config import RunConfig
from loratui.tui.forms import as_text, value_of


def test_a_nested_section_shows_as_yaml_that_gives_the_same_settings_back():
    """``data.augment`` is a section of its own: its field shows what was set, as YAML, and that text read
    back gives the same settings (not the object's repr, which a user could not edit)."""
    cfg = RunConfig.model_validate({"data": {"augment": {"variations": 3, "typo_rate": 0.05}}})
    text = as_text(value_of(cfg, "data.augment"))
    assert text == "{typo_rate: 0.05, variations: 3}"
    again = RunConfig.model_validate({"data": {"augment": yaml.safe_load(text)}})
    assert again.data.augment == cfg.data.augment
    on_with_defaults = RunConfig.model_validate({"data": {"augment": {}}})
    assert as_text(value_of(on_with_defaults, "data.augment")) == "{}"
    assert as_text(value_of(RunConfig(), "data.augment")) == ""  # off
