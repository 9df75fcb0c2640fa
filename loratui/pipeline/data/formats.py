"""Row formats: detection, column mapping and validation into one shape, a chat or a text.

Formats (field names after ``data.columns`` mapping):

| format | fields |
|---|---|
| alpaca | ``instruction``, optional ``input``, ``output`` (optional ``system``) |
| qa | ``question``/``answer``, or ``prompt``/``completion``, or ``prompt``/``response`` |
| chat | ``messages``: a list of ``{role, content}`` (OpenAI), optional top-level ``system`` |
| sharegpt | ``conversations``: a list of ``{from, value}`` (``human``/``gpt``/``system``) |
| text | ``text``: trained on in full |
| preference | ``prompt``, ``chosen``, ``rejected`` (or ``chosen``/``rejected`` conversations sharing the prompt) |
| openai_preference | ``input.messages``, ``preferred_output``, ``non_preferred_output`` (OpenAI's DPO rows) |
| unpaired_preference | ``prompt``, ``completion``, ``label`` (true/false; KTO) |

The preference formats are parsed by :mod:`.preference`; an :class:`Example` of one holds the chosen
conversation in ``messages`` and the rejected reply in ``rejected`` (paired) or the verdict in ``label``
(unpaired).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from loratui.pipeline.data.problems import RowError
from loratui.pipeline.errors import LoratuiError

# format -> accepted field sets (the first that a row has wins). The preference formats come first: on a tie
# detection picks the first format in this order, so a ``label`` column makes prompt/completion rows KTO's.
FORMAT_FIELDS: dict[str, list[tuple[str, ...]]] = {
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "openai_preference": [("input", "preferred_output", "non_preferred_output")],
    "unpaired_preference": [("prompt", "completion", "label")],
    "chat": [("messages",)],
    "sharegpt": [("conversations",)],
    "alpaca": [("instruction", "output")],
    "qa": [("question", "answer"), ("prompt", "completion"), ("prompt", "response")],
    "text": [("text",)],
}
OPTIONAL_FIELDS = {
    "alpaca": ("input", "system"),
    "chat": ("system",),
    "sharegpt": ("system",),
    "openai_preference": ("tools", "parallel_tool_calls"),  # ignored: the replies are plain assistant text
}
# preference format -> what its rows are: chosen and rejected replies ("paired") or one reply and a verdict
PREFERENCE_FORMATS: dict[str, Literal["paired", "unpaired"]] = {
    "preference": "paired",
    "openai_preference": "paired",
    "unpaired_preference": "unpaired",
}
PreferenceKind = Literal["none", "paired", "unpaired"]
KIND_NAMES = {"none": "non-preference", "paired": "paired preference", "unpaired": "unpaired preference"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")


def preference_of(fmt: str) -> PreferenceKind:
    """What rows of format ``fmt`` are: "paired", "unpaired" (preference formats) or "none"."""
    return PREFERENCE_FORMATS.get(fmt, "none")


@dataclass
class Example:
    """One validated example: ``messages`` (a chat) or ``text`` (trained in full).

    A preference row holds its chosen conversation (the prompt, then the chosen reply) in ``messages``
    and, when paired, the rejected reply in ``rejected`` (one assistant message); when unpaired (KTO),
    whether its reply is desirable in ``label``.
    """

    file: str
    row: int
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    document: bool = False
    rejected: list[dict[str, str]] | None = None
    label: bool | None = None
    _key: str | None = field(default=None, repr=False, compare=False)

    @property
    def preference(self) -> PreferenceKind:
        if self.rejected is not None:
            return "paired"
        return "unpaired" if self.label is not None else "none"

    def key(self) -> str:
        """Content hash used to find exact duplicates (within and across splits): a pair by its prompt and
        both replies, an unpaired row by its conversation and label."""
        if self._key is None:
            content: Any = self.messages if self.messages is not None else self.text
            if self.preference != "none":
                content = {"messages": self.messages, "rejected": self.rejected, "label": self.label}
            payload = json.dumps(content, sort_keys=True, ensure_ascii=False)
            self._key = hashlib.sha1(payload.encode("utf-8")).hexdigest()
        return self._key


@dataclass(frozen=True)
class Detection:
    format: str
    reason: str


def apply_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the user's columns to the format's field names (``data.columns``: {field: column})."""
    if not columns:
        return record
    out = dict(record)
    for canonical, column in columns.items():
        if column in out and canonical != column:
            out[canonical] = out.pop(column)
    return out


def _matching_fields(record: dict[str, Any], fmt: str) -> tuple[str, ...] | None:
    for fields in FORMAT_FIELDS[fmt]:
        if all(f in record for f in fields):
            return fields
    return None


def detect_format(records: list[dict[str, Any]], source: str) -> Detection:
    """Pick the format most sampled rows fit, and say why."""
    sample = records[:200]
    if not sample:
        raise LoratuiError(f"{source}: no valid rows to detect the format from")
    scores = []
    for fmt in FORMAT_FIELDS:  # dict order breaks ties: the preference formats, chat, sharegpt, alpaca, qa, text
        hits = [f for f in (_matching_fields(r, fmt) for r in sample) if f]
        if hits:
            scores.append((len(hits), fmt, max(set(hits), key=hits.count)))
    if not scores:
        columns = sorted({k for r in sample for k in r})
        expected = "; ".join(f"{fmt}: {' + '.join(fs[0])}" for fmt, fs in FORMAT_FIELDS.items())
        raise LoratuiError(
            f"{source}: cannot tell the format from the columns {', '.join(columns[:12])}",
            hint=f"Expected fields ({expected}). Map yours with data.columns, e.g. "
            "data.columns={instruction: prompt, output: answer}, or set data.format.",
        )
    count, fmt, fields = max(scores, key=lambda s: s[0])
    _refuse_mixed_rows(sample, fmt, source)
    return Detection(fmt, f"{count} of {len(sample)} sampled rows have {', '.join(fields)}")


def _row_format(record: dict[str, Any]) -> str | None:
    """The first format (in :data:`FORMAT_FIELDS` order) whose fields ``record`` has."""
    return next((fmt for fmt in FORMAT_FIELDS if _matching_fields(record, fmt)), None)


def _refuse_mixed_rows(sample: list[dict[str, Any]], fmt: str, source: str) -> None:
    """One file holds preference rows of one kind or none: a mix would train on a silent subset."""
    kinds: dict[str, Counter[str]] = {}
    for record in sample:
        row_fmt = _row_format(record)
        if row_fmt is not None:
            kinds.setdefault(preference_of(row_fmt), Counter())[row_fmt] += 1
    if len(kinds) < 2:
        return
    described = "; ".join(f"{sum(c.values())} {KIND_NAMES[kind]} rows ({', '.join(c)})" for kind, c in kinds.items())
    raise LoratuiError(
        f"{source}: the file mixes kinds of rows: {described} among {len(sample)} sampled rows (detected as {fmt})",
        hint="Preference rows (prompt/chosen/rejected, OpenAI's preference rows, or prompt/completion/label "
        "for KTO) train with train.objective dpo, orpo or kto; keep them in their own files, of one kind, "
        "apart from supervised rows, or set data.format to read every row as one format.",
    )


@overload
def _text(record: dict[str, Any], name: str, required: Literal[True] = True) -> str: ...
@overload
def _text(record: dict[str, Any], name: str, required: bool) -> str | None: ...


def _text(record: dict[str, Any], name: str, required: bool = True) -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise RowError("missing_field", "required field is missing", name)
        return None
    value = record[name]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"expected text, got {_kind(value)}", name)
    if required and not value.strip():
        raise RowError("empty_field", "field is empty", name)
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    kinds: dict[type, str] = {dict: "an object", list: "a list"}
    return kinds.get(type(value), type(value).__name__)


def _check_turns(messages: list[dict[str, str]], name: str) -> None:
    if not messages:
        raise RowError("empty_field", "the conversation has no messages", name)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RowError("bad_role_order", f"message {i} is a system message; only the first may be", name)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in turns):
        raise RowError("no_assistant_turn", "no assistant message to learn from", name)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            pos = i + (len(messages) - len(turns))
            raise RowError(
                "bad_role_order",
                f"message {pos} is '{m['role']}', expected '{expected}' "
                "(user and assistant must alternate, starting with user)",
                name,
            )
    if turns[-1]["role"] != "assistant":
        raise RowError("bad_role_order", "the conversation ends with a user message that has no answer", name)
    for i, m in enumerate(messages):
        if not m["content"].strip():
            kind = "empty_assistant_turn" if m["role"] == "assistant" else "empty_field"
            raise RowError(kind, f"message {i} ({m['role']}) is empty", name)


def _message_list(
    record: dict[str, Any], name: str, role_key: str, content_key: str, roles: dict[str, str] | None
) -> list[dict[str, str]]:
    raw = record.get(name)
    if raw is None:
        raise RowError("missing_field", "required field is missing", name)
    if isinstance(raw, str):  # CSV cells and some exports hold the list as a JSON string
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise RowError("wrong_type", "expected a list of messages, got text that is not JSON", name) from None
    if not isinstance(raw, list):
        raise RowError("wrong_type", f"expected a list of messages, got {_kind(raw)}", name)
    messages = []
    for i, item in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise RowError(
                "wrong_type", f"expected an object with {role_key} and {content_key}, got {_kind(item)}", where
            )
        role, content = item.get(role_key), item.get(content_key)
        if role is None or content is None:
            missing = role_key if role is None else content_key
            raise RowError("missing_field", f"message has no '{missing}'", where)
        if not isinstance(role, str):
            raise RowError("wrong_type", f"'{role_key}' must be text, got {_kind(role)}", where)
        if not isinstance(content, str):
            raise RowError("wrong_type", f"'{content_key}' must be text, got {_kind(content)}", where)
        mapped = (roles or {r: r for r in ROLES}).get(role.strip().lower())
        if mapped is None:
            allowed = sorted(roles) if roles else list(ROLES)
            raise RowError("unknown_role", f"role '{role}' is not one of {', '.join(allowed)}", where)
        messages.append({"role": mapped, "content": content})
    return messages


def to_example(record: dict[str, Any], fmt: str, file: str, row: int, system_prompt: str | None) -> Example:
    """Validate one record of format ``fmt``; raises RowError naming the field and the problem."""
    if fmt in PREFERENCE_FORMATS:
        from loratui.pipeline.data.preference import preference_example

        return preference_example(record, fmt, file, row, system_prompt)
    fields = _matching_fields(record, fmt)
    used: set[str] = set(fields or FORMAT_FIELDS[fmt][0]) | set(OPTIONAL_FIELDS.get(fmt, ()))
    if fields is None:  # report the first missing field of the format's main field set
        for name in FORMAT_FIELDS[fmt][0]:
            _text(record, name)
    if fmt == "text":
        text = _text(record, "text")
        return Example(file, row, text=text, meta=_meta(record, used))
    if fmt == "alpaca":
        instruction, output = _text(record, "instruction"), _text(record, "output")
        extra = _text(record, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = _text(record, "system", required=False)
    elif fmt == "qa":
        assert fields is not None
        prompt, answer = _text(record, fields[0]), _text(record, fields[1])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        system = None
    elif fmt == "chat":
        messages = _message_list(record, "messages", "role", "content", None)
        system = _text(record, "system", required=False)
    else:  # sharegpt
        messages = _message_list(record, "conversations", "from", "value", SHAREGPT_ROLES)
        system = _text(record, "system", required=False)
    system = system if system and system.strip() else system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    _check_turns(messages, fields[0] if fields else fmt)
    return Example(file, row, messages=messages, meta=_meta(record, used))


def _meta(record: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """Extra columns (e.g. a reference ``fact``), kept for evaluation when they are JSON values."""
    meta = {}
    for k, v in record.items():
        if k in used or not isinstance(k, str):
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        meta[k] = v
    return meta
