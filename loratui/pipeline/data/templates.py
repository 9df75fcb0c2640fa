"""Prompt templates as Jinja chat templates, rendered the way transformers renders them.

``data.template: auto`` takes the tokenizer's own chat template, or ``chatml`` when it has none.
The named templates are chat templates too, so the same one is saved with the adapter and used at
inference (transformers' ``apply_chat_template``, llama.cpp, the server): train and serve agree.

Two things a plain render would get wrong are fixed in :meth:`ChatTemplate.render`:

- The date. Templates such as Llama 3.1/3.2's and GPT-OSS's write today's date through transformers'
  Jinja global ``strftime_now``, so the same data would render differently every day (a new cache
  key, a run that cannot be reproduced). A template renders with the date recorded for the run
  (``ChatTemplate.date``, saved as ``render_date`` in ``data/dataset.json``) instead.
- Reasoning. Data carries an answer's reasoning as a leading ``<think>...</think>`` block in the
  content. Templates that read it themselves (Qwen3 and the DeepSeek-R1 distills split the content
  on ``</think>``) get the content as it is; templates that read it from a field of the message
  (``reasoning_content``, GPT-OSS's ``thinking``) get it there, so each renders the reasoning the
  way the model was trained to see it. A reply with reasoning is rendered with ``enable_thinking=True``
  where that switch changes the template's generation prompt (the R1-Qwen distill closes the think
  block unless it is set; Qwen3 and SmolLM3 think by default).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from loratui.pipeline.errors import LoratuiError

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}{% set loop_messages = messages %}"
        "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
        "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + "
        "message['content'] + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% endif %}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "phi": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


# A leading reasoning block of an assistant message: "<think>reasoning</think>answer".
THINK_BLOCK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)
# Templates that take the reasoning out of the content themselves.
_SPLITS_CONTENT = re.compile(r"""split\(\s*['"]</think>['"]\s*\)""")
# Templates that read GPT-OSS's `thinking` field of a message.
_READS_THINKING = re.compile(r"""\.thinking\b|\[\s*['"]thinking['"]\s*\]|['"]thinking['"]\s+in\b""")


def today() -> dt.date:
    """The machine's date: the render date of a run whose data step has not run yet."""
    return dt.date.today()


def has_reasoning(content: str) -> bool:
    """True when an assistant message starts with a ``<think>...</think>`` block."""
    return THINK_BLOCK.match(content) is not None


class FixedClock:
    """``strftime_now`` for a template: the recorded date at midnight, never the machine's clock.

    A class rather than a closure so that a :class:`ChatTemplate` still pickles for worker processes.
    """

    def __init__(self, date: dt.date):
        self.date = date

    def __call__(self, format: str) -> str:
        return dt.datetime.combine(self.date, dt.time()).strftime(format)


@dataclass
class ChatTemplate:
    """A compiled chat template plus the special tokens and the date it is rendered with."""

    name: str  # "tokenizer" or a named template
    source: str  # the Jinja text
    _compiled: Any
    _context: dict[str, Any]
    date: dt.date = field(default_factory=today)  # what strftime_now answers (see the module docstring)

    def __getstate__(self) -> dict[str, Any]:  # compiled Jinja does not pickle: workers recompile
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.__dict__.update(state)
        self._compiled = _compile_jinja_template(self.source)

    @property
    def uses_date(self) -> bool:
        """The template writes the date (through transformers' ``strftime_now``)."""
        return "strftime_now" in self.source

    @property
    def reasoning_field(self) -> str | None:
        """The message field this template reads reasoning from, when it does not split the content itself."""
        return _reasoning_field(self.source)

    @property
    def thinking_switch(self) -> bool:
        """The template thinks only when ``enable_thinking`` says so (R1-Qwen; not Qwen3 or SmolLM3, on by default)."""
        return "enable_thinking" in self.source and _thinking_off_by_default(
            self.source, tuple(sorted(self._context.items()))
        )

    @property
    def render_rules(self) -> str:
        """What :meth:`render` adds to a plain render of this template, for the data cache key ("" for none)."""
        rules = [f"date={self.date.isoformat()}"] if self.uses_date else []
        rules += [f"reasoning={self.reasoning_field}"] if self.reasoning_field else []
        return ";".join(rules + (["enable_thinking"] if self.thinking_switch else []))

    def adapts(self, messages: list[dict[str, str]]) -> bool:
        """True when :meth:`render` passes this conversation's reasoning on differently from a plain render."""
        return bool(self.reasoning_field or self.thinking_switch) and any(
            m["role"] == "assistant" and has_reasoning(m["content"]) for m in messages
        )

    def _with_reasoning_field(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        name = self.reasoning_field
        if name is None:
            return messages
        out = []
        for m in messages:
            found = THINK_BLOCK.match(m["content"]) if m["role"] == "assistant" and name not in m else None
            out.append({**m, name: found.group(1).strip(), "content": m["content"][found.end() :]} if found else m)
        return out

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, thinking: bool = False
    ) -> str:
        """The template's text for ``messages``; ``thinking``: the reply (being) written has reasoning."""
        extra = {"enable_thinking": True} if thinking and self.thinking_switch else {}
        text: str = self._compiled.render(
            messages=self._with_reasoning_field(messages),
            add_generation_prompt=add_generation_prompt,
            strftime_now=FixedClock(self.date),
            **extra,
            **self._context,
        )
        return text

    def reply_prompt(self, messages: list[dict[str, str]]) -> str:
        """What the model sees before writing the last message of ``messages`` (an assistant reply)."""
        return self.render(messages[:-1], add_generation_prompt=True, thinking=has_reasoning(messages[-1]["content"]))


@functools.lru_cache(maxsize=32)
def _reasoning_field(source: str) -> str | None:
    if _SPLITS_CONTENT.search(source):
        return None
    if "reasoning_content" in source:
        return "reasoning_content"
    return "thinking" if _READS_THINKING.search(source) else None


@functools.lru_cache(maxsize=32)
def _thinking_off_by_default(source: str, context: tuple[tuple[str, Any], ...]) -> bool:
    """True when ``enable_thinking=True`` changes the generation prompt for a question: the template's
    thinking mode is off unless asked for. A template that fails on the probe counts as such (the
    switch is then passed for replies with reasoning, as the mode they were written in)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(source)
    probe = [{"role": "user", "content": "?"}]
    fixed = {"strftime_now": FixedClock(dt.date(2000, 1, 1)), **dict(context)}
    try:
        plain: str = compiled.render(messages=probe, add_generation_prompt=True, **fixed)
        thinking: str = compiled.render(messages=probe, add_generation_prompt=True, enable_thinking=True, **fixed)
        return plain != thinking
    except Exception:  # noqa: BLE001 - any template error: the conservative answer
        return True


@functools.lru_cache(maxsize=32)
def content_is_opaque(source: str) -> bool:
    """True when the template only ever copies message contents into its output, unchanged.

    Then a conversation can be rendered once per *shape* (its sequence of roles) with placeholders,
    and every row of that shape is the placeholders filled with its contents (exactly what Jinja
    would render, much faster). Conservative: any filter, test, call, comparison or assignment that
    touches a message content or the message list (other than ``length``) answers False, as does a
    template that does not parse without transformers' extensions (``{% generation %}``).
    """
    from jinja2 import Environment, nodes

    try:
        tree = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except Exception:
        return False
    loop_vars = {n.target.name for n in tree.find_all(nodes.For) if isinstance(n.target, nodes.Name)}
    message_names = (
        {"messages"}
        | loop_vars
        | {n.target.name for n in tree.find_all(nodes.Assign) if isinstance(n.target, nodes.Name)}
    )

    def is_content(n: Any) -> bool:
        return (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content") or (
            isinstance(n, nodes.Getattr) and n.attr == "content"
        )

    def touches_messages(n: Any) -> bool:
        return any(isinstance(x, nodes.Name) and x.name in message_names for x in n.find_all(nodes.Name)) or (
            isinstance(n, nodes.Name) and n.name in message_names
        )

    def ok(n: Any, into_output: bool) -> bool:
        if is_content(n):
            return into_output
        if isinstance(n, (nodes.Call, nodes.Test)) or (
            isinstance(n, nodes.Filter) and n.name not in ("length", "count")
        ):
            if any(touches_messages(child) for child in n.iter_child_nodes()):
                return False
        passes = isinstance(n, (nodes.Output, nodes.Add, nodes.Concat))
        return all(ok(child, passes and not isinstance(child, nodes.Stmt)) for child in n.iter_child_nodes())

    return ok(tree, False)


def resolve_template(choice: str, tokenizer: Any, date: dt.date | None = None) -> ChatTemplate:
    """``data.template`` -> a compiled template (the tokenizer's own for ``auto`` when it has one).

    ``date``: the date the template writes where it asks for today's (default: the machine's today).
    """
    # transformers' own compiler: the same Jinja environment (sandbox, trim_blocks, raise_exception,
    # tojson, the generation tag) that apply_chat_template uses; tests/pipeline/data checks they agree.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        name, source = ("tokenizer", own) if isinstance(own, str) and own else ("chatml", NAMED_TEMPLATES["chatml"])
    elif choice in NAMED_TEMPLATES:
        name, source = choice, NAMED_TEMPLATES[choice]
    else:
        raise LoratuiError(
            f"data.template: unknown template {choice!r}", hint=f"Use auto or one of {', '.join(NAMED_TEMPLATES)}."
        )
    try:
        compiled = _compile_jinja_template(source)
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        raise LoratuiError(f"the {name} chat template does not compile: {e}") from None
    context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    context.setdefault("bos_token", "")
    context.setdefault("eos_token", "")
    return ChatTemplate(name, source, compiled, context, date or today())
