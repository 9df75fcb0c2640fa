"""The ``paraphrase`` augmentation method: a model rewrites each training question (``data.augment.paraphrase``).

The rewriting model (:func:`open_rewriter`) is one of:

- a local model, by default the run's ``model.base``, or any reference ``model.base`` accepts (a built-in name,
  a local Hugging Face directory, a hub id): transformers, sampled in batches (left padding, the tokenizer's chat
  template, ``torch.manual_seed`` per batch);
- a ``.gguf`` file (or, with ``runtime: llama.cpp``, a built-in's own GGUF): llama-cpp-python's
  ``create_chat_completion`` (the GGUF's chat template), seeded per request;
- an OpenAI-compatible ``endpoint`` (``loratui serve``, vLLM, llama.cpp's server, Ollama, a hosted API) through
  the ``openai`` client, the key read from the environment variable named by ``api_key_env`` (never from the
  config), requests sent four at a time.

Rounds: every user turn is asked for ``variations`` paraphrases; a turn whose outputs were dropped is asked
again for the ones it still lacks, at most ``tries`` rounds in all (so at most ``variations * tries``
outputs per turn). Between batches the data step's ``should_stop`` is asked and progress is reported.

Each output is parsed (:func:`parse_paraphrase`): reasoning blocks, markdown, list numbering, quotes and
preambles ("Sure! Here is a paraphrase:", "Rewritten question:") are removed, lines labelled as the
original are skipped, a quoted question inside a line ('Reworded: "Where is it?"') is taken out of it, and the first line that asks something (for a question: ends in "?" or starts
with a question word) is taken, else the first line left. Then it is dropped, with the reason counted in
the report, when it is

- ``empty``: nothing is left after parsing (the report shows the raw output);
- ``answer``: it answers instead of asking: the original asks (a question, or a request such as "Tell me
  ...") but the output does not; or it holds five consecutive words of the row's reply that the original
  does not, or the whole reply of three words or more; or it is longer than three times the original and 25
  words more;
- ``off``: too far from the original: it lacks a number or a name of the original (a word with a digit, a
  capitalized word that does not start a sentence), or it keeps less than ``min_similarity`` (default 0.5)
  of the original's content words (lower-cased words that are not stopwords; a word of 5+ letters counts
  as kept when the output holds a word with the same first five letters: "cabins" and "cabin", "travel" and
  "travelling"). The share of the original's words, not a symmetric measure: a paraphrase may add words;
  it may not lose the question's subject;

and after those the shared filters of :mod:`.augment` (``copy``, ``held-out``) apply as to every method.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from loratui.pipeline.config import AugmentSection, ParaphraseSection
from loratui.pipeline.data.augment import Candidate, MethodContext, is_question, normalize
from loratui.pipeline.errors import LoratuiError, StepCancelled

# Bump when the parsing, the filters or the prompts sent change for the same settings (enters the cache key).
PARAPHRASE_VERSION = 1
TORCH_BATCH = 16  # prompts per transformers generate() call
ENDPOINT_CONCURRENCY = 4  # requests in flight to an endpoint
LLAMA_BATCH = 2  # prompts between two should_stop checks in llama.cpp (one at a time; each request has its own seed)
ANSWER_SPAN = 5  # consecutive words of the reply that make an output an answer

_STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for from with about into over under as is are was were be
    been being am do does did done doing have has had having can could will would shall should may might must i me my
    mine we us our ours you your yours he him his she her hers it its they them their theirs this that these those
    there here what which who whom whose when where why how not no yes so too very just also any some all each
    every other such only own same than s t don doesn didn isn aren wasn weren won wouldn couldn shouldn please
    tell know like get got one ever still much many more most""".split()
)
_REQUEST_STARTS = (
    "tell", "explain", "describe", "list", "give", "show", "please", "name", "help", "let me know", "i'd like to know",
    "i would like to know", "i want to know", "i need to know", "i wonder", "i'm wondering", "i am wondering",
    "i was wondering", "could you", "can you", "would you", "do you know", "any idea",
)  # fmt: skip
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_MARKUP = re.compile(r"\*\*|__|`+|^#+\s*|^>\s*")
_NUMBERING = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.):]|\(\d{1,2}\)|[a-c][.)])\s+")
_LABEL = re.compile(
    r"^[^:?\n]{0,60}?\b(?:paraphrase[sd]?|paraphrasing|rephrased|rephrasing|rephrase|reworded|rewording|rewritten|"
    r"rewrite|rewording|version|alternative|question|here(?:'s| is| are)?|variation|option)\b[^:?\n]{0,30}?[:\-–—]\s+",
    re.I,
)
_QA_LABEL = re.compile(r"^(?:q|a|answer|question)\s*[:.)]\s+", re.I)
_ORIGINAL = re.compile(r"^\s*(?:the\s+)?original(?:\s+question)?\s*[:\-–—]", re.I)
_INTERJECTION = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|absolutely|great|alright|no problem)\b[!.,]*\s*(?=\S|$)", re.I
)
_QUOTES = "\"'“”‘’«»„"
_QUOTED = re.compile(r"[\"“«„]([^\"“”«»„]+)[\"”»]")


# --------------------------------------------------------------------------------------------
# Parsing and the paraphrase filters
# --------------------------------------------------------------------------------------------


def _clean_line(line: str) -> str:
    line = _MARKUP.sub("", line.strip()).replace("**", "").strip()
    line = _NUMBERING.sub("", line).strip()
    line = _INTERJECTION.sub("", line).strip()
    line = _QA_LABEL.sub("", line).strip()
    while (m := _LABEL.match(line)) and len(line) > m.end():
        line = line[m.end() :].strip()
    if line[:1] in _QUOTES:
        line = line.strip(_QUOTES + " ")
    elif line[-1:] in '"”»':
        line = line.rstrip(_QUOTES + " ")
    return line.strip()


def _is_preamble(line: str) -> bool:
    """A line that introduces the answer rather than being it: "Here is a paraphrase:", "Sure!"."""
    if not line:
        return True
    if line.endswith(":") and "?" not in line:
        return True
    return bool(_INTERJECTION.fullmatch(line))


def asks(text: str) -> bool:
    """Whether ``text`` asks for something: a question, or a request ("Tell me ...", "I'd like to know ...")."""
    low = text.strip().lower()
    return is_question(text) or low.startswith(_REQUEST_STARTS)


def _quoted_question(line: str) -> str | None:
    """The quoted question inside a line such as 'Reworded: "Where is it?"' (None without one)."""
    for m in _QUOTED.finditer(line):
        inner = m.group(1).strip()
        if inner.endswith("?") and len(inner.split()) >= 3:
            return inner
    return None


def parse_paraphrase(raw: str, original: str) -> str:
    """The rewritten question in a model's output ("" when there is none): see the module's notes."""
    text = _THINK.sub("", raw or "")
    lines = []
    for line in text.splitlines():
        if _ORIGINAL.match(line):
            continue
        quoted = _quoted_question(_MARKUP.sub("", line))
        cleaned = quoted if quoted is not None else _clean_line(line)
        if not _is_preamble(cleaned):
            lines.append(cleaned)
    if not lines:
        return ""
    if is_question(original) or asks(original):
        for line in lines:
            if asks(line):
                return line
    return lines[0]


def _words(text: str) -> list[str]:
    return normalize(text).split()


def _required(original: str) -> set[str]:
    """The numbers and names of ``original``: normalized words holding a digit, and capitalized words (or
    acronyms) that do not start a sentence."""
    out = {w for w in _words(original) if any(c.isdigit() for c in w)}
    tokens = re.findall(r"[\w'’.-]+|[.?!]", original)
    start = True
    for tok in tokens:
        if tok in ".?!":
            start = True
            continue
        if not start and tok[:1].isupper():
            out |= set(_words(tok))
        start = False
    return {w for w in out if w not in _STOPWORDS}


def _kept(word: str, words: set[str], stems: set[str]) -> bool:
    return word in words or (len(word) >= 5 and word[:5] in stems)


def similarity(original: str, text: str) -> tuple[float, list[str]]:
    """(the share of ``original``'s content words ``text`` keeps, the numbers and names it lacks)."""
    out = set(_words(text))
    stems = {w[:5] for w in out if len(w) >= 5}
    content = {w for w in _words(original) if w not in _STOPWORDS}
    missing = sorted(w for w in _required(original) if w not in out)
    if not content:
        return 1.0, missing
    return sum(_kept(w, out, stems) for w in content) / len(content), missing


def _answers(original: str, reply: str, text: str) -> bool:
    if asks(original) and not asks(text):
        return True
    norm_out, norm_orig, norm_reply = normalize(text), normalize(original), normalize(reply)
    reply_words = norm_reply.split()
    if len(reply_words) >= 3 and f" {norm_reply} " in f" {norm_out} " and f" {norm_reply} " not in f" {norm_orig} ":
        return True
    out_words, orig = norm_out.split(), f" {norm_orig} "
    spans = {" ".join(reply_words[i : i + ANSWER_SPAN]) for i in range(len(reply_words) - ANSWER_SPAN + 1)}
    for i in range(len(out_words) - ANSWER_SPAN + 1):
        span = " ".join(out_words[i : i + ANSWER_SPAN])
        if span in spans and f" {span} " not in orig:
            return True
    n = len(norm_orig.split())
    return len(out_words) > max(3 * n, n + 25)


def verdict(original: str, reply: str, text: str, min_similarity: float) -> str | None:
    """Why the parsed paraphrase ``text`` of ``original`` is dropped (``empty``, ``answer``, ``off``), or None."""
    if not normalize(text):
        return "empty"
    if _answers(original, reply, text):
        return "answer"
    share, missing = similarity(original, text)
    if missing or share < min_similarity:
        return "off"
    return None


# --------------------------------------------------------------------------------------------
# Rewriters: a local model (transformers or llama.cpp) or an OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------


class Rewriter(Protocol):
    name: str
    batch: int

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]: ...

    def close(self) -> None: ...


class TorchRewriter:
    """A transformers model, sampled in batches with left padding through its chat template."""

    batch = TORCH_BATCH

    def __init__(self, path: Path, p: ParaphraseSection, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        from loratui.pipeline import device as devices
        from loratui.pipeline.eval.runtimes import load_torch
        from loratui.pipeline.models import model_task

        self.name = str(path)
        self.p = p
        self.task = model_task(path, trust_remote_code)
        hw = devices.probe()  # as serving chooses: CUDA, then Apple MPS, then the CPU
        self.device = devices.choose("auto", hw).value
        self.tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        precision = devices.inference_precision(self.device, hw)
        self.model = load_torch(path, self.task, self.device, precision, trust_remote_code)

    def _render(self, prompt: str) -> str:
        if self.task == "causal" and getattr(self.tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return str(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return prompt + ("\n" if self.task == "causal" else "")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        import torch

        templated = self.task == "causal" and getattr(self.tok, "chat_template", None)
        enc = self.tok(
            [self._render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=not templated
        ).to(self.device)
        torch.manual_seed(zlib.crc32(repr(list(seeds)).encode()))
        sample = self.p.temperature > 0
        options: dict[str, Any] = {"do_sample": sample}
        if sample:
            options |= {"temperature": self.p.temperature, "top_p": self.p.top_p, "top_k": 0}
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=self.p.max_tokens, pad_token_id=self.tok.pad_token_id, **options
            )
        new = out if self.task == "seq2seq" else out[:, enc["input_ids"].shape[1] :]
        return [str(t) for t in self.tok.batch_decode(new, skip_special_tokens=True)]

    def close(self) -> None:
        del self.model


class LlamaCppRewriter:
    """A GGUF file in llama.cpp: one chat completion at a time, through the chat template the GGUF carries."""

    batch = LLAMA_BATCH

    def __init__(self, path: Path, p: ParaphraseSection) -> None:
        import llama_cpp

        self.name = str(path)
        self.p = p
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count(), verbose=False, seed=0)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        out = []
        for prompt, seed in zip(prompts, seeds):
            result: Any = self.llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                temperature=self.p.temperature,
                top_p=self.p.top_p,
                max_tokens=self.p.max_tokens,
                seed=seed,
            )
            out.append(str(result["choices"][0]["message"].get("content") or ""))
        return out

    def close(self) -> None:
        self.llm.close()


class EndpointRewriter:
    """An OpenAI-compatible server through the official ``openai`` client."""

    batch = ENDPOINT_CONCURRENCY * 4

    def __init__(self, p: ParaphraseSection, http_client: Any = None) -> None:
        import openai

        assert p.endpoint is not None
        self.p = p
        self.endpoint = p.endpoint
        key = None
        if p.api_key_env:
            key = os.environ.get(p.api_key_env)
            if not key:
                raise LoratuiError(
                    f"data.augment.paraphrase.api_key_env names the environment variable {p.api_key_env}, "
                    "which is not set",
                    hint=f"export {p.api_key_env}=<the endpoint's API key>, or leave api_key_env out for a server "
                    "that needs no key",
                )
        # a keyless local server: the client insists on some key, and the server ignores it
        self.client = openai.OpenAI(
            base_url=p.endpoint, api_key=key or "no-key", max_retries=1, timeout=120.0, http_client=http_client
        )
        self.model = p.endpoint_model or self._first_model()
        self.name = f"{p.endpoint} ({self.model})"

    def _call(self, what: str, fn: Any) -> Any:
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            hint = {
                401: "The endpoint wants a key: set api_key_env to the name of the variable holding it"
                + (f" (now {self.p.api_key_env}: is its key right?)" if self.p.api_key_env else ""),
                403: "The key was refused for this model.",
                404: "Check the URL (the base URL, usually ending in /v1) and endpoint_model.",
            }.get(e.status_code, "See the server's log.")
            raise LoratuiError(
                f"data.augment.paraphrase: the endpoint {self.endpoint} answered HTTP {e.status_code} to {what}: "
                f"{_message(e)}",
                hint=hint,
            ) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise LoratuiError(
                f"data.augment.paraphrase: cannot reach the endpoint {self.endpoint} ({what}): "
                f"{type(cause).__name__}: {cause}",
                hint="Start the server, or check data.augment.paraphrase.endpoint (the base URL, e.g. "
                "http://127.0.0.1:8000/v1).",
            ) from None

    def _first_model(self) -> str:
        models = self._call("GET /models", lambda: list(self.client.models.list()))
        if not models:
            raise LoratuiError(
                f"data.augment.paraphrase: the endpoint {self.endpoint} lists no model",
                hint="Set data.augment.paraphrase.endpoint_model.",
            )
        return str(models[0].id)

    def _one(self, prompt: str, seed: int) -> str:
        response = self._call(
            f"chat.completions for model {self.model!r}",
            lambda: self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=self.p.temperature,
                top_p=self.p.top_p,
                max_tokens=self.p.max_tokens,
                seed=seed,
            ),
        )
        choices = getattr(response, "choices", None) or []
        return str(choices[0].message.content or "") if choices else ""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(ENDPOINT_CONCURRENCY) as pool:
            return list(pool.map(self._one, prompts, seeds))

    def close(self) -> None:
        self.client.close()


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if body.get("detail"):
            return str(body["detail"])
    return str(getattr(e, "message", e))


def _spec(p: ParaphraseSection, base_model: str | None) -> str:
    from loratui.pipeline.models import DEFAULT_MODEL

    return (p.model or base_model or DEFAULT_MODEL).strip()


def _uses_llama_cpp(p: ParaphraseSection, spec: str) -> bool:
    """``runtime: auto``: llama.cpp for a .gguf file or a built-in (a GGUF too: faster on a CPU than its
    PyTorch import, and the same weights)."""
    from loratui.pipeline.models import BUILTINS

    auto = spec.lower().endswith(".gguf") or spec in BUILTINS
    return p.runtime == "llama.cpp" or (p.runtime == "auto" and auto)


def rewriter_identity(p: ParaphraseSection, base_model: str | None) -> dict[str, Any]:
    """What names the rewriting model in the data cache key: the endpoint and model id, or the local
    model's resolved path (a built-in: its GGUF file), or the hub id."""
    from loratui.pipeline.models import BUILTINS

    if p.endpoint:
        return {"endpoint": p.endpoint.rstrip("/"), "model": p.endpoint_model}
    spec = _spec(p, base_model)
    runtime = "llama.cpp" if _uses_llama_cpp(p, spec) else "torch"
    if spec in BUILTINS:
        gguf = BUILTINS[spec].gguf_path()
        return {"builtin": spec, "gguf": str(gguf) if gguf else None, "runtime": runtime}
    local = Path(spec).expanduser()
    if local.exists():
        return {"path": str(local.resolve()), "runtime": runtime}
    return {"hub": spec, "runtime": runtime}


def open_rewriter(p: ParaphraseSection, ctx: MethodContext) -> Rewriter:
    """The rewriting model of ``p`` (see the module's notes), loaded."""
    from loratui.pipeline.models import BUILTINS, builtin_gguf, resolve_model

    if p.endpoint:
        return EndpointRewriter(p)
    log = ctx.events.log if ctx.events is not None else None
    spec = _spec(p, ctx.base_model)
    if _uses_llama_cpp(p, spec):
        if spec in BUILTINS:
            return LlamaCppRewriter(builtin_gguf(spec, log), p)
        local = Path(spec).expanduser()
        if local.is_file() and local.suffix.lower() == ".gguf":
            return LlamaCppRewriter(local.resolve(), p)
        raise LoratuiError(
            f"data.augment.paraphrase: runtime llama.cpp needs a .gguf file or a built-in model, not {spec!r}",
            hint="Set paraphrase.model to a .gguf file, or runtime to torch (or auto).",
        )
    revision = ctx.revision if spec == (ctx.base_model or "").strip() else None
    resolved = resolve_model(spec, revision=revision, log=log)
    trust = ctx.trust_remote_code if spec == (ctx.base_model or "").strip() else False
    return TorchRewriter(resolved.path, p, trust)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def _seed(settings: AugmentSection, question: str, round_: int, k: int) -> int:
    """A request's seed: from the settings' seed and the question, so a row's outputs do not depend on its place."""
    return zlib.crc32(f"paraphrase\0{settings.seed}\0{round_}\0{k}\0{question}".encode()) & 0x7FFFFFFF


def paraphrase_variations(
    questions: Sequence[str],
    settings: AugmentSection,
    ctx: MethodContext,
    rewriter: Rewriter | None = None,
) -> Iterator[Candidate]:
    """Paraphrases of each user turn in ``questions``, in rounds (see the module's notes); ``rewriter``: a
    loaded rewriting model (else :func:`open_rewriter` loads the one the settings name)."""
    p = settings.paraphrase
    if not questions:
        return
    events = ctx.events
    own = rewriter is None
    rw = rewriter or open_rewriter(p, ctx)
    started, generated = time.monotonic(), 0
    if events is not None:
        events.log(
            f"data.augment: paraphrasing {len(questions)} user turns with {rw.name} "
            f"({settings.variations} per turn, up to {p.tries} rounds)"
        )
    try:
        for round_ in range(p.tries):
            asks_ = [
                (row, k)
                for row in range(len(questions))
                for k in range(min(ctx.wanted(row, "paraphrase"), settings.variations))
            ]
            if not asks_:
                break
            for start in range(0, len(asks_), rw.batch):
                if ctx.should_stop is not None and ctx.should_stop():
                    raise StepCancelled("cancelled while paraphrasing")
                batch = asks_[start : start + rw.batch]
                prompts = [p.prompt.format(question=questions[row]) for row, _ in batch]
                seeds = [_seed(settings, questions[row], round_, k) for row, k in batch]
                outputs = rw.generate(prompts, seeds)
                generated += len(outputs)
                if events is not None:
                    events.progress(
                        start + len(batch),
                        len(asks_),
                        task="paraphrase",
                        unit="outputs",
                        message=f"round {round_ + 1} of at most {p.tries}",
                    )
                for (row, _), raw in zip(batch, outputs):
                    yield _candidate(questions[row], ctx.replies[row] if row < len(ctx.replies) else "", row, raw, p)
    finally:
        if own:
            rw.close()
    if events is not None:
        events.log(f"data.augment: {generated} paraphrases generated in {time.monotonic() - started:.1f}s")


def _candidate(original: str, reply: str, row: int, raw: str, p: ParaphraseSection) -> Candidate:
    text = parse_paraphrase(raw, original)
    reason = verdict(original, reply, text, p.min_similarity)
    if reason == "empty":
        shown = " ".join((raw or "").split())
        return Candidate(row, shown[:200], "paraphrase", dropped="empty")
    return Candidate(row, text, "paraphrase", dropped=reason)
