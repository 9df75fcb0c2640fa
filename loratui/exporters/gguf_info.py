"""``loratui inspect model.gguf``: what a GGUF holds, read with the gguf package (no model is loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError


def _value(field: Any) -> Any:
    """A scalar, string or short list from a GGUFReader field."""
    from gguf import GGUFValueType

    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    if kinds[0] == GGUFValueType.ARRAY:
        return len(field.data)
    return field.parts[-1].tolist()[0]


def summary(path: str | Path) -> dict[str, Any]:
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    path = Path(path)
    if not path.is_file():
        raise LoratuiError(f"{path}: no such file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # not a GGUF, or a truncated one
        raise LoratuiError(f"{path}: not a readable GGUF file ({e})") from None
    fields = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    file_type = fields.get("general.file_type")
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = fields.get(key)
        if i is None or tokens is None or i >= len(tokens.data):
            return None
        return f"{i} {bytes(tokens.parts[tokens.data[i]]).decode('utf-8', errors='replace')!r}"

    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "type": fields.get("general.type", "model"),
        "architecture": arch,
        "name": fields.get("general.name"),
        "file_type": LlamaFileType(file_type).name if file_type is not None else None,
        "tensors": len(reader.tensors),
        "tensor_types": dict(types.most_common()),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "context_length": fields.get(f"{arch}.context_length"),
        "layers": fields.get(f"{arch}.block_count"),
        "embedding_length": fields.get(f"{arch}.embedding_length"),
        "lora_alpha": fields.get("adapter.lora.alpha"),
        "lora_rank": next((int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")), None),
        "lora_targets": sorted(
            {
                t.name.split(".")[-3] if t.name.startswith("blk.") else t.name.split(".")[0]
                for t in reader.tensors
                if t.name.endswith(".lora_a")
            }
        ),
        "tokenizer": {
            "model": fields.get("tokenizer.ggml.model"),
            "pre": fields.get("tokenizer.ggml.pre"),
            "tokens": len(tokens.data) if tokens is not None else None,
            "bos": token("tokenizer.ggml.bos_token_id"),
            "eos": token("tokenizer.ggml.eos_token_id"),
            "add_bos": fields.get("tokenizer.ggml.add_bos_token"),
        },
        "chat_template": fields.get("tokenizer.chat_template"),
    }


def render(info: dict[str, Any]) -> str:
    def size(n: int) -> str:
        return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"

    t = info["tokenizer"]
    lines = [
        f"{info['file']}  ({size(info['bytes'])}, {info['type']})",
        f"  architecture   {info['architecture']}  {info['name'] or ''}".rstrip(),
        f"  quantization   {info['file_type'] or '-'}; tensors {info['tensors']}: "
        + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()),
    ]
    if info["type"] == "adapter":  # a LoRA GGUF: no tokenizer, applied to a base model of the architecture
        lines += [
            f"  parameters     {info['parameters']:,}",
            f"  LoRA           alpha {info['lora_alpha']}, rank {info['lora_rank']}, on "
            + ", ".join(info["lora_targets"]),
            f"  use            llama-cli -m <{info['architecture']} base>.gguf --lora {Path(info['file']).name}",
        ]
        return "\n".join(lines)
    lines.append(
        f"  parameters     {info['parameters']:,}  (layers {info['layers']}, width {info['embedding_length']}, "
        f"context {info['context_length']})"
    )
    lines.append(
        f"  tokenizer      {t['model']} (pre {t['pre']}), {t['tokens']} tokens, bos {t['bos']}, eos {t['eos']}, "
        f"add_bos {t['add_bos']}"
    )
    template = info["chat_template"]
    lines.append("  chat template  " + ("none" if not template else f"{len(template)} characters:"))
    if template:
        lines += ["    " + line for line in template.splitlines()]
    return "\n".join(lines)
