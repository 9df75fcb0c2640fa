"""ONNX for ONNX Runtime: the merged model built by onnxruntime-genai's model builder, in fp32 and
optionally int4 and int8 (weight-only), and each folder verified in onnxruntime against the merged model in PyTorch.

```
runs/<name>/exports/onnx/        model.onnx + model.onnx.data, genai_config.json, tokenizer, chat template, configs
runs/<name>/exports/onnx-int4/   the same with int4 weights (export.onnx_quants: [int4], --onnx-quant int4)
runs/<name>/exports/onnx-int8/   ... with int8 weights (export.onnx_quants: [int8])
runs/<name>/exports/onnx/report.json   the verification figures
runs/<name>/exports/report.md          the table (one row per folder)
```
Both folders run with no loratui code: ``onnxruntime_genai.Model(dir)`` generates (its own loop, KV cache,
search options from genai_config.json), and ``onnxruntime.InferenceSession(dir + "/model.onnx")`` scores.

* Why this builder (and not optimum or ``torch.onnx.export``): it writes the graph ONNX Runtime's own
  fused CPU and CUDA kernels run (GroupQueryAttention with a KV cache, MatMulNBits for int4,
  SkipSimplifiedLayerNormalization, RotaryEmbedding), in seconds, for the decoder families users tune,
  with a generation loop that needs no PyTorch. It runs in its own process (cancellable; its memory goes
  with it). It has no encoder-decoder models: a T5/FLAN-T5/PEGASUS run is refused with the alternatives.
* int4, int8: weight-only, block-wise (blocks of 32, symmetric) for every MatMul, the builder's defaults for
  CPU (int8 activations inside MatMulNBits). int4 reads the tied embedding from the int4 lm_head; int8
  keeps an fp32 embedding table.
* The stop tokens: genai_config.json's ``eos_token_id`` becomes EOS plus the chat template's end-of-turn
  tokens (the Modelfile's rule), so onnxruntime-genai stops where the trained model does.
* Verification (``export.verify``): on ``export.verify_samples`` test rows, the largest logit difference and
  the teacher-forced top-1 agreement with the merged model, perplexity, greedy replies (do they stop, do
  they hold the key fact), decode and scoring speed. fp32 must keep every logit within 1e-3 of the merged
  model's, or within 1e-4 of its largest logit where that is more (the same arithmetic in another
  summation order differs in proportion to the activations), and agree on at least 99.5% of positions;
  a quantized one must agree on at least 97%. A folder that misses is refused: nothing of it is
  written and its row says why.
* Written to temporary folders beside the final ones and renamed after they pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratui.exporters.common import ExportJob, Stages, ensure_merged, make_room, run_logged, write_report_section
from loratui.exporters.records import REPORT, ExportReport
from loratui.exporters.reference import chat_template, greedy_replies, is_causal, merged_reference
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop

# largest |logit difference| allowed for fp32: 1e-3, or 1e-4 of the largest |logit| of the merged model where
# that is more. Float32 kernels that sum in another order differ in proportion to the activations: Gemma 3
# 270M carries residual values near 1e5 and logits up to 131, and its correct fp32 graph differs from
# PyTorch by 7.1e-3 (5e-5 of its logits; top-1 100%, perplexity equal to 1e-6), where SmolLM2's differs by
# 2e-4. A wrong graph (a RoPE, a window, a norm off) moves logits by whole units.
FP32_MAX_DIFF = 1e-3
FP32_MAX_REL_DIFF = 1e-4
FP32_TOP1 = 0.995  # and the least top-1 agreement
QUANT_TOP1 = 0.97  # a quantized model below this is refused: not worth shipping
QUANT_BLOCK = 32
TITLE = "ONNX (onnxruntime)"
BUILDER = "onnxruntime_genai.models.builder"
ENTRY = Path(__file__).with_name("onnx_entry.py")
# files the builder does not write that make the folder a complete model directory
CARRIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass
class OnnxRow:
    type: str
    folder: str
    bytes: int
    max_abs_logit_diff: float | None = None
    reference_max_abs_logit: float | None = None  # the merged model's largest |logit| on the same tokens
    top1_agreement: float | None = None
    perplexity: float | None = None
    delta_perplexity: float | None = None
    key_facts: float | None = None
    replies_stopped: str | None = None
    decode_tokens_per_s: float | None = None
    scoring_rows_per_s: float | None = None
    verdict: str | None = None  # passed, or why it was refused; None: not verified


def folder_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size for p in path.iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".data"))
    )


def carry_files(source: Path, dest: Path) -> None:
    """Config, generation config and tokenizer files the builder did not write, so the folder is also a
    complete model directory (the builder writes tokenizer.json, tokenizer_config.json and the chat template)."""
    for name in CARRIED:
        if (source / name).is_file() and not (dest / name).exists():
            shutil.copy2(source / name, dest / name)


def builder_command(merged: Path, out: Path, precision: str, cache: Path) -> list[str]:
    """onnxruntime-genai's model builder, for the CPU execution provider (through onnx_entry.py, which
    adapts two transformers-5 configs to it)."""
    # run as -c: as a script, its folder would be first on sys.path, and exporters/gguf_info.py would shadow the stdlib's
    cmd = [
        sys.executable,
        "-c",
        ENTRY.read_text(encoding="utf-8"),
        "-i",
        str(merged),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    if precision in ("int4", "int8"):
        cmd += ["--extra_options", f"block_size={QUANT_BLOCK}", "is_symmetric=true"]
    return cmd


def set_stop_tokens(folder: Path, stop: list[int]) -> None:
    """genai_config.json stops at EOS and the chat template's end-of-turn tokens, as the trained model does."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["eos_token_id"] = stop[0] if len(stop) == 1 else stop
    atomic_write_text(path, json.dumps(config, indent=4) + "\n")


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    from loratui.exporters.ollama import stop_tokens

    ids = [
        tokenizer.convert_tokens_to_ids(t)
        for t in (stop_tokens(tokenizer, template) if template else [tokenizer.eos_token])
    ]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and i != tokenizer.unk_token_id))


def build(merged: Path, out: Path, precision: str, log: Path, should_stop: ShouldStop, trust_remote_code: bool) -> None:
    """One folder from the builder (in its own process), completed with the merged model's files."""
    cache = out.with_name(out.name + ".cache")
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the merged folder is local: never reach for a hub
    cmd = builder_command(merged, out, precision, cache)
    if trust_remote_code:
        cmd += ["hf_remote=true"] if "--extra_options" in cmd else ["--extra_options", "hf_remote=true"]
    try:
        run_logged(cmd, env, log, should_stop, what=f"building the {precision} ONNX model")
    except LoratuiError as e:
        text = log.read_text(encoding="utf-8", errors="replace")
        if "not currently supported" in text or "is not supported" in text:
            arch = json.loads((merged / "config.json").read_text(encoding="utf-8")).get("architectures", ["?"])[0]
            raise LoratuiError(
                f"onnxruntime-genai's model builder does not support {arch}: no ONNX export for it",
                hint=f"Export GGUF (llama.cpp, Ollama) or safetensors instead; the builder's output is in {log}.",
            ) from None
        raise e
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    carry_files(merged, out)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def timed_decode(model: Any, prompt: list[int], n: int = 64) -> float:
    """Greedy decode tokens/s, batch 1, ``n`` new tokens whatever they are (prompt processing included
    once, as in a chat turn), after a short warm-up. ``model``: a TorchModel or an OnnxModel."""
    import torch

    from loratui.pipeline.eval.runtimes import OnnxModel

    def run(tokens: int) -> int:
        if isinstance(model, OnnxModel):  # onnxruntime-genai's own loop
            return sum(1 for _ in model.model.tokens(prompt, tokens, min_new_tokens=tokens))
        ids = torch.tensor([prompt], device=model.device)
        greedy = model._greedy(tokens)
        greedy.min_new_tokens = tokens
        with torch.inference_mode():
            out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        return out.shape[1] - (ids.shape[1] if model.task == "causal" else 1)

    run(4)  # warm-up: the first calls allocate and pick kernels
    started = time.perf_counter()
    new = run(n)
    return new / (time.perf_counter() - started)


def compare(reference: Any, candidate: Any, examples: list[Any], should_stop: ShouldStop) -> dict[str, Any]:
    """Both models on the same batches: largest |logit difference| on real tokens, top-1 agreement on
    labelled ones, each side's perplexity, and the candidate's scoring rows/s."""
    import torch.nn.functional as F

    from loratui.pipeline.eval.runtimes import IGNORE

    diff, scale, same, total = 0.0, 0.0, 0, 0
    nll = {"reference": 0.0, "candidate": 0.0}
    seconds = 0.0
    batches = candidate.forward_batches(examples, should_stop)
    for _batch, ref_logits, target, real in reference.forward_batches(examples, should_stop):
        started = time.perf_counter()
        _, logits, _, _ = next(batches)
        seconds += time.perf_counter() - started
        ref_logits, logits = ref_logits.float(), logits.float().to(ref_logits.device)
        step = float((ref_logits - logits).abs()[real].max())
        scale = max(scale, float(ref_logits.abs()[real].max()))
        diff = step if not math.isfinite(step) else max(diff, step)  # max(0.0, nan) would be 0.0
        if not math.isfinite(diff):
            break
        counted = target != IGNORE
        same += int((ref_logits.argmax(-1) == logits.argmax(-1))[counted].sum())
        total += int(counted.sum())
        for side, values in (("reference", ref_logits), ("candidate", logits)):
            losses = F.cross_entropy(values.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
            nll[side] += float((losses * counted).sum())
    batches.close()
    ppl = {side: math.exp(v / total) if total else None for side, v in nll.items()}
    return {
        "max_abs_logit_diff": diff,
        "reference_max_abs_logit": scale,
        "top1_agreement": same / total if total else None,
        "perplexity": ppl["candidate"],
        "reference_perplexity": ppl["reference"],
        "scoring_rows_per_s": len(examples) / seconds if seconds else None,
    }


def replies(
    model: Any, examples: list[Any], tokenizer: Any, max_new_tokens: int, should_stop: ShouldStop
) -> dict[str, Any]:
    said = greedy_replies(model, examples, tokenizer, max_new_tokens, should_stop)
    return {
        "replies_stopped": f"{said.stopped}/{len(said.prompted)}" if said.prompted else None,
        "key_facts": said.key_facts,
        "replies": said.samples,
    }


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def _replace_dir(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final``; an older ``final`` is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old.tmp")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    from loratui.pipeline.eval.ort import import_genai, import_onnxruntime

    import_onnxruntime()  # before any work: the builder and the verification need both
    import_genai()
    started = time.monotonic()
    ensure_merged(cfg, run, events, should_stop)
    if not is_causal(run.merged, cfg.model.trust_remote_code):
        raise LoratuiError(
            "ONNX export is for decoder-only models: onnxruntime-genai's model builder has no "
            "encoder-decoder (T5, FLAN-T5, PEGASUS) path",
            hint="Export safetensors (export.formats=[safetensors]) and serve it with PyTorch "
            "(loratui serve --format torch), or run optimum-cli export onnx in a separate "
            "environment.",
        )
    onnx = _OnnxExport.start(ExportJob(cfg, run, events, should_stop))
    onnx.write()
    out, rows = run.exports / "onnx", onnx.rows
    ExportReport(
        builder=f"onnxruntime-genai {_genai_version()}",
        merged_perplexity=onnx.reference_ppl,
        merged_decode_tokens_per_s=onnx.torch_decode,
        params=onnx.params,
        stop_token_ids=onnx.stop_list,
        files=[{**asdict(r), "replies": onnx.samples.get(r.type, [])} for r in rows],
    ).save(out / REPORT)
    write_report_section(run, TITLE, onnx.table())
    return {
        "path": str(out),
        "folders": onnx.kept,
        "rows": [asdict(r) for r in rows],
        "refused": [
            f"{r.type}: {r.verdict.removeprefix('refused: ')}" for r in rows if r.verdict not in (None, "passed")
        ],
        "merged_perplexity": onnx.reference_ppl,
        "seconds": round(time.monotonic() - started, 2),
    }


@dataclass
class _OnnxExport:
    """One ONNX export: its inputs, its folders (type, temporary, final) and what their verification found."""

    job: ExportJob
    params: int
    log: Path
    variants: list[tuple[str, Path, Path]]
    tokenizer: Any
    template: Any
    stop_list: list[int]
    rows: list[OnnxRow] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    reference_ppl: float | None = None
    torch_decode: float | None = None
    n_rows: int = 0
    kept: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, job: ExportJob) -> _OnnxExport:
        """Checks the disk and loads the tokenizer and the stop tokens every folder gets."""
        from transformers import AutoTokenizer

        cfg, exports = job.cfg, job.run.exports
        quants = list(dict.fromkeys(cfg.export.onnx_quants))
        exports.mkdir(parents=True, exist_ok=True)
        # fp32 weights, and int8 (plus an fp32 embedding) or int4 weights with their scales
        need = 4 + sum(5 if q == "int8" else 1 for q in quants)
        params = make_room(exports, job.run.merged, need, " plus ".join(["fp32 ONNX", *quants]))
        log = exports / "onnx.log"
        log.write_text("", encoding="utf-8")
        variants = [("fp32", exports / ".onnx.tmp", exports / "onnx")] + [
            (q, exports / f".onnx-{q}.tmp", exports / f"onnx-{q}") for q in quants
        ]
        tokenizer = AutoTokenizer.from_pretrained(str(job.run.merged), trust_remote_code=cfg.model.trust_remote_code)
        template = chat_template(cfg, job.events)
        return cls(job, params, log, variants, tokenizer, template, stop_token_ids(tokenizer, template))

    def write(self) -> None:
        """Builds every folder, verifies them when export.verify, and renames those that pass."""
        cfg, should_stop = self.job.cfg, self.job.should_stop
        stage = Stages(
            self.job.events, len(self.variants) * (2 if cfg.export.verify else 1), "onnx", "stages", should_stop
        )
        try:
            for kind, folder, final in self.variants:
                stage(f"building the {kind} model with onnxruntime-genai")
                build(self.job.run.merged, folder, kind, self.log, should_stop, cfg.model.trust_remote_code)
                set_stop_tokens(folder, self.stop_list)
                self.rows.append(OnnxRow(kind, final.name, folder_bytes(folder)))
            if cfg.export.verify:
                self._verify(stage)
            stage.finish("verified" if cfg.export.verify else "written")
            self._publish()
        finally:
            for _kind, folder, _final in self.variants:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(folder.with_name(folder.name + ".cache"), ignore_errors=True)

    def _verify(self, stage: Stages) -> None:
        """Every folder against the merged model; an fp32 folder that differs refuses the whole export."""
        examples, stop, reference = merged_reference(self.job, self.tokenizer, self.template)
        self.n_rows = len(examples)
        prompt = next((e.prompt_ids for e in examples if e.prompt_ids), examples[0].input_ids[:16])
        self.torch_decode = timed_decode(reference, prompt)
        for i, (kind, folder, _final) in enumerate(self.variants):
            stage(f"verifying {kind} in onnxruntime")
            self._verify_one(i, kind, folder, reference, examples, stop, prompt)
        if self.rows[0].verdict != "passed":
            write_report_section(self.job.run, TITLE, self.table())
            raise ExportRefused(
                f"the fp32 ONNX export differs from the merged model ({self.rows[0].verdict}); nothing was written",
                hint=f"See {self.log}, and report it with the model.",
            )

    def _verify_one(
        self, i: int, kind: str, folder: Path, reference: Any, examples: list[Any], stop: set[int], prompt: list[int]
    ) -> None:
        """Row ``i`` with the figures and the verdict of ``folder`` in onnxruntime."""
        from loratui.pipeline.eval.runtimes import OnnxModel, StopRequested, load_onnx

        should_stop = self.job.should_stop
        candidate = OnnxModel(load_onnx(folder), name=kind, pad_id=reference.pad_id, stop_ids=stop)
        try:
            figures = compare(reference, candidate, examples, should_stop)
            said = replies(candidate, examples, self.tokenizer, self.job.cfg.eval.max_new_tokens, should_stop)
            decode = timed_decode(candidate, prompt)
        except StopRequested:
            raise StepCancelled(f"cancelled while verifying {kind}; nothing was written") from None
        self.reference_ppl = reference_ppl = figures.pop("reference_perplexity")
        self.samples[kind] = said.pop("replies")
        ppl = figures["perplexity"]
        row = OnnxRow(
            **{
                **asdict(self.rows[i]),
                **figures,
                **said,
                "decode_tokens_per_s": decode,
                "delta_perplexity": ppl - reference_ppl if ppl and reference_ppl else None,
            }
        )
        row.verdict = judge(row)
        self.rows[i] = row
        self.job.events.metric(
            {
                k: float(v)
                for k, v in asdict(row).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
            },
            split=f"onnx:{kind}",
        )

    def _publish(self) -> None:
        """The folders that passed under their final names; an older folder of a refused type is removed."""
        events = self.job.events
        for row, (kind, folder, final) in zip(self.rows, self.variants):
            if row.verdict in (None, "passed"):
                _replace_dir(folder, final)
                events.artifact(final, kind=f"onnx-{kind}")
                self.kept.append(row.folder)
            else:
                shutil.rmtree(final, ignore_errors=True)  # an older folder of this type no longer matches the model
                events.log(f"onnx {kind}: refused ({row.verdict}); not written", level="warning")

    def table(self) -> list[str]:
        return onnx_table(self.rows, self.reference_ppl, self.torch_decode, self.n_rows)


def _genai_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai") if _installed("onnxruntime-genai") else version("onnxruntime-genai-cuda")


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def _figure(value: float | None, fmt: str) -> str:
    return "not measured" if value is None else format(value, fmt) if math.isfinite(value) else str(value)


def fp32_allowed_diff(reference_max_abs_logit: float | None) -> float:
    """The largest |logit difference| an fp32 export may show against a merged model whose logits reach
    ``reference_max_abs_logit`` (FP32_MAX_DIFF says why it scales)."""
    return max(FP32_MAX_DIFF, FP32_MAX_REL_DIFF * (reference_max_abs_logit or 0.0))


def judge(row: OnnxRow) -> str:
    """``passed``, or why the folder is refused: fp32 must compute what the merged model computes, a
    quantized model must keep the top-1 agreement that makes it worth using."""
    diff, top1 = row.max_abs_logit_diff, row.top1_agreement
    if top1 is None or diff is None or not math.isfinite(diff):
        return f"refused: no finite figures (largest logit difference {_figure(diff, '.2e')})"
    if row.type == "fp32":
        allowed = fp32_allowed_diff(row.reference_max_abs_logit)
        if diff > allowed or top1 < FP32_TOP1:
            return (
                f"refused: largest logit difference {diff:.2e} (at most {allowed:.1e}), top-1 agreement "
                f"{top1:.2%} (at least {FP32_TOP1:.1%})"
            )
        return "passed"
    if top1 < QUANT_TOP1:
        return f"refused: top-1 agreement {top1:.1%} (at least {QUANT_TOP1:.0%} for {row.type} to be worth using)"
    return "passed"


def quant_summary(fp32: OnnxRow, quant: OnnxRow) -> str:
    """What a quantized model costs and saves for this model, by the figures in its row."""
    if fp32.perplexity is None or quant.perplexity is None or quant.top1_agreement is None:
        return f"{quant.type}: not verified (export.verify is off)."
    share = (quant.perplexity - fp32.perplexity) / fp32.perplexity
    size = fp32.bytes / max(quant.bytes, 1)
    decode = (quant.decode_tokens_per_s or 0) / (fp32.decode_tokens_per_s or 1)
    return (
        f"{quant.type} against fp32: perplexity {share:+.1%}, top-1 agreement {quant.top1_agreement:.1%}, "
        f"{size:.1f}x smaller, decode {decode:.2f}x. "
        + ("Kept" if quant.verdict == "passed" else "Refused, not written")
        + f" (the bar: top-1 agreement >= {QUANT_TOP1:.0%})."
    )


def onnx_table(rows: list[OnnxRow], ref_ppl: float | None, torch_decode: float | None, samples: int) -> list[str]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"Built by onnxruntime-genai's model builder; verified in onnxruntime on {samples} test rows against "
        f"the merged model in PyTorch fp32 (perplexity {f(ref_ppl, '.3f')}, decode {f(torch_decode, '.1f')} "
        "tok/s). Max diff: largest |logit difference|. Top-1: teacher-forced next-token agreement. Decode: "
        "onnxruntime-genai, batch 1. Scoring: rows/s of the teacher-forced pass.",
        "",
        "| type | folder | size | max diff | top-1 | perplexity | delta | key facts | replies stop | decode tok/s "
        "| scoring rows/s | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.type} | {r.folder}/ | {r.bytes / 2**20:.1f} MiB | {f(r.max_abs_logit_diff, '.2e')} | "
            f"{'-' if r.top1_agreement is None else f'{r.top1_agreement:.1%}'} | {f(r.perplexity, '.3f')} | "
            f"{f(r.delta_perplexity, '+.3f')} | {f(r.key_facts, '.3f')} | {r.replies_stopped or '-'} | "
            f"{f(r.decode_tokens_per_s, '.1f')} | {f(r.scoring_rows_per_s, '.1f')} | "
            f"{r.verdict or 'not verified'} |"
        )
    if len(rows) > 1:
        lines += [""] + [quant_summary(rows[0], r) for r in rows[1:]]
    return lines
