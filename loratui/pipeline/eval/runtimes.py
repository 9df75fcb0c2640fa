"""The model behind the metrics: anything that can generate and score token ids.

The eval step does not care which runtime produced a reply or a loss. It talks to an
:class:`EvalModel`, which generates greedily from prompt token ids and returns the negative
log-likelihood of labelled tokens. :class:`TorchModel` implements it for PyTorch models (a base
model, base + adapter, or a merged directory); the GGUF and ONNX exporters add llama.cpp and
onnxruntime implementations and reuse the same metric code to report quality per format.

Token ids, not text, cross the interface, so every runtime sees exactly the tokens the data step
built and the replies are decoded by the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

IGNORE = -100
Progress = Callable[[int], None]  # called with the number of rows just finished
Tick = Progress | None
Stop = Callable[[], bool] | None  # asked before each batch or row: True ends the call with StopRequested
Scored = tuple[float, int, list[int]]  # (nll sum, token count, top-1 ids) of one example
T = TypeVar("T")


@dataclass
class Example:
    """One evaluation row."""

    input_ids: list[int]  # the whole example as trained (causal) or the encoder input (seq2seq)
    labels: list[int]  # trained tokens, IGNORE elsewhere (causal: aligned with input_ids; seq2seq: the target)
    prompt_ids: list[int] | None = None  # what the model sees before its reply; None: no generation (raw text)
    prompt: str = ""  # the prompt as text, for comparison.md
    reference: str | None = None  # the reply the data holds
    fact: str | None = None  # the key fact a reply must contain (the row's fact field), else the reference
    source: str = ""  # file:line of the row
    extra: dict[str, Any] = field(default_factory=dict)
    # preference rows: the prompt + rejected reply, as trained (paired); the row's label, 1 good 0 bad (unpaired)
    rejected: Example | None = None
    preference_label: int | None = None


def cut_at_stop(ids: Sequence[int], stop: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return out


def _batches(order: list[int], lengths: Sequence[int], rows: int, tokens: int) -> list[list[int]]:
    """Indices in ``order`` grouped into batches of at most ``rows`` rows and ``tokens`` padded tokens."""
    out: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        n = max(lengths[i], 1)
        if batch and (len(batch) >= rows or max(longest, n) * (len(batch) + 1) > tokens):
            out.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        out.append(batch)
    return out


class StopRequested(Exception):
    pass


@dataclass
class Ticks:
    """Progress and cancellation of one model call: ``check`` before a unit of work, ``done`` after it."""

    progress: Tick = None
    should_stop: Stop = None

    def check(self) -> None:
        if self.should_stop and self.should_stop():
            raise StopRequested

    def done(self, n: int) -> None:
        if self.progress:
            self.progress(n)

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """``items`` one at a time, checked before and counted after each."""
        for item in items:
            self.check()
            yield item
            self.done(1)


class EvalModel:
    """What the metrics need from a model, whatever runs it. A runtime implements ``_generate`` and
    ``_scored`` (one teacher-forced pass gives both ``nll`` and ``predictions``), and ``_token_logprobs``
    where the serving API's scoring uses it."""

    name: str
    runtime: str = "unknown"  # named in log lines
    # the eval step's preference metrics are computed on PyTorch models only
    scores_preferences: bool = False

    def generate(
        self, prompts: Sequence[list[int]], max_new_tokens: int, progress: Tick = None, should_stop: Stop = None
    ) -> list[list[int]]:
        """Greedy continuations (new tokens only, cut before the first stop token)."""
        return self._generate(prompts, max_new_tokens, Ticks(progress, should_stop))

    def nll(
        self, examples: Sequence[Example], progress: Tick = None, should_stop: Stop = None
    ) -> list[tuple[float, int]]:
        """(sum of negative log-likelihoods, token count) over each example's labelled tokens."""
        return [(total, count) for total, count, _ in self._scored(examples, Ticks(progress, should_stop))]

    def predictions(
        self, examples: Sequence[Example], progress: Tick = None, should_stop: Stop = None
    ) -> list[list[int]]:
        """Teacher-forced top-1 next token at every position that predicts a labelled token."""
        return [top1 for _, _, top1 in self._scored(examples, Ticks(progress, should_stop))]

    def token_logprobs(
        self, examples: Sequence[Example], progress: Tick = None, should_stop: Stop = None
    ) -> list[list[float]]:
        """Log-probability of each labelled token given everything before it, per example."""
        return self._token_logprobs(examples, Ticks(progress, should_stop))

    def scored(self, examples: Sequence[Example], progress: Tick, should_stop: Stop) -> list[Scored]:
        """(nll sum, token count, top-1 ids) of each example, from one teacher-forced pass."""
        return self._scored(examples, Ticks(progress, should_stop))

    def _generate(self, prompts: Sequence[list[int]], max_new_tokens: int, ticks: Ticks) -> list[list[int]]:
        raise NotImplementedError

    def _scored(self, examples: Sequence[Example], ticks: Ticks) -> list[Scored]:
        raise NotImplementedError

    def _token_logprobs(self, examples: Sequence[Example], ticks: Ticks) -> list[list[float]]:
        raise NotImplementedError


def one_at_a_time(
    prompts: Sequence[list[int]],
    stream: Callable[[list[int]], Generator[int, None, None]],
    max_new_tokens: int,
    stops: set[int],
    ticks: Ticks,
) -> list[list[int]]:
    """Greedy replies from a runtime that decodes one prompt at a time (``stream(prompt)``: its new token
    ids), each cut before its first stop token and at ``max_new_tokens``."""
    out = []
    for prompt in ticks.each(prompts):
        reply: list[int] = []
        tokens = stream(prompt)
        try:  # close the generator before anything else touches the model (an abandoned one can crash)
            for t in tokens:
                if t in stops or len(reply) >= max_new_tokens:
                    break
                reply.append(int(t))
        finally:
            tokens.close()
        out.append(reply)
    return out


class TorchModel(EvalModel):
    """A transformers model (optionally a PeftModel) on CPU or CUDA, batched with a KV cache."""

    runtime = "PyTorch"
    scores_preferences = True

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        task: str,
        pad_id: int,
        stop_ids: set[int],
        batch_size: int = 8,
        token_budget: int = 4096,
    ):
        self.model = model
        self.name = name
        self.task = task
        self.pad_id = pad_id
        self.stop_ids = set(stop_ids)
        self.batch_size = batch_size
        self.token_budget = token_budget

    def _greedy(self, max_new_tokens: int) -> Any:
        """Plain greedy decoding. The model's generation_config.json is not applied: its repetition penalty,
        minimum length or banned n-grams would change the replies the metrics compare. transformers 5 fills
        every setting left unset here from the model's own config, so each one that changes greedy replies
        is set to its neutral value."""
        from transformers import GenerationConfig

        own = getattr(self.model, "generation_config", None)
        return GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=sorted(self.stop_ids) or None,
            pad_token_id=self.pad_id,
            forced_bos_token_id=getattr(own, "forced_bos_token_id", None),
            min_new_tokens=0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            length_penalty=1.0,
            suppress_tokens=[],
            begin_suppress_tokens=[],
            remove_invalid_values=False,
        )

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _logits(self, ids: Any, mask: Any) -> Any:
        return self.model(input_ids=ids, attention_mask=mask).logits

    def _generate(self, prompts: Sequence[list[int]], max_new_tokens: int, ticks: Ticks) -> list[list[int]]:
        import torch

        out: list[list[int]] = [[] for _ in prompts]
        lengths = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # similar lengths pad little
        budget = max(self.token_budget, max(lengths, default=1) + max_new_tokens)
        for batch in _batches(order, [n + max_new_tokens for n in lengths], self.batch_size, budget):
            ticks.check()
            longest = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                p = prompts[i]
                if p:
                    ids[row, longest - len(p) :] = torch.tensor(p)
                    mask[row, longest - len(p) :] = 1
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=self._greedy(max_new_tokens),
                )
            new = gen[:, longest:] if self.task == "causal" else gen[:, 1:]  # seq2seq: after the start token
            for row, i in enumerate(batch):
                out[i] = cut_at_stop(new[row].tolist(), self.stop_ids | {self.pad_id})
            ticks.done(len(batch))
        return out

    def forward_batches(
        self, examples: Sequence[Example], should_stop: Stop = None
    ) -> Iterator[tuple[list[int], Any, Any, Any]]:
        """Teacher-forced passes, shortest examples first: per batch (example indices, logits, targets,
        real-token mask), the logits aligned with the targets they predict (IGNORE where unlabelled)."""
        import torch

        lengths = [len(e.input_ids) + (len(e.labels) if self.task == "seq2seq" else 0) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: lengths[i])
        for batch in _batches(order, lengths, self.batch_size, max(self.token_budget, max(lengths, default=1))):
            Ticks(should_stop=should_stop).check()
            n_in = max(len(examples[i].input_ids) for i in batch)
            n_lab = max(len(examples[i].labels) for i in batch)
            ids = torch.full((len(batch), n_in), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n_in), dtype=torch.long)
            labels = torch.full((len(batch), n_lab), IGNORE, dtype=torch.long)
            for row, i in enumerate(batch):  # right padding
                e = examples[i]
                ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                mask[row, : len(e.input_ids)] = 1
                labels[row, : len(e.labels)] = torch.tensor(e.labels)
            ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
            # never yield inside inference_mode: a suspended generator would leave it on for the caller
            with torch.inference_mode():
                if self.task == "seq2seq":  # decoder inputs: the labels shifted right (ORT models take no labels)
                    start = self.model.config.decoder_start_token_id
                    decoder_ids = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
                    decoder_ids = decoder_ids.masked_fill(decoder_ids == IGNORE, self.pad_id)
                    logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
                else:
                    logits = self._logits(ids, mask)[:, :-1]
            if self.task == "seq2seq":
                real = torch.zeros_like(labels, dtype=torch.bool)
                for row, i in enumerate(batch):
                    real[row, : len(examples[i].labels)] = True
                yield batch, logits, labels, real
            else:
                yield batch, logits, labels[:, 1:], mask[:, 1:].bool()

    def _scored(self, examples: Sequence[Example], ticks: Ticks) -> list[Scored]:
        import torch.nn.functional as F

        out: list[Scored] = [(0.0, 0, [])] * len(examples)
        for batch, logits, target, _real in self.forward_batches(examples, ticks.should_stop):
            losses = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
            counted = target != IGNORE
            sums = (losses * counted).sum(dim=1).tolist()
            counts = counted.sum(dim=1).tolist()
            top1 = logits.argmax(-1).tolist()
            for row, i in enumerate(batch):
                flags = counted[row].tolist()
                out[i] = (float(sums[row]), int(counts[row]), [t for t, keep in zip(top1[row], flags) if keep])
            ticks.done(len(batch))
        return out

    def _token_logprobs(self, examples: Sequence[Example], ticks: Ticks) -> list[list[float]]:
        import torch

        out: list[list[float]] = [[] for _ in examples]
        for batch, logits, target, _real in self.forward_batches(examples, ticks.should_stop):
            logits = logits.float()
            counted = target != IGNORE
            chosen = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            logp = (chosen - torch.logsumexp(logits, dim=-1)).tolist()
            flags = counted.tolist()
            for row, i in enumerate(batch):
                out[i] = [v for v, keep in zip(logp[row], flags[row]) if keep]
            ticks.done(len(batch))
        return out


class _Sizes(TypedDict, total=False):
    """TorchModel's batching limits, passed on as they are."""

    batch_size: int
    token_budget: int


class OnnxModel(TorchModel):
    """A decoder-only ONNX export (see :mod:`loratui.pipeline.eval.ort`): teacher-forced batches through
    onnxruntime, replies through onnxruntime-genai's generation loop. Batching, scoring and the metrics
    are TorchModel's; only the forward pass and the decoding differ."""

    runtime = "ONNX Runtime"
    scores_preferences = False

    def __init__(
        self, decoder: Any, *, name: str, task: str = "causal", pad_id: int, stop_ids: set[int], **sizes: Unpack[_Sizes]
    ):
        if task != "causal":
            from loratui.pipeline.errors import LoratuiError

            raise LoratuiError("ONNX exports are decoder-only: an encoder-decoder model has no ONNX path here")
        super().__init__(decoder, name=name, task=task, pad_id=pad_id, stop_ids=stop_ids, **sizes)

    @property
    def device(self) -> Any:
        return "cpu"

    def _logits(self, ids: Any, mask: Any) -> Any:
        import torch

        return torch.from_numpy(self.model.logits(ids.numpy(), mask.numpy()))

    def _generate(self, prompts: Sequence[list[int]], max_new_tokens: int, ticks: Ticks) -> list[list[int]]:
        stream = lambda p: self.model.tokens(p, max_new_tokens)  # noqa: E731
        return one_at_a_time(prompts, stream, max_new_tokens, self.stop_ids | {self.pad_id}, ticks)


def load_onnx(folder: Path, threads: int | None = None) -> Any:
    """An :class:`~loratui.pipeline.eval.ort.OnnxDecoder` for an export folder (clear errors for old or
    foreign folders; nothing is loaded until it is used)."""
    from loratui.pipeline.eval.ort import OnnxDecoder

    return OnnxDecoder(folder, threads=threads)


class LlamaCppModel(EvalModel):
    """A GGUF file in llama.cpp (llama-cpp-python), with a LoRA adapter GGUF applied if ``lora`` is given:
    one sequence at a time, greedy, teacher-forced scoring."""

    runtime = "llama.cpp"

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        stop_ids: set[int],
        n_ctx: int = 2048,
        threads: int | None = None,
        lora: Path | None = None,
    ):
        import os

        import llama_cpp

        self.name = name
        self.stop_ids = set(stop_ids)
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            logits_all=True,
            n_threads=threads or os.cpu_count(),
            verbose=False,
            lora_path=str(lora) if lora else None,
        )

    def close(self) -> None:
        self.llm.close()

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        self.llm.reset()  # type: ignore[no-untyped-call]
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def _generate(self, prompts: Sequence[list[int]], max_new_tokens: int, ticks: Ticks) -> list[list[int]]:
        def stream(prompt: list[int]) -> Generator[int, None, None]:
            return self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)

        return one_at_a_time(prompts, stream, max_new_tokens, self.stop_ids, ticks)

    def _labelled(self, e: Example) -> tuple[Any, Any]:
        """(log-probability of each labelled token, top-1 prediction at each labelled position)."""
        import numpy as np

        logits = self.logits(e.input_ids)[:-1]
        target = np.array(e.labels[1:])
        keep = target != IGNORE
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return logp[np.arange(len(target))[keep], target[keep]], logits.argmax(-1)[keep]

    def _score_one(self, e: Example) -> Scored:
        logp, top1 = self._labelled(e)
        return float(-logp.sum()), int(len(logp)), top1.tolist()

    def _token_logprobs(self, examples: Sequence[Example], ticks: Ticks) -> list[list[float]]:
        return [self._labelled(e)[0].tolist() for e in ticks.each(examples)]

    def _scored(self, examples: Sequence[Example], ticks: Ticks) -> list[Scored]:
        return [self._score_one(e) for e in ticks.each(examples)]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def artifact_kind(path: Path) -> str:
    """``adapter`` (a PEFT folder) or ``model`` (a transformers model directory, such as merged/)."""
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    from loratui.pipeline.errors import LoratuiError

    raise LoratuiError(
        f"eval.model: {path} is neither a PEFT adapter folder (adapter_config.json) nor a "
        "transformers model directory (config.json)",
        hint="Point it at runs/<name>/adapter, an adapters/vN folder or a merged directory.",
    )


def load_torch(model_dir: Path, task: str, device: str, precision: str, trust_remote_code: bool = False) -> Any:
    """A model for inference in ``precision`` (fp32, bf16, fp16), on ``device``."""
    import torch

    from loratui.pipeline.families import attention_implementation
    from loratui.pipeline.models import model_class

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # the family's own attention where SDPA would drop part of it (soft-capping, sinks)
    attention = {"attn_implementation": attention_implementation(model_dir)} if task == "causal" else {}
    model = model_class(task).from_pretrained(
        str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, **attention
    )
    if device != "cpu":  # cuda or mps
        model = model.to(device)
    return model.eval()


def apply_adapter(model: Any, adapter: Path, stack: Sequence[Path] = ()) -> Any:
    """``model`` with the ``stack`` adapters merged in order, then ``adapter`` on top (in place)."""
    from peft import PeftModel

    for path in stack:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(adapter)).eval()
