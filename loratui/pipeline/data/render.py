"""Rendering chats through their chat template, with the character spans the loss trains on.

A chat is rendered once through its chat template. The span of each
assistant turn is found by rendering the conversation up to that turn with the generation prompt
(what the model sees before answering) and up to the end of that turn: the difference is exactly
what the model must produce, including the template's end-of-turn token (:mod:`.encode` trains the
tokens that start inside such a span). If the template does not end the last answer with EOS, EOS is
appended and trained, so the model learns to stop.

That needs a template whose render of a conversation starts with its render of every shorter one.
Many rewrite earlier turns instead: Qwen3 shows the reasoning only after the last question, Phi-3.5
appends EOS only at the end, GPT-OSS ends the last answer with ``<|return|>`` and earlier ones with
``<|end|>``, the DeepSeek-R1 distills strip the reasoning from every answer. A row such a template
renders inconsistently becomes one example per assistant turn (:func:`render_examples`): the
conversation up to that turn, rendered as if it were the last (exactly what the model sees when it
writes that reply), with only that reply trained. Where a generation prompt opens a think block
(``<think>\n``, R1), the reply is what the model writes after it: the reasoning, the answer, the end
of turn. Where it closes an empty reasoning block instead (Gemma 4's ``<|channel>thought\n<channel|>``),
or the template writes the earlier conversation differently before a question than before a reply
(Mistral Nemo puts the system prompt into the last question only), the example is that generation
prompt followed by the reply as the template writes it. The examples of a row are numbered by
``chunk`` from its last turn (0, the whole conversation, as before) backwards, so evaluation still
generates one reply per row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from loratui.pipeline.data.templates import ChatTemplate, has_reasoning
from loratui.pipeline.errors import LoratuiError

Spans = list[tuple[int, int]]
# One example of a row: its text, the character spans to train, and how many of the row's messages it holds.
Rendered = tuple[str, Spans, int]
# A chat row (messages, "file, row N" for errors) -> its examples: render_examples, or a ShapeRenderer.
Render = Callable[[list[dict[str, str]], str], list[Rendered]]

# What a generation prompt may add after the start of the reply the template renders: a think block
# opened for the model to reason in, or an empty reasoning block closed (the thinking mode is off:
# R1-Qwen's think block, Gemma 4's thought channel).
_OPENS_THINK = re.compile(r"<think>(\s*)")
_CLOSED_THINK = re.compile(r"<think>\s*</think>\s*|<\|channel>thought\s*<channel\|>\s*")
_OPENING_TAG = re.compile(r"\s*<think>")
_PROBE = "\x00loratui-reply\x00"


class RewritesEarlierTurns(LoratuiError):
    """The template renders a conversation differently from its own prefixes: one render cannot hold every turn."""


def render_chat(
    messages: list[dict[str, str]], template: ChatTemplate, eos: str, train_on_prompt: bool
) -> tuple[str, Spans]:
    """The rendered text and the character spans to train on (the reference implementation).

    An assistant span runs from the end of the generation prompt to the end of its turn: through the
    last EOS inside the turn when the template writes one there, else to the turn's end; when the
    last answer has no EOS, EOS is appended and trained. Raises :class:`RewritesEarlierTurns` when
    one render cannot be split into the turns (then :func:`render_examples` renders per turn).
    """
    flags = {has_reasoning(m["content"]) for m in messages if m["role"] == "assistant"}
    if template.thinking_switch and len(flags) > 1:  # one render cannot switch thinking per reply
        raise _rewrites(template)
    thinking = flags == {True}
    full = template.render(messages, thinking=thinking)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True, thinking=thinking)
        upto = full if k == len(messages) - 1 else template.render(messages[: k + 1], thinking=thinking)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise _rewrites(template)
        start = len(before)
        end = upto.rfind(eos, start) if eos else -1
        spans.append((start, end + len(eos) if end >= 0 else len(upto)))
    if eos and spans and eos not in full[spans[-1][0] : spans[-1][1]]:
        full += eos
        spans[-1] = (spans[-1][0], len(full))
    if train_on_prompt:
        spans = [(0, len(full))]
    return full, spans


def _rewrites(template: ChatTemplate) -> RewritesEarlierTurns:
    return RewritesEarlierTurns(
        f"the {template.name} chat template renders a conversation differently from its own prefixes, "
        "so the assistant turns cannot be located in one render"
    )


def render_turn(
    messages: list[dict[str, str]], k: int, template: ChatTemplate, eos: str, train_on_prompt: bool, where: str = ""
) -> tuple[str, Spans]:
    """``messages[:k + 1]`` as the model sees it when it writes reply ``k``, with only that reply trained.

    The text is the template's render of the conversation ending with reply ``k``; the trained span
    starts where the generation prompt (:meth:`ChatTemplate.reply_prompt`) ends and runs to the end of
    the turn, with the same EOS rules as :func:`render_chat`. When the generation prompt is not the
    start of that render, see :func:`_after_generation_prompt`. ``where`` (file, row) goes into errors.
    """
    prompt = template.reply_prompt(messages[: k + 1])
    text = template.render(messages[: k + 1], thinking=has_reasoning(messages[k]["content"]))
    if not text.startswith(prompt):
        text = _after_generation_prompt(messages, k, template, prompt, text, where)
    start = len(prompt)
    found = text.rfind(eos, start) if eos else -1
    end = found + len(eos) if found >= 0 else len(text)
    if eos and eos not in text[start:end]:
        text += eos
        end = len(text)
    return text, [(0, len(text)) if train_on_prompt else (start, end)]


def _after_generation_prompt(
    messages: list[dict[str, str]], k: int, template: ChatTemplate, prompt: str, text: str, where: str
) -> str:
    """The text for reply ``k`` when the generation prompt is not the start of the rendered reply.

    The example is what the model sees at inference, the generation prompt, followed by the reply it
    must write there. A probe reply locates where the template starts writing the reply (the head);
    the reply is what the render holds after the head. The prompt must end where the head ends:

    - It may hold the head as it is, or the head with text inserted before its end: the template
      renders the earlier conversation differently when it ends with a question (Mistral Nemo writes
      the system prompt into the last question only, so no finished turn shows it).
    - After the head it may add an empty, closed reasoning block (the thinking mode is off: R1-Qwen's
      ``<think>\n\n</think>\n\n``, Gemma 4's ``<|channel>thought\n<channel|>``); the reply is then what
      the template writes for the message. Or it may open a think block (R1), which the model fills
      with its reasoning: the reply is the message's own ``<think>`` block and answer (without the
      opening the prompt already holds) followed by what the template writes after a reply.

    Anything else is an error naming the row: the reply cannot be placed after the prompt faithfully.
    """
    thinking = has_reasoning(messages[k]["content"])
    probe = template.render([*messages[:k], {"role": "assistant", "content": _PROBE}], thinking=thinking)
    at = probe.find(_PROBE)
    head = probe[:at] if at >= 0 and text.startswith(probe[:at]) else None
    added = _added_after(prompt, head) if head is not None else None
    origin = f"{where}: " if where else ""
    if head is not None and added is not None and (added == "" or _CLOSED_THINK.fullmatch(added)):
        return prompt + text[len(head) :]
    opened = _OPENS_THINK.fullmatch(added) if added is not None else None
    if opened is None:
        raise LoratuiError(
            f"{origin}the {template.name} chat template renders the conversation before assistant message {k} "
            "with a generation prompt that is not how it renders that message, so the reply cannot be located",
            hint="Choose a named template with data.template (chatml, alpaca, llama2, phi).",
        )
    content = messages[k]["content"]
    tag = _OPENING_TAG.match(content)
    if tag is None:
        raise LoratuiError(
            f"{origin}the {template.name} chat template opens a think block for every reply ({added!r}), "
            f"but assistant message {k} has no reasoning, so there is nothing faithful to train after it",
            hint="Start each assistant message with its reasoning, as '<think>...</think>' before the answer, "
            "or choose a template without a thinking mode with data.template.",
        )
    reply = content[tag.end() :]
    space = opened.group(1)  # the prompt's own whitespace after <think> stands for the message's
    reply = reply[len(space) :] if reply.startswith(space) else reply.lstrip()
    return prompt + reply + probe[at + len(_PROBE) :]


def _added_after(prompt: str, head: str) -> str | None:
    """What ``prompt`` holds after the end of ``head``, the render up to where a reply starts.

    The prompt starts with the head, or is the head with text inserted before its end (everything of
    the head after the first difference comes back, in one piece, later in the prompt); else None.
    """
    if prompt.startswith(head):
        return prompt[len(head) :]
    same = len(os.path.commonprefix([prompt, head]))
    rest = head[same:]
    found = prompt.rfind(rest)
    return prompt[found + len(rest) :] if found >= same else None


def render_examples(
    messages: list[dict[str, str]], template: ChatTemplate, eos: str, train_on_prompt: bool, where: str = ""
) -> list[Rendered]:
    """A chat row's examples: one (:func:`render_chat`) or, when its template rewrites earlier turns,
    one per assistant turn (:func:`render_turn`). With ``train_on_prompt`` the latter is only the last
    turn's, the whole conversation trained in full. Template errors name the row (``where``)."""
    from jinja2 import TemplateError

    try:
        try:
            return [(*render_chat(messages, template, eos, train_on_prompt), len(messages))]
        except RewritesEarlierTurns:
            pass
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        return [
            (*render_turn(messages, k, template, eos, train_on_prompt, where), k + 1)
            for k in (turns[-1:] if train_on_prompt else turns)
        ]
    except TemplateError as e:
        raise LoratuiError(
            f"{where + ': ' if where else ''}the {template.name} chat template cannot render this conversation: {e}"
        ) from None


_SLOT = re.compile("\x00(\\d+)\x00")


class ShapeRenderer:
    """Renders chats by filling placeholders into one Jinja render per role sequence.

    Used only for templates that copy contents verbatim (``content_is_opaque``); a row whose content
    holds the EOS text or a NUL character, whose reasoning the template takes in another way
    (:meth:`ChatTemplate.adapts`), or whose shape the template renders inconsistently takes the
    reference path. Output is identical to :func:`render_examples` (tested).
    """

    def __init__(self, template: ChatTemplate, eos: str, train_on_prompt: bool):
        self.template, self.eos, self.train_on_prompt = template, eos, train_on_prompt
        self._shapes: dict[tuple[str, ...], tuple[list[str | int], Spans] | None] = {}

    def _shape(self, roles: tuple[str, ...]) -> tuple[list[str | int], Spans] | None:
        if roles not in self._shapes:
            probe = [{"role": r, "content": f"\x00{i}\x00"} for i, r in enumerate(roles)]
            try:
                full, spans = render_chat(probe, self.template, self.eos, self.train_on_prompt)
            except RewritesEarlierTurns:
                self._shapes[roles] = None
                return None
            pieces: list[str | int] = []
            for i, part in enumerate(_SLOT.split(full)):
                pieces.append(int(part) if i % 2 else part)
            self._shapes[roles] = (pieces, spans)
        return self._shapes[roles]

    def __call__(self, messages: list[dict[str, str]], where: str = "") -> list[Rendered]:
        contents = [m["content"] for m in messages]
        shape = None
        if not (any(self.eos and self.eos in c or "\x00" in c for c in contents) or self.template.adapts(messages)):
            shape = self._shape(tuple(m["role"] for m in messages))
        if shape is None:
            return render_examples(messages, self.template, self.eos, self.train_on_prompt, where)
        pieces, spans = shape
        # probe position p -> real position: add the growth of every slot that ends before p
        out, probe_pos, shift, moved = [], 0, 0, []
        for piece in pieces:
            if isinstance(piece, int):
                text = contents[piece]
                placeholder = len(str(piece)) + 2
                probe_pos += placeholder
                shift += len(text) - placeholder
                moved.append((probe_pos, shift))
            else:
                text = piece
                probe_pos += len(piece)
            out.append(text)

        def real(p: int) -> int:
            delta = 0
            for end, total in moved:
                if end > p:
                    break
                delta = total
            return p + delta

        return [("".join(out), [(real(a), real(b)) for a, b in spans], len(messages))]
