"""The whole run on one page: ``runs/<name>/report.md`` and ``report.html`` (plots embedded).

Written from what the steps left on disk, after every step that finishes (so it is current whichever
face ran the step), and only from those files: data/report.json, the current adapter version in
adapters/history.json, eval/metrics.json and its plots, exports/report.md and the artifacts themselves. Sections for steps that
have not run yet are left out. Never fails a step: a report that cannot be written is a warning.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.runs import RunDir, atomic_write_text

_PLOTS = (("eval/plots/loss.png", "Training and validation loss"), ("eval/plots/metrics.png", "Base vs tuned"))
_HIGHER_IS_BETTER = {"loss": False, "perplexity": False}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"
    return "" if value is None else str(value)


def _data_section(run: RunDir) -> list[str]:
    from loratui.pipeline.data.manifest import DataReport

    try:
        report = DataReport.load(run.data)
    except (OSError, ValueError):
        return []
    rows, per_epoch = report.rows, report.tokens.per_epoch if report.tokens is not None else 0
    max_length = report.max_length if "max_length" in report.model_fields_set else None  # a failure report has none
    lines = [
        "## Data",
        "",
        f"{_num(rows.read)} rows read, {_num(rows.kept)} kept, {_num(rows.dropped)} dropped, "
        f"{_num(rows.truncated)} truncated; splits "
        + ", ".join(f"{k} {_num(v)}" for k, v in report.splits.items())
        + f". Template `{report.template}`, max length {max_length} tokens"
        + (f", {_num(per_epoch)} tokens per epoch" if per_epoch else "")
        + ".",
        "",
        "Files: "
        + ", ".join(f"`{f.get('path')}` ({f.get('split')}, {f.get('format')})" for f in report.files[:8])
        + ".",
        "",
        "Row by row: [data/report.md](data/report.md); examples as trained: [data/preview.txt](data/preview.txt).",
        "",
    ]
    if report.augment is not None:
        from loratui.pipeline.data.summary import augment_lines

        lines[3:3] = [*augment_lines(report), ""]
    return lines


def _train_section(run: RunDir) -> list[str]:
    from loratui.pipeline.train.history import current_version

    v = current_version(run)  # the adapter the run uses now (after a rollback too), not the last invocation
    if not v:
        return []
    m = v.metrics
    lines = [
        "## Training",
        "",
        f"Adapter version {v.version} ({v.mode}, {v.method} r={v.r} alpha={v.alpha}): "
        f"{_num(v.steps)} steps at learning rate {_num(v.lr)}, effective batch "
        f"{_num(v.effective_batch)}, {_num(m.get('tokens_per_s'))} tokens/s. Training loss "
        f"{_num(m.get('train_loss_first'))} -> {_num(m.get('train_loss_last'))}, best validation loss "
        f"{_num(m.get('eval_loss_best'))}.",
        "",
    ]
    lines += _objective_lines(v)
    lines += _estimate_lines(v)
    if (run.path / _PLOTS[0][0]).is_file() and _evaluated_version(run) in (None, v.version):
        lines += [f"![{_PLOTS[0][1]}]({_PLOTS[0][0]})", ""]
    return lines


def _objective_lines(v: Any) -> list[str]:
    """A preference objective and its last reward figures (the loss of DPO, ORPO and KTO is not an SFT loss)."""
    if v.objective in (None, "sft"):
        return []
    m = v.metrics
    figures = [
        f"{what} {_num(m.get(key))}"
        for what, key in (
            ("reward accuracy", "reward_accuracy_last"),
            ("reward margin", "reward_margin_last"),
            ("validation reward accuracy", "eval_reward_accuracy_last"),
            ("validation reward margin", "eval_reward_margin_last"),
        )
        if m.get(key) is not None
    ]
    said = f"Objective **{v.objective}** (beta {_num(v.beta)})"
    return [f"{said}: last {', '.join(figures)}." if figures else f"{said}.", ""]


def _estimate_lines(v: Any) -> list[str]:
    """What the estimate said before the first step, beside what training measured."""
    e, m = v.estimate, v.metrics
    if not e:
        return []

    def mib(n: Any) -> str:
        return f"{n / 2**20:,.0f} MiB" if isinstance(n, (int, float)) else "-"

    def secs(n: Any) -> str:
        return f"{n:,.0f} s" if isinstance(n, (int, float)) else "-"

    peak = "peak resident memory" if e.get("device") == "cpu" else "peak GPU memory"
    return [
        f"| before training ({e.get('source')} estimate, {e.get('device')}) | estimated | measured |",
        "|---|---|---|",
        f"| training time (the Trainer's) | {secs(e.get('train_seconds'))} | {secs(m.get('train_seconds'))} |",
        f"| {peak} | {mib(e.get('peak_memory_bytes'))} | {mib(m.get('peak_memory_bytes'))} |",
        "",
    ]


def _evaluated_version(run: RunDir) -> Any:
    """The adapter version whose curve eval/plots/loss.png shows (None when eval did not say): a plot of another
    version (before a rollback, or a re-train not evaluated yet) is left out of the training section."""
    metrics = _json(run.eval / "metrics.json")
    target = metrics.get("target") if isinstance(metrics, dict) else None
    return target.get("version") if isinstance(target, dict) else None


def _eval_section(run: RunDir) -> list[str]:
    metrics = _json(run.eval / "metrics.json")
    if not metrics:
        return []
    lines = ["## Evaluation: base vs tuned", ""]
    for ds in metrics.get("datasets", []):
        models = ds.get("models", {})
        base, tuned = models.get("base", {}).get("metrics", {}), models.get("tuned", {}).get("metrics", {})
        lines += [
            f"**{ds.get('name')}** (`{ds.get('source')}`, {ds.get('split')} split, {ds.get('rows')} rows, greedy)",
            "",
            "| metric | base | tuned | change |",
            "|---|---:|---:|---:|",
        ]
        for name, value in tuned.items():
            before = base.get(name)
            delta = ds.get("delta", {}).get(name)
            better = delta is not None and delta != 0 and (delta > 0) == _HIGHER_IS_BETTER.get(name, True)
            mark = "" if delta is None or delta == 0 else (" (better)" if better else " (worse)")
            lines.append(f"| {name} | {_num(before)} | {_num(value)} | {_num(delta)}{mark} |")
        lines.append("")
    lines += ["Side by side replies: [eval/comparison.md](eval/comparison.md).", ""]
    if (run.path / _PLOTS[1][0]).is_file():
        lines += [f"![{_PLOTS[1][1]}]({_PLOTS[1][0]})", ""]
    return lines


def _export_section(run: RunDir) -> list[str]:
    try:
        text = (run.exports / "report.md").read_text(encoding="utf-8")
    except OSError:
        return []
    body = re.sub(r"\A# [^\n]*\n", "", text).strip()
    body = re.sub(r"^## ", "### ", body, flags=re.M)  # one level down inside this page
    return ["## Exports", "", body, ""]


def _usage_section(cfg: RunConfig, run: RunDir) -> list[str]:
    lines = [
        *_gguf_usage(cfg, run),
        *_onnx_usage(run),
        *_python_usage(run),
    ]
    return ["## Use it", "", *lines] if lines else []


def _snippet(title: str, language: str, code: list[str]) -> list[str]:
    """A title line and a fenced code block."""
    return [title, "", f"```{language}", *code, "```", ""]


def _gguf_usage(cfg: RunConfig, run: RunDir) -> list[str]:
    gguf = sorted(run.exports.glob("gguf/*.gguf")) if run.exports.is_dir() else []
    merged_ggufs = [p for p in gguf if "-lora-" not in p.name and "-base-" not in p.name]
    lines = []
    if merged_ggufs:
        pick = next((p for p in merged_ggufs if "q4_k_m" in p.name), merged_ggufs[0])
        rel = pick.relative_to(run.path)
        modelfile = pick.with_suffix(".Modelfile")
        code = [
            f"llama-cli -m {rel} -cnv                     # chat in the terminal",
            f"llama-server -m {rel} --port 8080           # llama.cpp's own OpenAI-compatible server",
        ]
        if modelfile.is_file():
            code.append(f"ollama create {cfg.name} -f {modelfile.relative_to(run.path)} && ollama run {cfg.name}")
        lines += _snippet("llama.cpp and Ollama:", "bash", code)
    for lora in (p for p in gguf if "-lora-" in p.name):
        base = next(iter(sorted(lora.parent.glob(lora.name.split("-lora-")[0] + "-base-*.gguf"))), None)
        if base is not None:
            lines += _snippet(
                "The adapter on its base in llama.cpp:",
                "bash",
                [f"llama-cli -m {base.relative_to(run.path)} --lora {lora.relative_to(run.path)} -cnv"],
            )
    return lines


def _onnx_usage(run: RunDir) -> list[str]:
    if not (run.exports / "onnx" / "report.json").is_file():
        return []
    # the smallest folder that passed its check: a quantized one decodes faster on a CPU
    folder = next(
        (
            run.exports / name
            for name in ("onnx-int4", "onnx-int8", "onnx")
            if (run.exports / name / "genai_config.json").is_file()
        ),
        run.exports / "onnx",
    )
    return [
        *_snippet("ONNX Runtime (onnxruntime-genai), no loratui needed:", "python", genai_snippet(folder)),
        f"Batch scoring: `loratui score --model {run.exports / 'onnx'} --input rows.jsonl --output scores.jsonl`",
        "",
    ]


def _from_pretrained(module: str, names: str, folder: Path) -> list[str]:
    """Python that loads ``folder`` with the first of ``names`` (imported from ``module``)."""
    model_class = names.split(",")[0]
    return [f"from {module} import {names}", f'model = {model_class}.from_pretrained("{folder}")']


def _python_usage(run: RunDir) -> list[str]:
    """transformers for the merged model; peft and the server for the adapter."""
    lines = []
    if (run.merged / "config.json").is_file():
        load = _from_pretrained("transformers", "AutoModelForCausalLM, AutoTokenizer", run.merged)
        lines += _snippet("transformers (merged safetensors):", "python", load)
    if (run.adapter / "adapter_config.json").is_file():
        load = _from_pretrained("peft", "AutoPeftModelForCausalLM", run.adapter)
        lines += _snippet("peft (the adapter on its base):", "python", load)
        lines += _snippet(
            "An OpenAI-compatible server (picks the runtime that fits the machine):",
            "bash",
            [f"loratui serve {run.path}"],
        )
    return lines


def _data_sources(cfg: RunConfig) -> str:
    """The training data, and the validation and test files when they are separate ones."""
    from loratui.pipeline.eval.examples import split_source

    d = cfg.data
    own = [split for split, value in (("validation", d.val_source), ("test", d.test_source)) if value]
    return ", ".join([f"data `{split_source(d, 'train')}`", *(f"{split} `{split_source(d, split)}`" for split in own)])


def render_markdown(cfg: RunConfig, run: RunDir) -> str:
    head = [
        f"# Run `{cfg.name}`",
        "",
        f"Base model `{cfg.model.base}`, {cfg.lora.method} rank {cfg.lora.r} on {cfg.lora.target_modules}, "
        f"{_data_sources(cfg)}. Config: [config.yaml](config.yaml); every event: [events.jsonl](events.jsonl).",
        "",
    ]
    parts = [
        _data_section(run),
        _train_section(run),
        _eval_section(run),
        _export_section(run),
        _usage_section(cfg, run),
    ]
    return "\n".join(head + [line for part in parts for line in part]).rstrip() + "\n"


def render_html(markdown: str, run: RunDir, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(match: re.Match[str]) -> str:
        path = run.path / html.unescape(match.group(1))
        if path.suffix.lower() == ".png" and path.is_file():
            return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
        return match.group(0)

    body = re.sub(r'src="([^"]+)"', embed, body)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "td{text-align:right}td:first-child{text-align:left}code,pre{background:#f4f4f4}pre{padding:.6em;overflow:auto}"
        "img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def write_report(cfg: RunConfig, run: RunDir) -> Path:
    """Write report.md and report.html of the run (atomically) and return the Markdown path."""
    markdown = render_markdown(cfg, run)
    atomic_write_text(run.report, markdown)
    atomic_write_text(run.path / "report.html", render_html(markdown, run, f"loratui run {cfg.name}"))
    return run.report


def genai_snippet(folder: Path) -> list[str]:
    """Python that chats with an ONNX export through onnxruntime-genai alone (tests run it)."""
    return [
        "import json",
        "import onnxruntime_genai as og",
        "",
        f'model = og.Model("{folder}")',
        "tokenizer = og.Tokenizer(model)",
        'messages = [{"role": "user", "content": "Hello!"}]',
        "prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)",
        "params = og.GeneratorParams(model)",
        "params.set_search_options(max_length=512)",
        "generator = og.Generator(model, params)",
        "generator.append_tokens(tokenizer.encode(prompt))",
        "stream = tokenizer.create_stream()",
        "while not generator.is_done():",
        "    generator.generate_next_token()",
        '    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)',
    ]
