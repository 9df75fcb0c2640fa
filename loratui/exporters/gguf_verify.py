"""How a GGUF is verified in llama.cpp against the merged model in transformers (the merged GGUF and the LoRA
GGUF alike): the reference figures, each file's figures, the acceptance rule's verdict, and their table."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratui.exporters.acceptance import Measured, Verdict, judge, measure
from loratui.exporters.common import ExportJob
from loratui.exporters.reference import greedy_replies, merged_reference
from loratui.pipeline.errors import ExportRefused, StepCancelled
from loratui.pipeline.steps import ShouldStop


@dataclass
class GgufRow:
    type: str
    file: str
    bytes: int
    bits_per_weight: float
    perplexity: float | None
    delta_perplexity: float | None
    top1_agreement: float | None
    decode_tokens_per_s: float | None
    replies_stopped: str | None
    key_facts: float | None
    fallbacks: str | None
    decided: int | None = None  # positions where the merged model leads by more than the type's noise
    decided_agreement: float | None = None  # top-1 agreement on those (the acceptance rule)
    verdict: str | None = None  # "accepted", "refused: ...", "not judged: ..." (None: not verified)

    @classmethod
    def unverified(
        cls, type: str, file: str, size: int, bits_per_weight: float, fallbacks: str | None = None
    ) -> GgufRow:
        """A file's row before it is measured: its size and the quantizer's fallbacks."""
        return cls(type, file, size, bits_per_weight, None, None, None, None, None, None, fallbacks)


@dataclass
class Reference:
    """What every GGUF is checked against: the merged model in transformers on the run's test rows."""

    examples: list[Any] = field(default_factory=list)
    measured: Measured = field(default_factory=Measured)  # top-1, margins and the types' noise
    perplexity: float | None = None
    stop: set[int] = field(default_factory=set)
    n_ctx: int = 512

    @property
    def tokens(self) -> list[list[int]]:
        return self.measured.top1

    @classmethod
    def build(cls, job: ExportJob, tokenizer: Any, template: Any, kinds: list[str]) -> Reference:
        """``kinds``: the types to be judged (their arithmetic is simulated once here)."""
        from loratui.pipeline.eval.runtimes import StopRequested

        examples, stop, model = merged_reference(job, tokenizer, template)
        try:
            measured = measure(model, examples, kinds, job.should_stop)
        except StopRequested:
            raise StepCancelled("cancelled while measuring the merged model; nothing was written") from None
        return cls(
            examples,
            measured,
            math.exp(measured.nll / measured.count) if measured.count else None,
            stop,
            max(256, max(len(e.input_ids) for e in examples) + job.cfg.eval.max_new_tokens + 64),
        )


def verify(
    path: Path,
    ref: Reference,
    tokenizer: Any,
    max_new_tokens: int,
    should_stop: ShouldStop,
    label: str,
    lora: Path | None = None,
) -> dict[str, Any]:
    """The figures of one GGUF (with ``lora`` applied, if given) in llama.cpp: agreement, perplexity,
    replies (do they stop, do they hold the key fact) and decode speed; ``predicted`` is its teacher-forced
    top-1 at every labelled position."""
    from loratui.pipeline.eval import metrics as M
    from loratui.pipeline.eval.runtimes import LlamaCppModel, StopRequested

    model = LlamaCppModel(path, name=label, stop_ids=ref.stop, n_ctx=ref.n_ctx, lora=lora)
    try:
        scored = model.scored(ref.examples, None, should_stop)
        said = greedy_replies(model, ref.examples, tokenizer, max_new_tokens, should_stop)
        tokens_per_s = decode_speed(
            model, said.prompted[0].prompt_ids if said.prompted else ref.examples[0].input_ids[:8]
        )
    except StopRequested:
        raise StepCancelled(f"cancelled while verifying {label}; nothing was written") from None
    finally:
        model.close()
    predicted = [s[2] for s in scored]
    nll, count = sum(s[0] for s in scored), sum(s[1] for s in scored)
    ppl = M.loss_metrics(nll, count)["perplexity"] if count else None
    return {
        "top1_agreement": top1_agreement(predicted, ref.tokens),
        "perplexity": ppl,
        "delta_perplexity": (ppl - ref.perplexity) if ppl is not None and ref.perplexity is not None else None,
        "replies_stopped": f"{said.stopped}/{len(said.prompted)}",
        "decode_tokens_per_s": tokens_per_s,
        "key_facts": said.key_facts,
        "replies": said.samples,
        "predicted": predicted,
    }


def top1_agreement(predicted: list[list[int]], reference: list[list[int]]) -> float | None:
    """Share of labelled positions where the file's top-1 token is the merged model's."""
    total = sum(len(r) for r in reference)
    same = sum(a == b for p, r in zip(predicted, reference) for a, b in zip(p, r))
    return same / total if total else None


def verify_row(
    row: GgufRow,
    path: Path,
    final_name: str,
    ref: Reference,
    tokenizer: Any,
    job: ExportJob,
    lora: Path | None = None,
    judged_as: str | None = None,
) -> tuple[GgufRow, list[dict[str, Any]]]:
    """``row`` with the figures of ``verify`` and the verdict of the acceptance rule for type ``judged_as``
    (default: the row's type; ``""``: measured only). A refused file raises :class:`ExportRefused`, with
    the row on it as ``.row`` (and its replies as ``.replies``)."""
    figures = verify(path, ref, tokenizer, job.cfg.eval.max_new_tokens, job.should_stop, row.type, lora)
    replies, predicted = figures.pop("replies"), figures.pop("predicted")
    kind = row.type if judged_as is None else judged_as
    verdict = (
        judge(kind, predicted, ref.measured, final_name) if kind else Verdict(row.type, None, reason="measured only")
    )
    row = GgufRow(
        **{
            **asdict(row),
            **figures,
            "decided": verdict.decided if verdict.threshold is not None else None,
            "decided_agreement": verdict.agreement,
            "verdict": verdict_text(verdict),
        }
    )
    job.events.metric(
        {
            k: float(v)
            for k, v in {**figures, "decided_agreement": verdict.agreement}.items()
            if isinstance(v, (int, float)) and v is not None
        },
        split=f"gguf:{row.type}",
    )
    if verdict.reason.startswith("not judged"):
        job.events.log(f"{final_name}: {verdict.reason}", level="warning")
    if not verdict.accepted:
        error = ExportRefused(
            f"{verdict.reason}; it was not written",
            hint="The conversion lost accuracy: the convert log beside the other files says what the "
            "converter did; report it with the model.",
        )
        error.row, error.replies = row, replies
        raise error
    return row, replies


def verdict_text(verdict: Verdict) -> str:
    """The row's verdict: ``accepted``, the reason an accepted file carries (``not judged: ...``), or
    ``refused: <reason>``."""
    if not verdict.accepted:
        return f"refused: {verdict.reason}"
    return verdict.reason or "accepted"


def decode_speed(model: Any, prompt: list[int], n: int = 64) -> float:
    """Greedy decode tokens/s after the prompt, stop tokens ignored, on the model's own threads."""
    llm = model.llm
    tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    count, started = 0, 0.0
    try:
        for _ in tokens:
            count += 1
            if count == 1:
                started = time.perf_counter()  # from the first generated token: prompt processing excluded
            if count > n or count >= llm.n_ctx() - len(prompt) - 1:
                break
    finally:
        tokens.close()
    elapsed = time.perf_counter() - started
    return (count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0


def gguf_table(rows: list[GgufRow], ref_ppl: float | None, samples: int) -> list[str]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = [
        f"Verified in llama.cpp on {samples} test rows against the merged model in transformers "
        f"(perplexity {f(ref_ppl, '.3f')}). Top-1: teacher-forced next-token agreement with it. Decided: the "
        "same on the positions where the merged model leads by more than the type's own rounding can move "
        "(the acceptance rule: at most 1% may differ there). Key facts: greedy replies in llama.cpp that "
        "contain the row's key fact (the eval step's `contains`).",
        "",
        "| type | file | size | bits/weight | perplexity | delta | top-1 | decided | key facts | decode tok/s "
        "| replies stop |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        decided = "-" if r.decided is None else f"{pct(r.decided_agreement)} of {r.decided}"
        lines.append(
            f"| {r.type} | {r.file} | {r.bytes / 2**20:.1f} MiB | {r.bits_per_weight:.2f} | "
            f"{f(r.perplexity, '.3f')} | {f(r.delta_perplexity, '+.3f')} | {pct(r.top1_agreement)} | "
            f"{decided} | {f(r.key_facts, '.3f')} | {f(r.decode_tokens_per_s, '.1f')} | "
            f"{r.replies_stopped or '-'} |"
        )
    notes = [f"- {r.type}: {r.fallbacks}" for r in rows if r.fallbacks]
    notes += [
        f"- {r.type}: **{r.verdict}**" if r.verdict.startswith("refused") else f"- {r.type}: {r.verdict}"
        for r in rows
        if r.verdict and r.verdict != "accepted"
    ]
    return lines + ([""] + notes if notes else [])
