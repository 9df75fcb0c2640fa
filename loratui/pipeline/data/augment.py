"""Data augmentation (``data.augment``): variations of the training rows' user turns, the replies kept.

It runs in the data step after the split, on the training rows only, so a variation can never enter
validation or test. For each training chat row (a question/answer, instruction or chat row: they are all
chats by now) the last user message is rewritten ``variations`` times per method; the rest of the row is
kept as it is. Document, plain text and preference rows are left alone (counted as skipped).

Methods (:data:`METHODS`): a method gets the user turns to vary and the settings and yields
:class:`Candidate` (the row's index among those turns, the new text, the method; a method may drop a
candidate itself with a reason of its own). Every candidate then passes the same filters, in order:

- ``copy``: it normalizes (:func:`normalize`: lower-cased, punctuation removed, whitespace collapsed) to
  its original or to a variation of the same row kept earlier;
- ``held-out``: it normalizes to a validation or test question (any user message of a held-out row), or
  it holds more than ``max_overlap`` of such a question's words and pairs of neighbouring words
  (:func:`grams`, :class:`HeldOutIndex`).

The measure is the share of the held-out question's words and word pairs that the variation holds
(containment), not the Jaccard similarity of the two: a variation that wraps a held-out question in a
polite prefix ("Could you tell me what ...") holds all of it, yet its Jaccard similarity falls with every
word the prefix adds. Words and word pairs rather than character n-grams: for one word changed in the
middle of a question of n distinct words the share is (2n - 4) / (2n - 1), above the default 0.7 from six
words on (0.73; 0.77 at seven), and two words changed in ten score 0.68, so the default catches one-word
changes without dropping every question that shares a frame with a held-out one; character 4-grams
scored frame-sharing questions with two or three words changed as high as one-word changes of short
questions. A typo breaks a word, so a template variation is also checked without its typos.

``template`` (:func:`template_variations`) needs no model: politeness and register prefixes or suffixes,
the word order of short questions (a trailing "in/on/at/for/from ... " phrase moved to the front, "What
is X?" as "X: what is it?"), the first letter lower-cased (only where the first word is a common word,
so names and acronyms keep their capital), the final punctuation dropped, and keyboard-neighbour typos at
``typo_rate`` per letter, only in lower-case words of four or more letters (never in numbers,
capitalized names, or code-like words such as ``file.txt`` or ``snake_case``). Each variation has one
main rewrite that changes its words (a prefix, a suffix, the word order or a typo), the others at random.
It is seeded per row by ``seed`` and the row's text (``random.Random`` of a string: independent of
``PYTHONHASHSEED``), so the same seed and rows give the same variations wherever they are in the file.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loratui.pipeline.config import AugmentSection
from loratui.pipeline.data.formats import Example
from loratui.pipeline.data.manifest import AugmentExample, AugmentReport, AugmentSample
from loratui.pipeline.events import EventSink

# Bump when a method's output changes for the same settings (it enters the data cache key).
TEMPLATE_VERSION = 1
EXAMPLES_PER_REASON = 5  # examples the report keeps of each drop reason (held-out drops are all listed too)
SAMPLES = 10  # rows whose variations the report keeps for `loratui data preview`


# --------------------------------------------------------------------------------------------
# Normalization and the held-out index
# --------------------------------------------------------------------------------------------

_NOT_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Lower-cased, punctuation and underscores replaced by spaces, whitespace collapsed."""
    return _NOT_WORD.sub(" ", text.lower()).strip()


def grams(norm: str) -> frozenset[str]:
    """The words and the pairs of neighbouring words of a normalized text (empty for an empty text)."""
    words = norm.split()
    return frozenset(words) | frozenset(f"{a} {b}" for a, b in zip(words, words[1:]))


class HeldOutIndex:
    """The validation and test questions, indexed so that a variation finds the ones it nearly equals fast.

    A variation matches a question when it normalizes to it, or when it holds more than ``max_overlap``
    of the question's grams (:func:`grams`: its words and word pairs). Two indexes: each question under its rarest grams only (prefix filtering: to
    hold more than ``max_overlap`` of a question's grams a variation must hold one of its ``len - need + 1``
    rarest), which rules out most variations with a few dictionary look-ups; and every gram's questions as
    an array, whose concatenation over a variation's grams counted by ``numpy.bincount`` gives the grams it
    shares with every question at once.
    """

    def __init__(self, questions: Iterable[str], max_overlap: float) -> None:
        import numpy as np

        self.max_overlap = max_overlap
        self.exact: dict[str, str] = {}
        self.questions: list[str] = []
        gram_sets: list[frozenset[str]] = []
        for q in questions:
            norm = normalize(q)
            if not norm or norm in self.exact:
                continue
            self.exact[norm] = q
            self.questions.append(q)
            gram_sets.append(grams(norm))
        freq = Counter(g for gs in gram_sets for g in gs)
        postings: dict[str, list[int]] = {}
        self.prefix: dict[str, list[int]] = {}
        need = []
        for k, gs in enumerate(gram_sets):
            need.append(math.floor(max_overlap * len(gs)) + 1)  # shared grams for a share above max_overlap
            for g in gs:
                postings.setdefault(g, []).append(k)
            if need[-1] <= len(gs):  # otherwise only an exact match can exceed it
                for g in sorted(gs, key=lambda g: (freq[g], g))[: len(gs) - need[-1] + 1]:
                    self.prefix.setdefault(g, []).append(k)
        self.postings = {g: np.asarray(ks, dtype=np.int32) for g, ks in postings.items()}
        self.sizes = np.asarray([len(gs) for gs in gram_sets], dtype=np.float64)
        self.need = np.asarray(need, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.questions)

    def match(self, text: str) -> tuple[str, float] | None:
        """(the held-out question ``text`` nearly equals, the share of its grams ``text`` holds), or None."""
        import numpy as np

        norm = normalize(text)
        if norm in self.exact:
            return self.exact[norm], 1.0
        gs = grams(norm)
        if not any(g in self.prefix for g in gs):
            return None
        lists = [self.postings[g] for g in gs if g in self.postings]
        shared = np.bincount(np.concatenate(lists), minlength=len(self.questions))
        hits = np.flatnonzero(shared >= self.need)
        if not hits.size:
            return None
        shares = shared[hits] / self.sizes[hits]
        best = int(np.argmax(shares))  # the first of the best: the earliest question
        return self.questions[int(hits[best])], float(shares[best])


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One variation a method proposes: for the ``row``-th user turn it was given."""

    row: int
    text: str
    method: str
    dropped: str | None = None  # a reason of the method's own to drop it (e.g. "empty")
    clean: str | None = None  # the text before random noise (typos): the leakage filter checks it too


@dataclass
class MethodContext:
    """What a method may need beyond the user turns and the settings (the template method needs none of it)."""

    replies: Sequence[str] = ()  # the reply of each user turn (paraphrase: an output holding it answers)
    base_model: str | None = None  # the run's model.base (paraphrase's default rewriting model)
    revision: str | None = None  # model.revision, for a hub id
    trust_remote_code: bool = False
    events: EventSink | None = None  # progress and log lines of a slow method
    should_stop: Callable[[], bool] | None = None  # asked between batches: True raises StepCancelled
    wanted: Callable[[int, str], int] = lambda row, method: 0  # variations row still lacks from method


Method = Callable[[Sequence[str], AugmentSection, MethodContext], Iterator[Candidate]]

_QUESTION_WORDS = {
    "what", "how", "where", "when", "why", "who", "whom", "whose", "which", "is", "are", "was", "were", "can",
    "could", "do", "does", "did", "should", "would", "will", "may", "might", "shall", "has", "have", "had",
}  # fmt: skip
# first words that are safe to lower-case (a name or an acronym at the start keeps its capital)
_COMMON_STARTS = _QUESTION_WORDS | {
    "please", "tell", "give", "list", "explain", "describe", "write", "summarize", "summarise", "name", "show",
    "find", "make", "create", "translate", "compare", "the", "a", "an", "in", "on", "at", "for", "from", "if",
    "my", "our", "your", "this", "that", "there", "it", "any", "some", "one", "help", "define", "convert",
}  # fmt: skip
_QUESTION_PREFIXES = (
    "Could you tell me {q}",
    "Quick question: {q}",
    "Hi! {Q}",
    "Hey, {q}",
    "I was wondering, {q}",
    "Sorry to bother you, but {q}",
    "I have a question. {Q}",
    "Can you help me? {Q}",
    "Do you happen to know {q}",
)
_INSTRUCTION_PREFIXES = (
    "Please {q}",
    "Could you {q}",
    "Can you {q}",
    "I need you to {q}",
    "Hi! {Q}",
    "Quick request: {q}",
    "Would you {q}",
)
_SUFFIXES = (" Thanks!", " Thank you.", " Thanks in advance.", " Thx")
_MOVABLE_PREPOSITIONS = {"in", "on", "at", "from", "during", "after", "before", "since", "until", "for", "within"}
_PRONOUNS = {"it", "this", "that", "he", "she", "they", "there", "these", "those", "i", "you", "we"}
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_KEYBOARD):
    for _c, _ch in enumerate(_row):
        near = [_row[i] for i in (_c - 1, _c + 1) if 0 <= i < len(_row)]
        for _other in (_r - 1, _r + 1):
            if 0 <= _other < len(_KEYBOARD):
                near += [_KEYBOARD[_other][i] for i in (_c - 1, _c) if 0 <= i < len(_KEYBOARD[_other])]
        _NEIGHBOURS[_ch] = "".join(near)
# a lower-case word of 4+ letters that is not part of a name, a number, a path, an address or code
_TYPO_WORD = re.compile(r"(?<![\w./@:\\-])[a-z]{4,}(?![\w/@:\\-]|\.\w)")
_CODE = re.compile(r"[`{}<>\[\]=|$]")
_TRAILING = re.compile(r"[\s?.!]*$")


def _lower_first(text: str) -> str:
    """``text`` with its first letter lower-cased when the first word is a common word."""
    first = text.split(maxsplit=1)[0] if text.strip() else ""
    if first.strip(",.:;!?").lower() in _COMMON_STARTS and first[:1].isupper() and not first[1:2].isupper():
        return text[0].lower() + text[1:]
    return text


def is_question(text: str) -> bool:
    words = text.split()
    return text.rstrip().endswith("?") or bool(words and words[0].lower().strip(",") in _QUESTION_WORDS)


def _prefixed(text: str, pattern: str, question: bool) -> str:
    """``text`` after a prefix pattern: ``{q}`` the text with its first letter lower-cased, ``{Q}`` as it is."""
    q = _lower_first(text)
    if not question and pattern.startswith(("Could", "Can", "Would")):  # "Could you summarize this?"
        first, sep, rest = q.partition("\n")
        q = _TRAILING.sub("", first) + "?" + sep + rest
    return pattern.format(q=q, Q=text)


def _with_suffix(text: str, suffix: str) -> str:
    return text.rstrip() + suffix


def _moved_phrase(text: str) -> str | None:
    """A trailing "in/on/at/... <up to 4 words>" phrase of a short question moved to its front."""
    body = _TRAILING.sub("", text)
    end = text[len(body) :].strip()
    words = body.split()
    if not 5 <= len(words) <= 16 or any(w.endswith((",", ";", ":")) for w in words):
        return None
    for i in range(len(words) - 2, 2, -1):
        if len(words) - i > 5:
            break
        if words[i].lower() in _MOVABLE_PREPOSITIONS:
            phrase, head = words[i:], words[:i]
            if head[-1].lower() in _MOVABLE_PREPOSITIONS | {"of", "to", "by", "with", "about"}:
                return None
            lead = phrase[0][0].upper() + phrase[0][1:]
            return f"{' '.join([lead, *phrase[1:]])}, {_lower_first(' '.join(head))}{end or '?'}"
    return None


def _topic_first(text: str) -> str | None:
    """ "What is the X?" as "The X: what is it?" (and "What are ..." as "...: what are they?")."""
    body = _TRAILING.sub("", text)
    words = body.split()
    if len(words) < 3 or words[0].lower() != "what" or words[1].lower() not in ("is", "are"):
        return None
    topic = words[2:]
    if not 2 <= len(topic) <= 7 or topic[0].lower() in _PRONOUNS:
        return None
    if topic[-1].lower() in _MOVABLE_PREPOSITIONS | {"of", "to", "by", "with", "about", "used", "called"}:
        return None
    lead = topic[0][0].upper() + topic[0][1:] if topic[0].lower() in _COMMON_STARTS else topic[0]
    pronoun = "it" if words[1].lower() == "is" else "they"
    return f"{' '.join([lead, *topic[1:]])}: what {words[1].lower()} {pronoun}?"


def _typos(text: str, rate: float, rng: random.Random, force: bool) -> str:
    """Keyboard-neighbour substitutions at ``rate`` per letter of the eligible words; one at least if ``force``."""
    if _CODE.search(text):
        return text
    spans = [m.span() for m in _TYPO_WORD.finditer(text)]
    if not spans:
        return text
    chars = list(text)
    changed = False
    for start, end in spans:
        for i in range(start, end):
            if rate and rng.random() < rate:
                chars[i] = rng.choice(_NEIGHBOURS[chars[i]])
                changed = True
    if force and not changed:
        start, end = rng.choice(spans)
        i = rng.randrange(start + 1, end)  # not the first letter: the word stays recognizable
        chars[i] = rng.choice(_NEIGHBOURS[chars[i]])
    return "".join(chars)


def _main_rewrites(text: str, rng: random.Random, settings: AugmentSection) -> list[tuple[str, str]]:
    """The rewrites that can change the words of ``text``: (kind, pattern or ""), the kinds taking turns
    in a random order (so two variations are rarely both a prefix), each kind's patterns shuffled."""
    question = is_question(text)
    short = "\n" not in text.strip() and len(text.split()) <= 25
    kinds: dict[str, list[str]] = {
        "prefix": list(_QUESTION_PREFIXES if question else _INSTRUCTION_PREFIXES),
        "suffix": list(_SUFFIXES),
    }
    if short and question:
        kinds["order"] = ["phrase", "topic"]
    if short and settings.typo_rate > 0 and _TYPO_WORD.search(text) and not _CODE.search(text):
        kinds["typo"] = [""]
    for patterns in kinds.values():
        rng.shuffle(patterns)
    order = list(kinds)
    rng.shuffle(order)
    pool: list[tuple[str, str]] = []
    for turn in range(max(len(p) for p in kinds.values())):
        pool += [(kind, kinds[kind][turn]) for kind in order if turn < len(kinds[kind])]
    return pool


def _rewrite(
    text: str, kind: str, pattern: str, rng: random.Random, settings: AugmentSection
) -> tuple[str, str] | None:
    """One variation of ``text``, (before typos, with typos): the main rewrite, then casing, punctuation
    and typos at random. (The leakage filter checks both: a typo does not make a copy of a held-out
    question any less of one.)"""
    question = is_question(text)
    short = "\n" not in text.strip() and len(text.split()) <= 25
    out: str | None
    if kind == "order":
        out = _moved_phrase(text) if pattern == "phrase" else _topic_first(text)
        if out is None:
            return None
    elif kind == "prefix":
        out = _prefixed(text, pattern, question)
    elif kind == "suffix":
        out = _with_suffix(text, pattern)
    else:
        out = text
    if rng.random() < 0.4:
        out = _lower_first(out)
    if kind != "suffix" and rng.random() < 0.3 and "\n" not in out.strip():
        out = out.rstrip().rstrip("?.!") or out
    return out, _typos(out, settings.typo_rate, rng, force=kind == "typo") if short else out


def template_variations(
    questions: Sequence[str], settings: AugmentSection, ctx: MethodContext | None = None
) -> Iterator[Candidate]:
    """``settings.variations`` template rewrites of each user turn in ``questions`` (see the module's notes),
    each with another main rewrite: at most as many as there are (11 to 16)."""
    for row, text in enumerate(questions):
        rng = random.Random(f"template\0{settings.seed}\0{text}")
        pool = _main_rewrites(text, rng, settings)
        made = 0
        for kind, pattern in pool:
            if made == settings.variations:
                break
            out = _rewrite(text, kind, pattern, rng, settings)
            if out is None:  # a word-order rewrite that does not fit this question: try the next rewrite
                continue
            made += 1
            clean, noisy = out
            yield Candidate(row, noisy, "template", clean=clean if noisy != clean else None)


def _paraphrase(questions: Sequence[str], settings: AugmentSection, ctx: MethodContext) -> Iterator[Candidate]:
    from loratui.pipeline.data.paraphrase import paraphrase_variations

    return paraphrase_variations(questions, settings, ctx)


METHODS: dict[str, Method] = {"template": template_variations, "paraphrase": _paraphrase}


def cache_settings(settings: AugmentSection | None, base_model: str | None = None) -> dict[str, Any] | None:
    """What of ``data.augment`` enters the data cache key: the settings and the methods' code versions; for
    ``paraphrase`` also its settings, code version and rewriting model (only then, so that the keys of
    template-only runs stay as they were)."""
    if settings is None or not settings.methods:
        return None
    out = settings.model_dump(mode="json", exclude={"paraphrase"}) | {"versions": {"template": TEMPLATE_VERSION}}
    if "paraphrase" in settings.methods:
        from loratui.pipeline.data.paraphrase import PARAPHRASE_VERSION, rewriter_identity

        out["paraphrase"] = settings.paraphrase.model_dump(mode="json") | {
            "rewriter": rewriter_identity(settings.paraphrase, base_model)
        }
        out["versions"]["paraphrase"] = PARAPHRASE_VERSION
    return out


# --------------------------------------------------------------------------------------------
# The data step's part: training rows in, training rows and variations out, with the report
# --------------------------------------------------------------------------------------------


def _last_user(ex: Example) -> int | None:
    """The index of the last user message of a chat row that ends in an assistant reply; None otherwise."""
    if ex.messages is None or ex.document or ex.preference != "none":
        return None
    if not ex.messages or ex.messages[-1].get("role") != "assistant":
        return None
    for i in range(len(ex.messages) - 2, -1, -1):
        if ex.messages[i].get("role") == "user":
            return i if str(ex.messages[i].get("content") or "").strip() else None
    return None


def held_out_questions(splits: dict[str, list[Example]]) -> list[str]:
    """Every user message of the validation and test rows."""
    return [
        str(m.get("content") or "")
        for split in ("validation", "test")
        for ex in splits.get(split, [])
        for m in ex.messages or []
        if m.get("role") == "user"
    ]


def _varied(ex: Example, at: int, text: str, method: str) -> Example:
    messages = [dict(m) for m in ex.messages or []]
    messages[at]["content"] = text
    return replace(ex, messages=messages, meta=ex.meta | {"augment": method}, _key=None)


def augment(
    settings: AugmentSection, splits: dict[str, list[Example]], ctx: MethodContext | None = None
) -> tuple[list[Example], AugmentReport]:
    """(the training rows followed by their variations, the report's ``augment`` part). ``ctx``: the run's
    model, events and cancellation, for methods that need them (``paraphrase``)."""
    train = splits["train"]
    targets = [(i, at) for i, ex in enumerate(train) if (at := _last_user(ex)) is not None]
    questions = [str((train[i].messages or [])[at]["content"]) for i, at in targets]
    replies = [str((train[i].messages or [])[at + 1].get("content") or "") for i, at in targets]
    held = HeldOutIndex(held_out_questions(splits), settings.max_overlap)
    seen = [{normalize(q)} for q in questions]
    kept: list[list[tuple[str, str]]] = [[] for _ in questions]
    drops = _Drops()
    added = dict.fromkeys(settings.methods, 0)

    def wanted(row: int, method: str) -> int:
        return settings.variations - sum(1 for _, m in kept[row] if m == method)

    ctx = replace(ctx or MethodContext(), replies=replies, wanted=wanted)
    for method in settings.methods:
        for cand in METHODS[method](questions, settings, ctx):
            reason, matched = _verdict(cand, seen[cand.row], held)
            if reason is None:
                seen[cand.row].add(normalize(cand.text))
                kept[cand.row].append((cand.text, cand.method))
                added[cand.method] += 1
            else:
                drops.note(questions[cand.row], cand, reason, matched)
    extra = [_varied(train[i], at, text, method) for (i, at), texts in zip(targets, kept) for text, method in texts]
    samples = [
        AugmentSample(original=q, variations=[t for t, _ in texts], methods=[m for _, m in texts])
        for q, texts in zip(questions, kept)
        if texts
    ][:SAMPLES]
    report = AugmentReport(
        methods=list(settings.methods),
        variations=settings.variations,
        max_overlap=settings.max_overlap,
        rows=len(questions),
        skipped=len(train) - len(questions),
        held_out_questions=len(held),
        added=added,
        dropped=dict(drops.counts),
        examples=drops.examples,
        held_out=drops.held_out,
        samples=samples,
    )
    return [*train, *extra], report


def _verdict(cand: Candidate, seen: set[str], held: HeldOutIndex) -> tuple[str | None, tuple[str, float] | None]:
    """(why ``cand`` is dropped or None, the held-out question it matched and the share)."""
    if cand.dropped:
        return cand.dropped, None
    norm = normalize(cand.text)
    if not norm:
        return "empty", None
    if norm in seen:
        return "copy", None
    matched = held.match(cand.text)
    if cand.clean is not None and (clean := held.match(cand.clean)) and (matched is None or clean[1] > matched[1]):
        matched = clean
    return ("held-out", matched) if matched else (None, None)


class _Drops:
    """The dropped variations: counts per reason, a few examples each, every held-out one."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[AugmentExample]] = {}
        self.held_out: list[AugmentExample] = []

    def note(self, original: str, cand: Candidate, reason: str, matched: tuple[str, float] | None) -> None:
        self.counts[reason] += 1
        fields: dict[str, Any] = {"original": original, "variation": cand.text, "method": cand.method, "reason": reason}
        if matched is not None:
            fields |= {"matched": matched[0], "overlap": round(matched[1], 3)}
        entry = AugmentExample(**fields)
        if matched is not None:
            self.held_out.append(entry)
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(entry)
