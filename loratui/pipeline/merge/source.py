"""What the merge step folds into the base: the adapter (and the adapters stacked under it), the base's
tokenizer with the adapter's chat template, and the refusal of a base stored quantized."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.train.history import AdapterVersion


@dataclass
class Source:
    """What gets merged."""

    adapter: Path
    stack: list[Path]
    meta: AdapterVersion | None  # the adapter's loratui.json, None for an adapter from elsewhere


def resolve_source(cfg: RunConfig, run: RunDir) -> Source:
    path = Path(cfg.merge.adapter).expanduser() if cfg.merge.adapter else run.adapter
    if not (path / "adapter_config.json").is_file():
        if cfg.merge.adapter:
            raise LoratuiError(f"merge.adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")
        raise LoratuiError(
            f"{path}: there is no trained adapter to merge",
            hint="Run `loratui train --config <file>` first, or set merge.adapter.",
        )
    meta = AdapterVersion.load(path)
    stack = meta.stack_folders() if meta is not None else []
    for p in stack:
        if not (p / "adapter_config.json").is_file():
            raise LoratuiError(
                f"{path} was trained on top of {p} (a stack run), which is missing",
                hint="Restore that adapter version (`loratui train history`), then merge again.",
            )
    return Source(path, stack, meta)


def adapter_digest(source: Source) -> str:
    """SHA-256 over the adapter's config and weights, and those of every adapter stacked under it, in merge
    order: what the merged weights are made of (the version number alone does not survive a re-created run)."""
    h = hashlib.sha256()
    for folder in [*source.stack, source.adapter]:
        names = sorted(
            p.name for p in folder.iterdir() if p.name == "adapter_config.json" or p.name.startswith("adapter_model.")
        )
        for name in names:
            h.update(name.encode() + b"\0")
            with (folder / name).open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\1")
    return h.hexdigest()


def refuse_quantized(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else "?")
        raise LoratuiError(
            f"{model_dir} is stored quantized ({method}): merging into quantized weights rounds the adapter away",
            hint="Set model.base to the unquantized original of this model (QLoRA adapters merge into it "
            "exactly), or serve base + adapter without merging.",
        )


def tokenizer_for(cfg: RunConfig, run: RunDir, model_dir: Path, task: str, events: EventSink) -> Any:
    """The base tokenizer, carrying the chat template the adapter was trained with (``data.template``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    if task != "causal":
        return tokenizer
    has_data = (run.data / DatasetManifest.FILE).is_file()
    source = DatasetManifest.load(run.data).chat_template if has_data else None
    if not source:
        from loratui.pipeline.data.templates import resolve_template

        source = resolve_template(cfg.data.template, tokenizer).source
    if source != getattr(tokenizer, "chat_template", None):
        events.log("the merged tokenizer carries the chat template the adapter was trained with")
        tokenizer.chat_template = source
    return tokenizer
