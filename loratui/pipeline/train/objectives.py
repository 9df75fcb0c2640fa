"""``train.objective`` against the run's data: what may train on what, and the columns each one reads.

| objective | data (``dataset.json`` ``preference``) | trains on |
|---|---|---|
| sft | none, paired, unpaired | the replies; paired: the chosen ones; unpaired: the good ones |
| dpo, orpo | paired | chosen vs rejected |
| kto | unpaired, or paired (each pair: the chosen reply good, the rejected one bad, as TRL does) | good vs bad |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")
PAIRED_COLUMNS = ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
UNPAIRED_COLUMNS = ["input_ids", "labels", "preference_label"]
SFT_COLUMNS = ["input_ids", "labels"]


def check_objective(cfg: RunConfig, preference: str, task: str) -> None:
    """Refuse an objective the data, the model or the training mode cannot serve, saying what would."""
    objective = cfg.train.objective
    if objective not in PREFERENCE_OBJECTIVES:
        return
    if task == "seq2seq":
        raise LoratuiError(
            f"train.objective={objective} needs a decoder-only model; {cfg.model.base} is an encoder-decoder",
            hint="Use train.objective=sft for encoder-decoder models.",
        )
    if preference == "none":
        raise LoratuiError(
            f"train.objective={objective} needs preference data, but data.source holds plain examples",
            hint="Use rows with prompt/chosen/rejected (data.format preference), OpenAI's preference JSONL "
            "(input/preferred_output/non_preferred_output) or, for kto, prompt/completion/label.",
        )
    if preference == "unpaired" and objective != "kto":
        raise LoratuiError(
            f"train.objective={objective} needs pairs (a chosen and a rejected reply per prompt); the data has "
            "one reply per row marked good or bad",
            hint="Use train.objective=kto for prompt/completion/label rows.",
        )
    if cfg.train.mode == "continue" and objective != "orpo":
        raise LoratuiError(
            f"train.objective={objective} with train.mode=continue: the reference model would be the base "
            "without the adapter being continued",
            hint="Use train.mode=stack: the current adapter is merged into the base, which then is the reference "
            "(the usual SFT -> DPO recipe); or train.mode=fresh.",
        )


def columns(objective: str, preference: str) -> list[str]:
    """The processed columns the objective trains on."""
    if objective in ("dpo", "orpo"):
        return PAIRED_COLUMNS
    if objective == "kto":
        return UNPAIRED_COLUMNS if preference == "unpaired" else PAIRED_COLUMNS
    return UNPAIRED_COLUMNS if preference == "unpaired" else SFT_COLUMNS


def shape(ds: Any, objective: str, preference: str) -> Any:
    """A split's rows as the objective reads them (KTO from pairs: two rows each; SFT on unpaired: the good)."""
    if objective == "kto" and preference == "paired":
        return _unpaired(ds)
    if objective == "sft" and preference == "unpaired":
        return ds.filter(lambda label: bool(label), input_columns="preference_label").select_columns(SFT_COLUMNS)
    return ds


def _unpaired(ds: Any) -> Any:
    from datasets import Dataset

    table = ds.with_format("arrow")[:]
    ids = table.column("input_ids").to_pylist() + table.column("rejected_input_ids").to_pylist()
    labels = table.column("labels").to_pylist() + table.column("rejected_labels").to_pylist()
    good = [1] * len(table) + [0] * len(table)
    order = [i for pair in zip(range(len(table)), range(len(table), 2 * len(table))) for i in pair]
    return Dataset.from_dict(
        {
            "input_ids": [ids[i] for i in order],
            "labels": [labels[i] for i in order],
            "preference_label": [good[i] for i in order],
        }
    )


def load_splits(run_data: Path, manifest: dict[str, Any], objective: str) -> tuple[Any, Any]:
    """(train, validation or None) with the columns ``objective`` reads."""
    from datasets import load_from_disk

    preference = manifest.get("preference", "none")
    wanted = columns(objective, preference)

    def load(folder: str) -> Any:
        return shape(load_from_disk(str(run_data / folder)).select_columns(wanted), objective, preference)

    splits = manifest["splits"]
    val = splits.get("validation")
    return load(splits["train"]), (load(val) if val else None)


def row_lengths(ds: Any) -> list[int]:
    """Tokens a row puts through the model: both sequences of a pair (each is its own sequence in a batch)."""
    lengths = [len(x) for x in ds["input_ids"]]
    if "rejected_input_ids" in ds.column_names:
        lengths = [n + len(x) for n, x in zip(lengths, ds["rejected_input_ids"])]
    return lengths
