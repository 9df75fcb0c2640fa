"""Prompt templates as Jinja chat templates, rendered the way transformers renders them.

``data.template: auto`` takes the tokenizer's own chat template, or ``chatml`` when it has none.
The named templates are chat templates too, so the same one is saved with the adapter and used at
inference (transformers' ``apply_chat_template``, llama.cpp, the server): train and serve agree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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


@dataclass
class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with."""

    name: str  # "tokenizer" or a named template
    source: str  # the Jinja text
    _compiled: Any
    _context: dict[str, Any]

    def __getstate__(self) -> dict[str, Any]:  # compiled Jinja does not pickle: workers recompile
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.__dict__.update(state)
        self._compiled = _compile_jinja_template(self.source)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._context)


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
    message_names = {"messages"} | loop_vars | {
        n.target.name for n in tree.find_all(nodes.Assign) if isinstance(n.target, nodes.Name)}

    def is_content(n: Any) -> bool:
        return ((isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content")
                or (isinstance(n, nodes.Getattr) and n.attr == "content"))

    def touches_messages(n: Any) -> bool:
        return any(isinstance(x, nodes.Name) and x.name in message_names for x in n.find_all(nodes.Name)) or (
            isinstance(n, nodes.Name) and n.name in message_names)

    def ok(n: Any, into_output: bool) -> bool:
        if is_content(n):
            return into_output
        if isinstance(n, (nodes.Call, nodes.Test)) or (
                isinstance(n, nodes.Filter) and n.name not in ("length", "count")):
            if any(touches_messages(child) for child in n.iter_child_nodes()):
                return False
        passes = isinstance(n, (nodes.Output, nodes.Add, nodes.Concat))
        return all(ok(child, passes and not isinstance(child, nodes.Stmt)) for child in n.iter_child_nodes())

    return ok(tree, False)


def resolve_template(choice: str, tokenizer: Any) -> ChatTemplate:
    """``data.template`` -> a compiled template (the tokenizer's own for ``auto`` when it has one)."""
    # transformers' own compiler: the same Jinja environment (sandbox, trim_blocks, raise_exception,
    # tojson, the generation tag) that apply_chat_template uses; tests/pipeline/data checks they agree.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        name, source = ("tokenizer", own) if isinstance(own, str) and own else ("chatml", NAMED_TEMPLATES["chatml"])
    elif choice in NAMED_TEMPLATES:
        name, source = choice, NAMED_TEMPLATES[choice]
    else:
        raise LoratuiError(f"data.template: unknown template {choice!r}",
                           hint=f"Use auto or one of {', '.join(NAMED_TEMPLATES)}.")
    try:
        compiled = _compile_jinja_template(source)
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        raise LoratuiError(f"the {name} chat template does not compile: {e}") from None
    context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    context.setdefault("bos_token", "")
    context.setdefault("eos_token", "")
    return ChatTemplate(name, source, compiled, context)
