"""Text and loss metrics of the eval step. Pure functions over strings and numbers: no model,
no runtime, nothing downloaded (ROUGE from ``rouge-score``, BLEU from ``sacrebleu``, both local).

Normalization for exact match, token F1 and ``contains`` is SQuAD's: lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed.

Scales: ROUGE, exact match, token F1 and contains are fractions in [0, 1] (mean over rows); BLEU is
sacrebleu's corpus score in [0, 100]; loss is the mean negative log-likelihood per trained token
(nats) and perplexity ``exp(loss)``.

Preference metrics (preference data only, see :mod:`loratui.pipeline.eval.preference`) take log-probabilities
summed over a reply's trained tokens (nats):

* paired rows (chosen, rejected): ``preference_accuracy`` is the share of rows where log p(chosen) is above
  log p(rejected) (a tie is not above); ``reward_margin`` the mean of log p(chosen) - log p(rejected). The
  tuned - base difference of ``reward_margin`` is DPO's implicit reward margin divided by beta:
  beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))], with the base model as the reference.
* unpaired rows (one completion, labelled good or bad, as KTO trains on): on the log-ratio
  log p_tuned(completion) - log p_base(completion), ``preference_accuracy`` is the share of rows where its
  sign agrees with the label (above 0 for a good row, below 0 for a bad one; 0 agrees with neither) and
  ``reward_margin`` the mean over good rows minus the mean over bad rows.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
GENERATION_METRICS: tuple[str, ...] = (*ROUGE_KEYS, "bleu", "exact_match", "token_f1", "contains")
LOSS_METRICS: tuple[str, ...] = ("loss", "perplexity")
PREFERENCE_METRICS: tuple[str, ...] = ("preference_accuracy", "reward_margin")
ALL_METRICS: tuple[str, ...] = (*GENERATION_METRICS, *LOSS_METRICS, *PREFERENCE_METRICS)
# Higher is better for every metric except these.
LOWER_IS_BETTER = frozenset(LOSS_METRICS)

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of normalized tokens (a bag, counted with multiplicity)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:  # both empty: a match; one empty: nothing in common
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, fact: str) -> float:
    """1.0 when the normalized key fact appears in the normalized prediction (on word boundaries)."""
    want = normalize(fact)
    return float(bool(want) and f" {want} " in f" {normalize(prediction)} ")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per-row ROUGE-1/2/L/Lsum F-measures (Porter stemming; Lsum splits sentences on newlines)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return [{k: s.fmeasure for k, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization, exponential smoothing), 0 to 100."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def per_row(
    predictions: Sequence[str], references: Sequence[str], facts: Sequence[str | None]
) -> list[dict[str, float]]:
    """Every generation metric of every row (BLEU at sentence level, for ranking rows)."""
    rows = rouge(predictions, references)
    for row, pred, ref, fact in zip(rows, predictions, references, facts):
        row["bleu"] = sentence_bleu(pred, ref)
        row["exact_match"] = exact_match(pred, ref)
        row["token_f1"] = token_f1(pred, ref)
        row["contains"] = contains(pred, fact if fact else ref)
    return rows


def aggregate(
    rows: Sequence[dict[str, float]], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """Means over rows, except BLEU, which is computed over the corpus as sacrebleu defines it."""
    out = {k: mean(r[k] for r in rows) for k in GENERATION_METRICS if k != "bleu"}
    out["bleu"] = bleu(predictions, references)
    return {k: out[k] for k in GENERATION_METRICS}


def loss_metrics(nll_sum: float, tokens: int) -> dict[str, float]:
    """Mean loss per trained token and its perplexity (inf when the mean loss overflows exp)."""
    if tokens <= 0:
        raise ValueError("no trained tokens to score")
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def paired_preference(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """``preference_accuracy`` and ``reward_margin`` of one model from each row's summed log-probabilities of
    its chosen and its rejected reply; nothing when there are no rows."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected log-probabilities")
    if not chosen:
        return {}
    diffs = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": mean(float(d > 0) for d in diffs), "reward_margin": mean(diffs)}


def unpaired_preference(tuned: Sequence[float], base: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    """``preference_accuracy`` and ``reward_margin`` of the tuned model on unpaired rows (label 1 good, 0 bad) from
    each completion's summed log-probability under the tuned and the base model. ``reward_margin`` needs good and
    bad rows both; nothing when there are no rows."""
    if not len(tuned) == len(base) == len(labels):
        raise ValueError(f"{len(tuned)} tuned, {len(base)} base log-probabilities and {len(labels)} labels")
    if not tuned:
        return {}
    ratios = [t - b for t, b in zip(tuned, base)]
    out = {"preference_accuracy": mean(float(r > 0 if y else r < 0) for r, y in zip(ratios, labels))}
    good = [r for r, y in zip(ratios, labels) if y]
    bad = [r for r, y in zip(ratios, labels) if not y]
    if good and bad:
        out["reward_margin"] = mean(good) - mean(bad)
    return out


def deltas(tuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """tuned - base for every metric both have."""
    return {k: tuned[k] - base[k] for k in tuned if k in base}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
