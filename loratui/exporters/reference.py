"""What an export reads besides the merged model's weights and is verified against: the model's kind, the
chat template the adapter was trained with, the run's test rows, the merged model in PyTorch, and the greedy
replies of an exported model. (The data and eval steps' library functions the exporters use are imported here.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.exporters.common import ExportJob
from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop


def is_causal(model_dir: Path, trust_remote_code: bool = False) -> bool:
    """Whether the model in ``model_dir`` is decoder-only (the data step's reading of its config)."""
    from loratui.pipeline.models import model_task

    return model_task(model_dir, trust_remote_code) == "causal"


def chat_template(cfg: RunConfig, events: EventSink) -> Any:
    """The chat format the adapter was trained with."""
    from loratui.pipeline.models import load_model_inputs

    return load_model_inputs(cfg, events).template


def eval_rows(
    cfg: RunConfig, run: RunDir, tokenizer: Any, template: Any, events: EventSink, task: str = "causal"
) -> list[Any]:
    """``export.verify_samples`` test rows (else validation, train) of the run's data, with chat prompts."""
    from loratui.pipeline.eval.examples import load_examples, pick_split

    manifest = DatasetManifest.load(run.data)
    split = pick_split(manifest.model_dump(), "test", str(run.data), events, fallback_train=True)
    return load_examples(
        run.data / manifest.splits[split], task, tokenizer, template, cfg.eval.fact_field, cfg.export.verify_samples
    )


def merged_reference(
    job: ExportJob, tokenizer: Any, template: Any, task: str = "causal"
) -> tuple[list[Any], set[int], Any]:
    """What an export is checked against: the rows (``eval_rows``), their stop ids, and the merged model
    in PyTorch fp32 on CPU behind the eval step's model interface."""
    from loratui.pipeline.data.prepare import prepare
    from loratui.pipeline.eval.examples import EvalSet, stop_ids
    from loratui.pipeline.eval.runtimes import TorchModel, load_torch

    cfg, run = job.cfg, job.run
    prepare(cfg, run, job.events, job.should_stop)
    examples = eval_rows(cfg, run, tokenizer, template, job.events, task)
    stop = stop_ids(tokenizer, [EvalSet("main", "", "test", examples)])
    model = TorchModel(
        load_torch(run.merged, task, "cpu", "fp32", cfg.model.trust_remote_code),
        name="merged",
        task=task,
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        stop_ids=stop,
    )
    return examples, stop, model


@dataclass
class Replies:
    """Greedy replies of an exported model to the prompted rows, and what they say."""

    prompted: list[Any]  # the rows with a prompt and a reference reply
    stopped: int  # replies that ended before max_new_tokens
    key_facts: float | None  # share of replies holding the row's key fact (the eval step's `contains`)
    samples: list[dict[str, Any]]  # one per reply: source, fact, reply, contains


def greedy_replies(
    model: Any, examples: list[Any], tokenizer: Any, max_new_tokens: int, should_stop: ShouldStop
) -> Replies:
    from loratui.pipeline.eval import metrics as M

    prompted = [e for e in examples if e.prompt_ids and e.reference is not None]
    got = model.generate([e.prompt_ids for e in prompted], max_new_tokens, should_stop=should_stop)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in got]
    facts = [M.contains(t, e.fact or e.reference or "") for t, e in zip(texts, prompted)]
    return Replies(
        prompted,
        sum(len(r) < max_new_tokens for r in got),
        M.mean(facts) if facts else None,
        [{"source": e.source, "fact": e.fact, "reply": t, "contains": c} for e, t, c in zip(prompted, texts, facts)],
    )
