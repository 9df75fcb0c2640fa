"""What can be wrong with a row, and the per-problem policy that decides what happens to it.

Nothing is dropped silently: every row that is dropped or truncated becomes a :class:`RowProblem`
with its file, row number, field and what was expected, and ends up in ``data/report.json``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

# Problem kinds, in the order the report lists them, with a one-line explanation each.
PROBLEMS: dict[str, str] = {
    "invalid_json": "the line or file is not valid JSON",
    "undecodable_bytes": "the row has bytes that are not UTF-8",
    "not_an_object": "the row is not an object/record with named fields (CSV: the wrong number of values, "
    "or an unbalanced quote)",
    "missing_field": "a required field is missing or null",
    "empty_field": "a required field is empty",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a chat message has a role other than system, user or assistant",
    "bad_role_order": "chat turns are out of order (system first, then user and assistant alternating)",
    "empty_assistant_turn": "an assistant turn is empty",
    "no_assistant_turn": "the conversation has no assistant turn to learn from",
    "too_long": "the example is longer than max_length tokens",
    "duplicate": "an exact duplicate of an earlier example",
    "duplicate_across_splits": "a validation/test example that is also in the training split",
    "no_trained_tokens": "no assistant tokens are left to train on (after truncation)",
    "identical_replies": "a preference row's chosen and rejected replies are the same",
    "reply_not_assistant": "a preference reply is not one assistant message (a user turn, several turns, no text)",
    "prompt_mismatch": "chosen and rejected conversations differ before their last reply (no shared prompt)",
    "prompt_boundary": "after the chat template, the prompt's tokens do not end where the replies start",
    "bad_label": "an unpaired preference row's label is not true or false",
}
ProblemKind = Literal[
    "invalid_json",
    "undecodable_bytes",
    "not_an_object",
    "missing_field",
    "empty_field",
    "wrong_type",
    "unknown_role",
    "bad_role_order",
    "empty_assistant_turn",
    "no_assistant_turn",
    "too_long",
    "duplicate",
    "duplicate_across_splits",
    "no_trained_tokens",
    "identical_replies",
    "reply_not_assistant",
    "prompt_mismatch",
    "prompt_boundary",
    "bad_label",
]
Policy = Literal["drop", "truncate", "fail"]

# Defaults: every bad row is dropped (and listed); over-long rows are truncated.
DEFAULT_POLICY: dict[str, Policy] = {kind: "drop" for kind in PROBLEMS}
DEFAULT_POLICY["too_long"] = "truncate"
TRUNCATABLE = {"too_long"}


def shorten(text: str, width: int = 160) -> str:
    """``text`` on one line, at most ``width`` characters: cut at a word boundary and marked with "…".

    Messages are never cut mid-word or mid-sentence without the mark, so what is left reads as a whole.
    """
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    if space >= width // 2:  # a word boundary not too far back; else cut the (very long) word itself
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


@dataclass(frozen=True)
class RowProblem:
    """One problem with one row. ``row`` is 1-based: the physical line for JSONL and CSV (where a CSV record
    spans lines, the line it starts on), the position for JSON arrays and Parquet."""

    kind: str
    file: str
    row: int | None
    message: str
    field: str | None = None
    action: Literal["dropped", "truncated", "failed"] = "dropped"

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else self.file
        field = f", field '{self.field}'" if self.field else ""
        return f"{where}{field}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class RowError(Exception):
    """Raised by row parsers; becomes a RowProblem with the row's file and number."""

    def __init__(self, kind: str, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field
