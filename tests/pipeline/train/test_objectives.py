"""``train.objective`` against the data: the columns each objective reads, KTO rows from pairs, refusals."""

from __future__ import annotations

import pytest
from datasets import Dataset

from loratui.pipeline.config import load_config
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.train import objectives

PAIRS = Dataset.from_dict(
    {
        "input_ids": [[1, 2, 3], [4, 5]],
        "labels": [[-100, 2, 3], [-100, 5]],
        "rejected_input_ids": [[1, 2, 9, 9], [4, 8]],
        "rejected_labels": [[-100, 9, 9, 9], [-100, 8]],
        "rejected": ["x", "y"],
    }
)


def test_sft_on_pairs_trains_the_chosen_replies():
    ds = objectives.shape(PAIRS.select_columns(objectives.columns("sft", "paired")), "sft", "paired")
    assert ds.column_names == ["input_ids", "labels"]
    assert ds["input_ids"] == [[1, 2, 3], [4, 5]]


def test_kto_from_pairs_has_each_chosen_reply_good_and_each_rejected_one_bad():
    ds = objectives.shape(PAIRS.select_columns(objectives.columns("kto", "paired")), "kto", "paired")
    assert ds["input_ids"] == [[1, 2, 3], [1, 2, 9, 9], [4, 5], [4, 8]]
    assert ds["preference_label"] == [1, 0, 1, 0]
    assert objectives.row_lengths(PAIRS) == [7, 4]  # a pair puts both sequences through the model


def test_sft_on_unpaired_rows_keeps_the_good_ones():
    rows = Dataset.from_dict({"input_ids": [[1], [2], [3]], "labels": [[1], [2], [3]], "preference_label": [1, 0, 1]})
    ds = objectives.shape(rows, "sft", "unpaired")
    assert ds["input_ids"] == [[1], [3]] and ds.column_names == ["input_ids", "labels"]


@pytest.mark.parametrize(
    ("objective", "preference", "task", "mode", "message"),
    [
        ("dpo", "none", "causal", "fresh", "needs preference data"),
        ("orpo", "unpaired", "causal", "fresh", "needs pairs"),
        ("kto", "paired", "seq2seq", "fresh", "decoder-only"),
        ("dpo", "paired", "causal", "continue", "train.mode=continue"),
    ],
)
def test_what_an_objective_cannot_train_on_is_refused(objective, preference, task, mode, message):
    cfg = load_config(None, [f"train.objective={objective}", f"train.mode={mode}"])
    with pytest.raises(LoratuiError) as e:
        objectives.check_objective(cfg, preference, task)
    assert message in e.value.message and e.value.hint


@pytest.mark.parametrize(
    ("objective", "preference", "mode"),
    [
        ("sft", "none", "fresh"),
        ("kto", "paired", "fresh"),
        ("kto", "unpaired", "stack"),
        ("orpo", "paired", "continue"),
    ],
)
def test_what_an_objective_can_train_on_passes(objective, preference, mode):
    cfg = load_config(None, [f"train.objective={objective}", f"train.mode={mode}"])
    objectives.check_objective(cfg, preference, "causal")
