"""Regenerate the generated blocks of README.md (`make docs`): the config reference from the schema and the
model-family support table from the family registry."""

from __future__ import annotations

import sys
from pathlib import Path

from loratui.pipeline.config import config_reference_markdown
from loratui.pipeline.families import support_table_markdown

BLOCKS = {"config-reference": config_reference_markdown, "family-support": support_table_markdown}


def _replace(readme: str, name: str, text: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, sep, rest = readme.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise SystemExit(f"README.md needs the markers {start} and {end}")
    return f"{head}{start}\n{text}{end}{tail}"


def render(readme: str) -> str:
    for name, make in BLOCKS.items():
        readme = _replace(readme, name, make())
    return readme


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
