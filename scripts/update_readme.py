"""Regenerate the config reference block in README.md from the schema (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from loratui.pipeline.config import config_reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md needs the markers {START} and {END}")
    return f"{head}{START}\n{config_reference_markdown()}{END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
