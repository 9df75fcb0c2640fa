"""Preference rows (for ``train.objective`` dpo, orpo and kto) -> validated :class:`Example` s.

Three formats (field names after ``data.columns`` mapping):

- ``preference``: ``prompt``, ``chosen``, ``rejected``. The prompt is text (one user message) or a message
  list (system, then user and assistant alternating, ending with the user's turn); each reply is text or
  a one-message list ``[{"role": "assistant", "content": ...}]``. Without a ``prompt`` field, ``chosen``
  and ``rejected`` are whole conversations: the messages they share before their last one are the prompt,
  their last messages the replies.
- ``openai_preference``: OpenAI's DPO rows, ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}``, each output one assistant message (``tools`` and
  ``parallel_tool_calls`` are ignored; a developer message counts as the system message).
- ``unpaired_preference`` (KTO): ``prompt``, ``completion`` (as a reply above) and ``label``, a JSON
  true/false (the text "true"/"false" of a CSV cell too).

A message list may also come as JSON text (a CSV cell). ``data.system_prompt`` is put before a prompt
that has no system message. Only the final reply is trained: the assistant turns of a multi-turn prompt
are context, and ``data.train_on_prompt`` does not apply (the replies are what the objective compares).
"""

from __future__ import annotations

import json
from typing import Any

from loratui.pipeline.data.formats import Example, _kind, _message_list, _meta
from loratui.pipeline.data.problems import RowError, shorten

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
PREFERENCE_FIELDS = {
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output", "tools", "parallel_tool_calls"),
    "unpaired_preference": ("prompt", "completion", "label"),
}
Messages = list[dict[str, str]]


def preference_example(record: dict[str, Any], fmt: str, file: str, row: int, system_prompt: str | None) -> Example:
    """Validate one preference row of format ``fmt``; raises RowError naming the field and the problem."""
    meta = _meta(record, set(PREFERENCE_FIELDS[fmt]))
    if fmt == "unpaired_preference":
        prompt = _prompt(record.get("prompt"), "prompt")
        completion = _reply(record.get("completion"), "completion")
        label = _label(record)
        return Example(file, row, messages=[*_with_system(prompt, system_prompt), completion], label=label, meta=meta)
    if fmt == "openai_preference":
        prompt = _openai_prompt(record)
        chosen = _reply(record.get("preferred_output"), "preferred_output")
        rejected = _reply(record.get("non_preferred_output"), "non_preferred_output")
        rejected_field = "non_preferred_output"
    elif "prompt" in record:
        prompt = _prompt(record["prompt"], "prompt")
        chosen, rejected = _reply(record.get("chosen"), "chosen"), _reply(record.get("rejected"), "rejected")
        rejected_field = "rejected"
    else:
        prompt, chosen, rejected = _implicit_prompt(record)
        rejected_field = "rejected"
    if chosen["content"].strip() == rejected["content"].strip():
        raise RowError(
            "identical_replies",
            f"the chosen and the rejected reply are the same text ({shorten(chosen['content'], 60)!r}): "
            "there is no preference to learn",
            rejected_field,
        )
    return Example(file, row, messages=[*_with_system(prompt, system_prompt), chosen], rejected=[rejected], meta=meta)


def _with_system(prompt: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and system_prompt.strip() and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _as_messages(value: Any) -> Any:
    """A message list given as JSON text (a CSV cell) as the list; any other value as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


def _prompt(value: Any, name: str) -> Messages:
    """A prompt: text (one user message) or messages that end with the user's turn."""
    value = _as_messages(value)
    if value is None:
        raise RowError("missing_field", "required field is missing", name)
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_field", "field is empty", name)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RowError("wrong_type", f"expected text or a list of messages, got {_kind(value)}", name)
    messages = _message_list({name: value}, name, "role", "content", None)
    _check_prompt(messages, name)
    return messages


def _check_prompt(messages: Messages, name: str) -> None:
    """System first (if any), then user and assistant alternating from the user, ending with the user."""
    if not messages:
        raise RowError("empty_field", "the prompt has no messages", name)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RowError("bad_role_order", f"message {i} is a system message; only the first may be", name)
    skip = 1 if messages[0]["role"] == "system" else 0
    turns = messages[skip:]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(
                "bad_role_order",
                f"message {i + skip} is '{m['role']}', expected '{expected}' "
                "(user and assistant alternate, starting with user)",
                name,
            )
    if not turns or turns[-1]["role"] != "user":
        raise RowError("bad_role_order", "the prompt must end with the user's message that the replies answer", name)
    for i, m in enumerate(messages):
        if not m["content"].strip():
            kind = "empty_assistant_turn" if m["role"] == "assistant" else "empty_field"
            raise RowError(kind, f"message {i} ({m['role']}) of the prompt is empty", name)


def _reply(value: Any, name: str) -> dict[str, str]:
    """A reply: text, or a list holding one assistant message with text (no tool calls)."""
    value = _as_messages(value)
    if value is None:
        raise RowError("missing_field", "required field is missing", name)
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_field", "the reply is empty", name)
        return {"role": "assistant", "content": value}
    if not isinstance(value, list):
        raise RowError("wrong_type", f"expected text or a list with one assistant message, got {_kind(value)}", name)
    if not value:
        raise RowError("empty_field", "the reply list has no message", name)
    if len(value) > 1:
        raise RowError(
            "reply_not_assistant",
            f"expected one assistant message, got {len(value)} messages (with a prompt field, a reply holds "
            "only the assistant's answer)",
            name,
        )
    return _assistant_message(value[0], f"{name}[0]")


def _assistant_message(item: Any, where: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise RowError("wrong_type", f"expected an object with role and content, got {_kind(item)}", where)
    if item.get("tool_calls") or item.get("function_call"):
        raise RowError("reply_not_assistant", "the reply calls tools; a preference reply must be assistant text", where)
    role = item.get("role")
    if role is None:
        raise RowError("missing_field", "message has no 'role'", where)
    if not isinstance(role, str):
        raise RowError("wrong_type", f"'role' must be text, got {_kind(role)}", where)
    if role.strip().lower() != "assistant":
        raise RowError("reply_not_assistant", f"the reply's role is '{role}', expected 'assistant'", where)
    content = item.get("content")
    if content is None:
        raise RowError("reply_not_assistant", "the reply has no text content", where)
    if not isinstance(content, str):
        raise RowError("wrong_type", f"'content' must be text, got {_kind(content)}", where)
    if not content.strip():
        raise RowError("empty_assistant_turn", "the assistant's reply is empty", where)
    return {"role": "assistant", "content": content}


def _conversation(record: dict[str, Any], name: str) -> Messages:
    value = _as_messages(record.get(name))
    if value is None:
        raise RowError("missing_field", "required field is missing", name)
    if isinstance(value, str):
        raise RowError(
            "missing_field",
            f"the row has no prompt, and {name} is text, not a conversation that holds the prompt",
            "prompt",
        )
    if not isinstance(value, list):
        raise RowError("wrong_type", f"expected a list of messages, got {_kind(value)}", name)
    if not value:
        raise RowError("empty_field", "the conversation has no messages", name)
    last = value[-1]
    if isinstance(last, dict) and (last.get("tool_calls") or last.get("function_call")):
        raise RowError("reply_not_assistant", "the last message calls tools; the reply must be assistant text", name)
    return _message_list({name: value}, name, "role", "content", None)


def _implicit_prompt(record: dict[str, Any]) -> tuple[Messages, dict[str, str], dict[str, str]]:
    """(prompt, chosen, rejected) of whole conversations: their shared messages, then their last ones."""
    chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowError(
                "reply_not_assistant",
                f"the conversation ends with a '{messages[-1]['role']}' message, not the assistant's reply",
                name,
            )
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise RowError(
            "prompt_mismatch",
            f"chosen and rejected differ at message {at}, before their last reply "
            f"({len(chosen)} and {len(rejected)} messages): they must share the prompt",
            "rejected",
        )
    prompt = chosen[:-1]
    if not prompt:
        raise RowError("missing_field", "the conversations hold only the replies, no prompt before them", "prompt")
    _check_prompt(prompt, "chosen")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages[-1]["content"].strip():
            raise RowError("empty_assistant_turn", f"the last message ({name}'s reply) is empty", name)
    return prompt, chosen[-1], rejected[-1]


def _openai_prompt(record: dict[str, Any]) -> Messages:
    value = record.get("input")
    if value is None:
        raise RowError("missing_field", "required field is missing", "input")
    if not isinstance(value, dict):
        raise RowError("wrong_type", f"expected an object with 'messages', got {_kind(value)}", "input")
    messages = value.get("messages")
    if messages is None:
        raise RowError("missing_field", "the input has no 'messages'", "input.messages")
    if not isinstance(messages, list):
        raise RowError("wrong_type", f"expected a list of messages, got {_kind(messages)}", "input.messages")
    parsed = _message_list({"input.messages": messages}, "input.messages", "role", "content", OPENAI_ROLES)
    _check_prompt(parsed, "input.messages")
    return parsed


def _label(record: dict[str, Any]) -> bool:
    value = record.get("label")
    if value is None:
        raise RowError("missing_field", "required field is missing", "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    shown = repr(shorten(value, 40)) if isinstance(value, str) else f"{shorten(str(value), 40)} ({_kind(value)})"
    raise RowError("bad_label", f"expected true (a desirable reply) or false (undesirable), got {shown}", "label")
