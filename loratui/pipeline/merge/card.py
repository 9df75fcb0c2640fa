"""The merged model's card (README.md): provenance, training settings, parity and evaluation figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.merge.parity import Parity
from loratui.pipeline.merge.source import Source
from loratui.pipeline.runs import RunDir
from loratui.pipeline.train.history import AdapterVersion


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {json.dumps(i)}" for i in items)


def _eval_table(run: RunDir, source: Source) -> list[str]:
    path = run.eval / "metrics.json"
    if not path.is_file():
        return ["No evaluation yet: `loratui eval --config <file>` writes one, and a later merge puts it here."]
    data = json.loads(path.read_text(encoding="utf-8"))
    evaluated = data.get("target", {})
    version = source.meta.version if source.meta is not None else None
    if Path(str(evaluated.get("path"))).resolve() != source.adapter.resolve() or evaluated.get("version") != version:
        return [
            f"The run's evaluation (`eval/metrics.json`) scored {evaluated.get('path')} (version "
            f"{evaluated.get('version')}), not this adapter: run `loratui eval` again for its figures."
        ]
    main = next((d for d in data.get("datasets", []) if d.get("name") == "main"), None)
    if not main:
        return ["The evaluation file has no main dataset."]
    models = list(main["models"])
    keys = [k for k in main["models"][models[-1]]["metrics"]]
    lines = [
        f"{main['split']} split of `{main['source']}`, {main['rows']} rows, greedy decoding "
        f"(from `eval/metrics.json`; the adapter version evaluated: {data.get('target', {}).get('version')}):",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for k in keys:
        cells = []
        for m in models:
            v = main["models"][m]["metrics"].get(k)
            cells.append("-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _front_matter(cfg: RunConfig, task: str, method: str | None, builtin: Any, base_id: str) -> list[str]:
    """The Hub's YAML metadata, the title and how to load the model."""
    pipeline_tag = "text2text-generation" if task == "seq2seq" else "text-generation"
    on_hub = bool(builtin and builtin.hub_id) or (cfg.model.base.count("/") == 1 and not Path(cfg.model.base).exists())
    tags = list(dict.fromkeys(["loratui", "peft", "lora", "merged"] + ([method] if method else [])))
    return [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        *([f"base_model: {json.dumps(base_id)}"] if on_hub else []),  # Hub metadata: an id, never a local path
        "tags:" + _yaml_list(tags),
        "---",
        "",
        f"# {cfg.name} (merged)",
        "",
    ]


def _usage(cfg: RunConfig, task: str, method: str) -> list[str]:
    auto_class = "AutoModelForSeq2SeqLM" if task == "seq2seq" else "AutoModelForCausalLM"
    remote = ", trust_remote_code=True" if cfg.model.trust_remote_code else ""
    return [
        f"`{cfg.model.base}` with a {method} adapter folded into its weights by loratui. "
        "It loads with plain transformers, no peft needed:",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'model = {auto_class}.from_pretrained("path/to/merged"{remote})',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/merged"{remote})',
        "```",
        "",
    ]


def _provenance(
    cfg: RunConfig, source: Source, meta: AdapterVersion, model_dir: Path, dtype: str, builtin: Any, base_id: str
) -> list[str]:
    data = meta.data or {}
    return [
        "## Provenance",
        "",
        f"- Base model: `{cfg.model.base}` (loaded from `{model_dir}`)"
        + (f"; loratui's built-in import of `{base_id}` ({builtin.description})" if builtin else ""),
        f"- Adapter: `{source.adapter}`" + (f", version {meta.version}" if meta.version is not None else ""),
        f"- Training mode: {meta.mode if 'mode' in meta.model_fields_set else 'unknown'}"
        + (f"; merged first, in order: {', '.join(f'`{p}`' for p in source.stack)}" if source.stack else ""),
        f"- Data: `{data.get('source', cfg.data.source)}` (data hash `{data.get('cache_key', 'unknown')}`)",
        f"- Weights: {dtype} safetensors, shards of at most {cfg.merge.max_shard_size}",
        "",
    ]


def _training(meta: AdapterVersion, adapter: dict[str, Any], method: str) -> list[str]:
    targets = adapter.get("target_modules") or []
    lines = [
        "## Training settings",
        "",
        f"- {method}, rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, target modules "
        f"`{', '.join(sorted(targets)) if isinstance(targets, list) else targets}`"
        + (", DoRA" if adapter.get("use_dora") else "")
        + (", rsLoRA" if adapter.get("use_rslora") else "")
        + (f", also trained: `{', '.join(adapter['modules_to_save'])}`" if adapter.get("modules_to_save") else ""),
    ]
    if "lr" in meta.model_fields_set:
        steps = meta.steps if "steps" in meta.model_fields_set else "?"
        lines.append(
            f"- Learning rate {meta.lr}, epochs {meta.epochs}, {steps} optimizer "
            f"steps, effective batch {meta.effective_batch}"
        )
    if meta.objective not in (None, "sft"):  # a preference stage; its earlier stages are listed in stack
        lines.append(f"- Objective {meta.objective.upper()}, beta {meta.beta}" + _on_top(meta))
    metrics = meta.metrics
    last, best = metrics.get("train_loss_last"), metrics.get("eval_loss_best")
    if last is not None:
        lines.append(
            f"- Train loss {metrics.get('train_loss_first', float('nan')):.4f} -> {last:.4f}"
            + (f", best eval loss {best:.4f}" if best is not None else "")
        )
    return lines


def _on_top(meta: AdapterVersion) -> str:
    if not meta.stack:
        return ""
    return ", on top of " + " + ".join(f"v{x}" if isinstance(x, int) else str(x) for x in meta.stack) + " (merged)"


def _parity(parity: Parity | None) -> list[str]:
    if parity is None:
        return ["## Parity check", "", "Not run (`merge.parity: false`)."]
    return [
        "## Parity check",
        "",
        f"Logits of base + adapter (unmerged) against this merged model as written, on {parity.examples} "
        f"examples ({parity.positions} positions): max |difference| {parity.max_abs_diff:.3g} "
        f"(tolerance {parity.tolerance:.3g}; the logits' scale {parity.scale:.3g}, the adapter changes them "
        f"by up to {parity.adapter_effect:.3g}), top-1 agreement "
        f"{parity.top1_agreement:.1%}.",
    ]


def model_card(
    cfg: RunConfig, run: RunDir, source: Source, model_dir: Path, dtype: str, parity: Parity | None, task: str
) -> str:
    from loratui.pipeline.models import BUILTINS

    meta = source.meta or AdapterVersion()
    adapter = json.loads((source.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    raw = meta.method or ("dora" if adapter.get("use_dora") else "lora")
    method = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}.get(raw, raw)
    builtin = BUILTINS.get(cfg.model.base)
    base_id = builtin.hub_id if builtin and builtin.hub_id else cfg.model.base
    lines = [
        *_front_matter(cfg, task, meta.method, builtin, base_id),
        *_usage(cfg, task, method),
        *_provenance(cfg, source, meta, model_dir, dtype, builtin, base_id),
        *_training(meta, adapter, method),
        "",
        *_parity(parity),
        "",
        "## Evaluation",
        "",
        *_eval_table(run, source),
    ]
    return "\n".join(lines).rstrip() + "\n"
