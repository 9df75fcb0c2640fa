"""What a model is made of, read from its ``config.json`` (and the safetensors headers when the weights are
there): sizes the memory, disk and time estimates multiply. No torch, no transformers: a 7B model's config
is read in milliseconds, with or without its weights.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError

DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1})
TORCH_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Module names of each kind of projection across families (peft's names; fused ones too).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "c_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "w1", "w2", "w3")


def _first(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder (an encoder-decoder counts both stacks in ``layers``)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_active: int = 0
    expert_intermediate: int = 0
    params: int = 0  # every parameter; exact when read from the safetensors headers
    params_exact: bool = False
    disk_bytes: int = 0  # the weight files as they are on disk (0: not there)
    disk_dtype_bytes: int = 4  # bytes per parameter of the dtype the checkpoint is saved in
    encoder_decoder: bool = False  # seq2seq (T5 ...): batches are padded, never padding-free

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def read(cls, model_dir: Path) -> ModelShape:
        """The shape of the model in ``model_dir`` (a Hugging Face folder; the weights may be missing)."""
        path = model_dir / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoratuiError(
                f"{path}: cannot read the model's config ({e})",
                hint="The estimate needs the model's config.json: `loratui models prepare` fetches it.",
            ) from None
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        shape = cls._from_config({**raw, **text})
        params, disk, dtype_bytes = _safetensors_params(model_dir)
        if params:
            return shape._with(params=params, params_exact=True, disk_bytes=disk, disk_dtype_bytes=dtype_bytes)
        on_disk = TORCH_DTYPES.get(str(_first(raw, "torch_dtype", "dtype", default="float32")), 4)
        return shape._with(params=shape.analytic_params(), disk_dtype_bytes=on_disk)

    @classmethod
    def _from_config(cls, c: dict[str, Any]) -> ModelShape:
        hidden = int(_first(c, "hidden_size", "d_model", "n_embd", "dim", default=0))
        layers = int(_first(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0))
        if c.get("is_encoder_decoder"):
            layers += int(_first(c, "num_decoder_layers", default=layers))
        heads = int(_first(c, "num_attention_heads", "n_head", "num_heads", "n_heads", default=1))
        if not hidden or not layers:
            raise LoratuiError(
                "config.json names no hidden size or layer count (hidden_size, num_hidden_layers or their aliases)",
                hint="The estimate reads decoder configs as transformers writes them.",
            )
        experts = int(_first(c, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
        intermediate = int(_first(c, "intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden))
        return cls(
            model_type=str(c.get("model_type", "unknown")),
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=int(_first(c, "num_key_value_heads", "n_head_kv", default=heads)),
            head_dim=int(_first(c, "head_dim", "d_kv", default=hidden // heads)),
            vocab=int(_first(c, "vocab_size", default=32000)),
            tied=bool(c.get("tie_word_embeddings", True)),
            experts=experts,
            experts_active=int(_first(c, "num_experts_per_tok", "num_experts_per_token", default=2)) if experts else 0,
            expert_intermediate=int(
                _first(c, "moe_intermediate_size", "expert_intermediate_size", default=intermediate)
            ),
            encoder_decoder=bool(c.get("is_encoder_decoder")),
        )

    def _with(self, **changes: Any) -> ModelShape:
        return ModelShape(**{**self.__dict__, **changes})

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of each projection of one layer, by kind (``attention``, ``mlp``, ``experts``)."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        if self.experts:
            i = self.expert_intermediate
            return {"attention": attention, "mlp": [], "experts": [(h, i), (h, i), (i, h)] * self.experts}
        i = self.intermediate
        return {"attention": attention, "mlp": [(h, i), (h, i), (i, h)], "experts": []}

    def analytic_params(self) -> int:
        """Parameters counted from the config (gated MLPs; used when the weights are not here)."""
        per_layer = sum(a * b for kind in self.linear_shapes().values() for a, b in kind) + 2 * self.hidden
        if self.experts:
            per_layer += self.hidden * self.experts  # the router
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' projections (what 4-bit quantization stores in 4 bits)."""
        return self.layers * sum(a * b for kind in self.linear_shapes().values() for a, b in kind)

    def lora_params(self, r: int, target: str | list[str]) -> int:
        """Parameters of a rank-``r`` adapter on ``target`` (``all-linear``, ``attention``, ``mlp`` or names)."""
        shapes = self.linear_shapes()
        if target == "all-linear":
            chosen = shapes["attention"] + shapes["mlp"] + shapes["experts"]
        elif target == "attention":
            chosen = [shapes["attention"][0], shapes["attention"][2]]  # q_proj, v_proj
        elif target == "mlp":
            chosen = shapes["mlp"] + shapes["experts"]
        else:
            names = set(target)
            attention = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), shapes["attention"], strict=True))
            mlp = dict(zip(("gate_proj", "up_proj", "down_proj"), shapes["mlp"] or shapes["experts"][:3], strict=False))
            chosen = [s for n, s in {**attention, **mlp}.items() if n in names]
            if names & {"qkv_proj", "gate_up_proj"}:
                chosen += shapes["attention"][:3] if "qkv_proj" in names else shapes["mlp"][:2]
        return self.layers * sum(r * (a + b) for a, b in chosen)

    @property
    def billions(self) -> float:
        return self.params / 1e9


def _safetensors_params(model_dir: Path) -> tuple[int, int, int]:
    """(parameters, bytes of the files, bytes per parameter of the main dtype) from the safetensors
    headers in ``model_dir``; zeros when there are none."""
    params = disk = 0
    by_dtype: dict[str, int] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            continue
        disk += file.stat().st_size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(entry["shape"])
            params += n
            by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + n
    main = max(by_dtype, key=lambda k: by_dtype[k]) if by_dtype else "F32"
    return params, disk, DTYPE_BYTES.get(main, 4)
