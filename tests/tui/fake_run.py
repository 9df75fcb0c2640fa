"""A finished run on disk, written by hand (no model, no training): what every view renders from.

Paths are relative (the tests chdir into a tmp folder), so snapshots do not depend on where they run.
"""

from __future__ import annotations

import json
from pathlib import Path

from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import EventSink, JsonlWriter
from loratui.pipeline.runs import write_config

PREVIEW = """loratui data preview: 1 of 3 training examples, template: chatml
Trained tokens are between ⟦ and ⟧; the rest is context only (label -100).

── example 1 (train.jsonl:1): 24 tokens, 9 trained
<|im_start|>user
Where is the library?<|im_end|>
<|im_start|>assistant
⟦At 14 Tannery Row, Ostervale.<|im_end|>⟧
"""


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def make_run(
    root: Path,
    name: str = "demo",
    steps: tuple[str, ...] = ("data", "train", "eval", "merge", "export"),
    train_file: str = "train.jsonl",
    objective: str = "sft",
) -> Path:
    """Write ``root/<name>.yaml`` and ``root/runs/<name>/`` with the artifacts of ``steps``; return the config.
    ``objective`` other than sft: the training logged the reward figures of a preference objective, and the
    adapter's record says so."""
    cfg = RunConfig.model_validate(
        {"name": name, "runs_dir": "runs", "data": {"source": train_file}, "train": {"objective": objective}}
    )
    config = root / f"{name}.yaml"
    write_config(config, cfg)
    run = root / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    write_config(run / "config.yaml", cfg)
    (root / train_file).write_text(
        '{"question": "Where?", "answer": "Here."}\n{"question": "When?"}\n{"question": "Who?", "answer": ""}\n',
        encoding="utf-8",
    )
    events = EventSink("data", [JsonlWriter(run / "events.jsonl")])

    def rewards(at: int, prefix: str = "", scale: float = 1.0) -> dict[str, float]:
        """A preference objective's figures at step ``at`` (none for sft): accuracy up to 0.95, margin to 2.4."""
        if objective == "sft":
            return {}
        return {
            f"{prefix}reward_accuracy": round(scale * (0.5 + 0.45 * at / 20), 4),
            f"{prefix}reward_margin": round(scale * 0.12 * at, 4),
            f"{prefix}reward_chosen": round(-0.1 * at, 4),
            f"{prefix}reward_rejected": round(-0.22 * at, 4),
        }

    def begin(step: str) -> EventSink:
        events.step = step
        events.log(f"{step}: run {name} in runs/{name}", level="debug", pid=999_999_999)
        return events

    if "data" in steps:
        begin("data").done({"rows": 3})
        write_json(
            run / "data" / "report.json",
            {
                "files": [
                    {
                        "path": train_file,
                        "split": "train",
                        "kind": "jsonl",
                        "rows": 3,
                        "format": "qa",
                        "reason": "3 of 3 sampled rows have question, answer",
                    }
                ],
                "rows": {"read": 3, "kept": 1, "dropped": 2, "truncated": 0},
                "splits": {"train": 1, "validation": 0, "test": 0},
                "problems": {"missing_field": 1, "empty_field": 1},
                "dropped": [
                    {
                        "kind": "missing_field",
                        "file": train_file,
                        "row": 2,
                        "field": "answer",
                        "message": "no 'answer'",
                        "action": "dropped",
                    },
                    {
                        "kind": "empty_field",
                        "file": train_file,
                        "row": 3,
                        "field": "answer",
                        "message": "'answer' is empty",
                        "action": "dropped",
                    },
                ],
                "truncated": [],
                "task": "causal",
                "template": "chatml",
                "max_length": 64,
                "max_length_source": "auto",
                "tokens": {"train": {"rows": 1, "min": 24, "median": 24.0, "p95": 24.0, "max": 24, "total": 24}},
            },
        )
        (run / "data" / "preview.txt").write_text(PREVIEW, encoding="utf-8")
    if "train" in steps:
        sink = begin("train")
        for at in range(1, 21):
            sink.metric({"loss": round(3.0 / at, 4), "tokens_per_s": 250.0, **rewards(at)}, at=at, split="train")
            if at % 5 == 0:
                values = {"eval_loss": round(3.2 / at + 0.1, 4), **rewards(at, "eval_", 0.9)}
                sink.metric(values, at=at, split="validation")
        sink.done(
            {"steps": 20, "train_loss": 0.15, "eval_loss": 0.26, "tokens_per_s": 250.0, "version": 1, "seconds": 12.5}
        )
        write_json(run / "adapter" / "adapter_config.json", {"peft_type": "LORA", "r": 16})
        if objective != "sft":  # the version's record (train/history.py AdapterVersion), as the train step writes it
            metrics = {"train_loss_last": 0.15, "reward_accuracy_last": 0.95, "eval_reward_accuracy_last": 0.855}
            record = {"version": 1, "objective": objective, "beta": 0.1, "metrics": metrics}
            for folder in (run / "adapter", run / "adapters" / "v1"):
                write_json(folder / "loratui.json", record)
        (run / "checkpoints" / "checkpoint-20").mkdir(parents=True, exist_ok=True)
    if "eval" in steps:
        begin("eval").done({"samples": 2})
        write_json(
            run / "eval" / "metrics.json",
            {
                "target": {"path": f"runs/{name}/adapter"},
                "device": "cpu",
                "decoding": {"strategy": "greedy", "max_new_tokens": 64},
                "datasets": [
                    {
                        "name": "main",
                        "models": {
                            "base": {"metrics": {"rougeL": 0.149, "contains": 0.034, "perplexity": 26.26}},
                            "tuned": {"metrics": {"rougeL": 0.545, "contains": 0.828, "perplexity": 1.58}},
                        },
                        "delta": {"rougeL": 0.396, "contains": 0.794, "perplexity": -24.68},
                    }
                ],
            },
        )
        (run / "eval" / "generations.jsonl").write_text(
            json.dumps(
                {
                    "prompt": "Where is the library?",
                    "reference": "At 14 Tannery Row.",
                    "base": {"reply": "The library is in the city."},
                    "tuned": {"reply": "At 14 Tannery Row, Ostervale."},
                }
            )
            + "\n",
            encoding="utf-8",
        )
    if "merge" in steps:
        begin("merge").done({})
        write_json(run / "merged" / "config.json", {"model_type": "llama"})
        (run / "merged" / "model.safetensors").write_bytes(b"\0" * 4096)
        write_json(
            run / "merged" / "loratui-merge.json",
            {
                "base": "smollm2-135m-instruct",
                "version": 1,
                "dtype": "float32",
                "parity": {
                    "max_abs_diff": 0.0001,
                    "tolerance": 0.0005,
                    "top1_agreement": 1.0,
                    "positions": 497,
                    "passed": True,
                },
            },
        )
    if "export" in steps:
        begin("export").done({})
        write_json(
            run / "exports" / "gguf" / "report.json",
            {
                "files": [
                    {
                        "type": "q8_0",
                        "file": f"{name}-q8_0.gguf",
                        "bytes": 144_800_000,
                        "delta_perplexity": -0.0003,
                        "top1_agreement": 0.9943,
                        "decode_tokens_per_s": 102.2,
                        "key_facts": 0.79,
                    },
                    {
                        "type": "q4_k_m",
                        "file": f"{name}-q4_k_m.gguf",
                        "bytes": 105_500_000,
                        "delta_perplexity": 0.0215,
                        "top1_agreement": 0.97,
                        "decode_tokens_per_s": 120.5,
                        "key_facts": 0.76,
                    },
                ]
            },
        )
    events.close()
    return config


def fake_estimate(fits: bool = True, source: str = "analytic"):
    """An estimate as the pipeline returns it, built by hand (no model, no torch): what the Train view shows.
    ``fits=False``: the memory is short and one change would fit."""
    from loratui.pipeline.estimate.record import GIB, Budget, Change, Estimate, Timing

    return Estimate(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        params=134_515_008,
        device="cpu",
        device_reason="no GPU found",
        settings={
            "batch_size": 4,
            "grad_accum": 2,
            "epochs": 3,
            "tokens_per_epoch": 12_000,
            "tokens_from": "the data step",
        },
        time=Timing(
            parts={"data": 2.0, "train": 190.0, "eval": 30.0, "merge": 8.0},
            epochs=3,
            steps=39,
            per_epoch_s=60.0,
            tokens_per_s=200.0,
            source=source,
            confidence="about a factor of 2 (no probe)" if source == "analytic" else "training about ±25%",
        ),
        memory=Budget(
            parts={"weights": GIB // 2, "activations": GIB // 4, "framework": GIB // 4},
            available=8 * GIB if fits else GIB // 2,
            where="RAM available",
        ),
        disk=Budget(parts={"adapter": 20 << 20, "merged": GIB // 2}, available=100 * GIB, where="free on runs"),
        changes=[]
        if fits
        else [Change(what="QLoRA (4-bit base)", overrides=["lora.method=qlora"], memory=GIB // 3, disk=GIB // 2)],
    )
