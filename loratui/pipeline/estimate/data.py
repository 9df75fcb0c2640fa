"""The token counts an estimate multiplies: from the run's prepared data when it is current, else from the
data step run in a temporary folder (the datasets cache makes a repeat cheap, and the real run then finds
it), else, for a model whose tokenizer is not here (a config.json alone), from the characters of the rows.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
CHARS_PER_TOKEN = 4.0  # English text in a byte-level BPE vocabulary; only used without a tokenizer
TEMPLATE_TOKENS_PER_MESSAGE = 5  # role markers and separators a chat template adds per message


@dataclass
class DataFacts:
    lengths: list[int]  # tokens of each training example
    trained: int  # tokens with a label per epoch
    val_rows: int
    val_tokens: int
    test_rows: int
    source: str  # where the counts come from
    seconds: float | None = None  # the data step's time, when it ran for this estimate
    max_length: int = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def trained_share(self) -> float:
        return self.trained / max(1, self.tokens)


def facts_from_folder(data: Path, source: str, seconds: float | None, lengths: list[int] | None = None) -> DataFacts:
    """The counts of a prepared data folder; ``lengths`` of the training examples when the caller has
    them (the train step loaded the split already), else read from the split."""
    from loratui.pipeline.data.manifest import DataReport, DatasetManifest

    manifest = DatasetManifest.load(data)
    report = DataReport.load(data)
    if lengths is None:
        from datasets import load_from_disk

        from loratui.pipeline.train.objectives import row_lengths

        lengths = row_lengths(load_from_disk(str(data / manifest.splits["train"])))  # a pair: both sequences
    tokens = report.tokens
    trained = tokens.trained_per_epoch if tokens is not None else sum(lengths)
    val = tokens.validation if tokens is not None else None
    return DataFacts(
        lengths=lengths,
        trained=trained,
        val_rows=manifest.counts.get("validation", 0),
        val_tokens=val.total if val is not None else 0,
        test_rows=manifest.counts.get("test", 0),
        source=source,
        seconds=seconds,
        max_length=manifest.max_length,
    )


class _ProgressOnly:
    """Passes the data step's progress bars on, not its summary: the estimate prints its own."""

    def __init__(self, events: EventSink) -> None:
        self.events = events

    def __call__(self, event: Any) -> None:
        if event.type == "progress" or (event.type == "log" and event.level == "warning"):
            self.events.emit(event)


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def data_facts(cfg: RunConfig, model_dir: Path, events: EventSink, should_stop: ShouldStop) -> DataFacts:
    """The training data's token counts, without writing into the run."""
    from loratui.pipeline.uptodate import up_to_date

    run = RunDir.for_config(cfg)
    if run.path.is_dir() and up_to_date(cfg, run, "data"):
        return facts_from_folder(run.data, "the run's prepared data", None)
    if not has_tokenizer(model_dir):
        return from_characters(cfg)
    from loratui.pipeline.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="loratui-estimate-") as tmp:
        scratch = RunDir(Path(tmp) / "run")
        scratch.path.mkdir()
        start = time.monotonic()
        copy = cfg.model_copy(update={"runs_dir": tmp, "name": "run"})
        prepare(copy, scratch, EventSink("data", [_ProgressOnly(events)]), should_stop)
        return facts_from_folder(scratch.data, "the data step, run for this estimate", time.monotonic() - start)


def _text_lengths(example: Any) -> tuple[int, int]:
    """(all tokens, trained tokens) of an example, guessed from its characters."""
    if example.messages is None:
        n = int(len(example.text or "") / CHARS_PER_TOKEN) + 1
        return n, n
    total = trained = 0
    for message in example.messages:
        n = int(len(str(message.get("content", ""))) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS_PER_MESSAGE
        total += n
        trained += n if message.get("role") == "assistant" else 0
    return total, trained


def from_characters(cfg: RunConfig) -> DataFacts:
    """Counts from the rows' characters (no tokenizer here): about 4 characters a token."""
    from loratui.pipeline.data.read import BuildFindings, read_examples, split_files

    files = split_files(cfg)
    found = BuildFindings()
    limit = cfg.data.max_length if isinstance(cfg.data.max_length, int) else 2048
    counted: dict[str, list[tuple[int, int]]] = {}
    for split, paths in files.items():
        counted[split] = [_text_lengths(ex) for ex in read_examples(cfg, paths, found, split)]
    train = [(min(t, limit), min(d, limit)) for t, d in counted["train"]]
    return DataFacts(
        lengths=[t for t, _ in train],
        trained=sum(d for _, d in train),
        val_rows=len(counted["validation"]),
        val_tokens=sum(t for t, _ in counted["validation"]),
        test_rows=len(counted["test"]),
        source=f"the rows' characters (no tokenizer beside the model: about {CHARS_PER_TOKEN:.0f} a token)",
        max_length=limit,
    )
