"""The merged model's card (README.md): provenance, training settings, parity and evaluation figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.runs import RunDir


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {json.dumps(i)}" for i in items)


def _eval_table(run: RunDir, source: Any) -> list[str]:
    path = run.eval / "metrics.json"
    if not path.is_file():
        return ["No evaluation yet: `loratui eval --config <file>` writes one, and a later merge puts it here."]
    data = json.loads(path.read_text(encoding="utf-8"))
    evaluated = data.get("target", {})
    if Path(str(evaluated.get("path"))).resolve() != source.adapter.resolve() or evaluated.get(
        "version"
    ) != source.meta.get("version"):
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


def model_card(cfg: RunConfig, run: RunDir, source: Any, model_dir: Path, dtype: str, parity: Any, task: str) -> str:
    meta = source.meta
    data = meta.get("data") or {}
    from loratui.pipeline.models import BUILTINS

    adapter = json.loads((source.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    targets = adapter.get("target_modules") or []
    raw = meta.get("method") or ("dora" if adapter.get("use_dora") else "lora")
    method = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}.get(raw, raw)

    pipeline_tag = "text2text-generation" if task == "seq2seq" else "text-generation"
    remote = ", trust_remote_code=True" if cfg.model.trust_remote_code else ""
    builtin = BUILTINS.get(cfg.model.base)
    base_id = builtin.hub_id if builtin and builtin.hub_id else cfg.model.base
    on_hub = bool(builtin and builtin.hub_id) or (cfg.model.base.count("/") == 1 and not Path(cfg.model.base).exists())
    tags = list(dict.fromkeys(["loratui", "peft", "lora", "merged"] + ([meta["method"]] if meta.get("method") else [])))
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        *([f"base_model: {json.dumps(base_id)}"] if on_hub else []),  # Hub metadata: an id, never a local path
        "tags:" + _yaml_list(tags),
        "---",
        "",
        f"# {cfg.name} (merged)",
        "",
        f"`{cfg.model.base}` with a {method} adapter folded into its weights by loratui. "
        "It loads with plain transformers, no peft needed:",
        "",
        "```python",
        "from transformers import "
        + ("AutoModelForSeq2SeqLM" if task == "seq2seq" else "AutoModelForCausalLM")
        + ", AutoTokenizer",
        f'model = {"AutoModelForSeq2SeqLM" if task == "seq2seq" else "AutoModelForCausalLM"}.from_pretrained("path/to/merged"{remote})',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/merged"{remote})',
        "```",
        "",
        "## Provenance",
        "",
        f"- Base model: `{cfg.model.base}` (loaded from `{model_dir}`)"
        + (f"; loratui's built-in import of `{base_id}` ({builtin.description})" if builtin else ""),
        f"- Adapter: `{source.adapter}`" + (f", version {meta['version']}" if meta.get("version") is not None else ""),
        f"- Training mode: {meta.get('mode', 'unknown')}"
        + (f"; merged first, in order: {', '.join(f'`{p}`' for p in source.stack)}" if source.stack else ""),
        f"- Data: `{data.get('source', cfg.data.source)}` (data hash `{data.get('cache_key', 'unknown')}`)",
        f"- Weights: {dtype} safetensors, shards of at most {cfg.merge.max_shard_size}",
        "",
        "## Training settings",
        "",
        f"- {method}, rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, target modules "
        f"`{', '.join(sorted(targets)) if isinstance(targets, list) else targets}`"
        + (", DoRA" if adapter.get("use_dora") else "")
        + (", rsLoRA" if adapter.get("use_rslora") else "")
        + (f", also trained: `{', '.join(adapter['modules_to_save'])}`" if adapter.get("modules_to_save") else ""),
    ]
    if "lr" in meta:
        lines.append(
            f"- Learning rate {meta['lr']}, epochs {meta.get('epochs')}, {meta.get('steps', '?')} optimizer "
            f"steps, effective batch {meta.get('effective_batch')}"
        )
    metrics = meta.get("metrics") or {}
    if metrics.get("train_loss_last") is not None:
        lines.append(
            f"- Train loss {metrics.get('train_loss_first', float('nan')):.4f} -> {metrics['train_loss_last']:.4f}"
            + (f", best eval loss {metrics['eval_loss_best']:.4f}" if metrics.get("eval_loss_best") is not None else "")
        )
    lines += ["", "## Parity check", ""]
    if parity is None:
        lines.append("Not run (`merge.parity: false`).")
    else:
        lines.append(
            f"Logits of base + adapter (unmerged) against this merged model as written, on {parity.examples} "
            f"examples ({parity.positions} positions): max |difference| {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:.3g}; the logits' scale {parity.scale:.3g}, the adapter changes them "
            f"by up to {parity.adapter_effect:.3g}), top-1 agreement "
            f"{parity.top1_agreement:.1%}."
        )
    lines += ["", "## Evaluation", ""] + _eval_table(run, source)
    return "\n".join(lines).rstrip() + "\n"
