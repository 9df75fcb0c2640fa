"""An Ollama Modelfile beside a GGUF: ``FROM``, the chat format as an Ollama (Go) ``TEMPLATE``, the default
system prompt, and ``PARAMETER stop`` for the end-of-turn tokens, so the model stops talking.

The model's Jinja chat template is matched against the formats loratui knows (rendering the same
conversations with both); a template that matches none gets no ``TEMPLATE`` line, and Ollama falls
back to the template embedded in the GGUF.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Ollama templates for the role-tag formats: system from .System, then the user and assistant turns.
_ROLE_TAG = (
    "{{{{- if .System }}}}{open}system{sep}{{{{ .System }}}}{close}\n{{{{ end }}}}"
    '{{{{- range .Messages }}}}{{{{- if or (eq .Role "user") (eq .Role "assistant") }}}}'
    "{open}{{{{ .Role }}}}{sep}{{{{ .Content }}}}{close}\n{{{{ end }}}}{{{{- end }}}}{open}assistant{sep}"
)
GO_TEMPLATES = {
    "chatml": _ROLE_TAG.format(open="<|im_start|>", sep="\n", close="<|im_end|>"),
    "phi": _ROLE_TAG.format(open="<|", sep="|>\n", close="<|end|>"),
}
PROBE = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-TEXT"},
    {"role": "assistant", "content": "ASSISTANT-TEXT"},
    {"role": "user", "content": "SECOND-TEXT"},
]


def family(template: Any) -> str | None:
    """The known format the model's chat template renders identically to, or None."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from loratui.pipeline.data.templates import NAMED_TEMPLATES

    try:
        got = template.render(PROBE, add_generation_prompt=True)
    except Exception:  # a template that cannot render a plain conversation: leave it to Ollama
        return None
    for name in GO_TEMPLATES:
        named = _compile_jinja_template(NAMED_TEMPLATES[name])
        if named.render(messages=PROBE, add_generation_prompt=True, **template._context) == got:
            return name
    return None


def stop_tokens(tokenizer: Any, template: Any) -> list[str]:
    """EOS and the special tokens the chat template writes (``<|im_end|>``, ``<|im_start|>``, ``<|end|>`` ...)."""
    found = [t for t in tokenizer.all_special_tokens if t and t in template.source and t != tokenizer.bos_token]
    return list(dict.fromkeys([t for t in [tokenizer.eos_token, *found] if t]))


def default_system(template: Any, name: str | None) -> str | None:
    """The system prompt the template adds when a conversation has none (SmolLM2's, for example)."""
    if name != "chatml":
        return None
    text = template.render([{"role": "user", "content": "USER-TEXT"}], add_generation_prompt=True)
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def modelfile(
    gguf_name: str, template: Any, stop_tokens: list[str], adapter: str | None = None, file_name: str | None = None
) -> str:
    """The Modelfile ``file_name`` (default: the GGUF's name) for ``gguf_name`` and, if given, a LoRA GGUF
    ``adapter`` on top of it; the GGUF files lie beside it."""
    name = family(template)
    own = file_name or f"{gguf_name.removesuffix('.gguf')}.Modelfile"
    lines = [
        f"# Ollama Modelfile written by loratui: `ollama create <name> -f {own}`",
        f"FROM ./{gguf_name}",
        *([f"ADAPTER ./{adapter}"] if adapter else []),
    ]
    if name:
        lines.append(f'TEMPLATE """{GO_TEMPLATES[name]}"""')
        system = default_system(template, name)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# The chat template matches no format loratui knows: Ollama uses the one inside the GGUF.")
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"
