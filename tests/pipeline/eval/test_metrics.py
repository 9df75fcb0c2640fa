"""Each metric against values worked out by hand on small strings."""

from __future__ import annotations

import math

import pytest

from loratui.pipeline.config import EVAL_METRICS
from loratui.pipeline.eval import metrics as M


def test_metric_names_agree_with_the_config():
    assert M.ALL_METRICS == EVAL_METRICS


@pytest.mark.parametrize(
    "text, want",
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("  multiple\n\twhite   space ", "multiple white space"),
        ("Theatre", "theatre"),  # articles only as whole words
    ],
)
def test_normalize(text, want):
    assert M.normalize(text) == want


def test_exact_match_ignores_case_punctuation_articles_and_spaces():
    assert M.exact_match("The cat.", "cat") == 1.0
    assert M.exact_match("  CAT ", "a cat!") == 1.0
    assert M.exact_match("cats", "cat") == 0.0


def test_token_f1_by_hand():
    # pred [cat, sat, on, mat] vs ref [cat, on, mat]: 3 in common, P = 3/4, R = 1, F1 = 6/7
    assert M.token_f1("the cat sat on the mat", "cat on the mat") == pytest.approx(6 / 7)
    # multiplicity counts: pred [dog, dog] vs ref [dog]: 1 in common, P = 1/2, R = 1, F1 = 2/3
    assert M.token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert M.token_f1("bird", "dog") == 0.0
    assert M.token_f1("", "") == 1.0 and M.token_f1("", "dog") == 0.0


def test_contains_the_key_fact_on_word_boundaries():
    assert M.contains("Call the desk on 555-0173, any day.", "555-0173") == 1.0
    assert M.contains("It is the Brambleholt Library.", "Brambleholt Lending Library") == 0.0
    assert M.contains("See the catalogue.", "cat") == 0.0
    assert M.contains("anything", "") == 0.0


def test_rouge_by_hand():
    (r,) = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigrams: 3 of 3 predicted match, 3 of 6 reference: P 1, R 1/2, F 2/3; LCS is the same 3 tokens
    assert r["rouge1"] == pytest.approx(2 / 3)
    assert r["rougeL"] == pytest.approx(2 / 3)
    assert r["rougeLsum"] == pytest.approx(2 / 3)
    # bigrams: [the cat, cat sat] all in the reference's 5: P 1, R 2/5, F 4/7
    assert r["rouge2"] == pytest.approx(4 / 7)
    (same,) = M.rouge(["Cats are sitting."], ["cat is sitting"])  # Porter stemming: cats -> cat
    assert same["rouge1"] == pytest.approx(2 / 3)


def test_bleu_by_hand():
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # n-gram precisions 5/6, 3/5, 1/4 and 0/3; sacrebleu's exp smoothing turns the zero into 1/(2*3);
    # equal lengths: no brevity penalty
    want = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert M.bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(want, rel=1e-6)
    assert M.bleu([], []) == 0.0


def test_per_row_and_aggregate():
    preds = ["Paris.", "It is Lyon"]
    refs = ["Paris", "The answer is Marseille"]
    rows = M.per_row(preds, refs, ["Paris", None])
    assert [r["exact_match"] for r in rows] == [1.0, 0.0]
    assert [r["contains"] for r in rows] == [1.0, 0.0]  # row 2 has no fact: the whole reference must appear
    agg = M.aggregate(rows, preds, refs)
    assert list(agg) == list(M.GENERATION_METRICS)
    assert agg["exact_match"] == 0.5
    # row 2: [it, is, lyon] vs [answer, is, marseille]: 1 in common, P = R = 1/3, F1 = 1/3
    assert agg["token_f1"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert agg["bleu"] == pytest.approx(M.bleu(preds, refs))


def test_loss_and_perplexity():
    got = M.loss_metrics(6.0, 3)
    assert got["loss"] == 2.0 and got["perplexity"] == pytest.approx(math.exp(2.0))
    assert M.loss_metrics(1e6, 1)["perplexity"] == math.inf
    with pytest.raises(ValueError):
        M.loss_metrics(1.0, 0)


def test_deltas():
    assert M.deltas({"loss": 1.0, "bleu": 30.0}, {"loss": 2.0}) == {"loss": -1.0}


def test_paired_preference_by_hand():
    # diffs: +1.5, -0.5, 0.0 (a tie is not above), +3.0
    got = M.paired_preference([-1.0, -4.0, -2.0, -1.0], [-2.5, -3.5, -2.0, -4.0])
    assert got["preference_accuracy"] == pytest.approx(2 / 4)
    assert got["reward_margin"] == pytest.approx((1.5 - 0.5 + 0.0 + 3.0) / 4)
    assert M.paired_preference([], []) == {}
    with pytest.raises(ValueError):
        M.paired_preference([1.0], [])


def test_unpaired_preference_by_hand():
    tuned = [-1.0, -5.0, -3.0, -2.0, -4.0]
    base = [-2.0, -4.0, -3.0, -3.0, -6.0]
    labels = [1, 0, 1, 0, 1]
    # log-ratios: +1 (good: agrees), -1 (bad: agrees), 0 (good: a tie agrees with neither), +1 (bad: disagrees),
    # +2 (good: agrees)
    got = M.unpaired_preference(tuned, base, labels)
    assert got["preference_accuracy"] == pytest.approx(3 / 5)
    assert got["reward_margin"] == pytest.approx((1 + 0 + 2) / 3 - (-1 + 1) / 2)
    # only good rows: no margin, an accuracy still
    assert M.unpaired_preference([-1.0], [-2.0], [1]) == {"preference_accuracy": 1.0}
    assert M.unpaired_preference([], [], []) == {}
    with pytest.raises(ValueError):
        M.unpaired_preference([1.0], [1.0], [])


def test_preference_metrics_are_higher_is_better():
    assert not set(M.PREFERENCE_METRICS) & M.LOWER_IS_BETTER
    assert M.ALL_METRICS[-2:] == M.PREFERENCE_METRICS
