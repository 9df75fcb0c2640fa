"""Training throughput: loratui's train step against the usual Trainer + peft recipe, same data, same machine.

Three runs on SmolLM2-135M-Instruct (the embedded model) and the quickstart data, each in its own
process (so peak memory is its own), each measured over the same optimizer steps:

* **loratui**: ``loratui train`` with its defaults (padding-free batches, shared prompt prefix
  computed once, logits only where trained, LoRA dropout 0, fp32 on a CPU without native bf16).
* **baseline**: transformers ``Trainer`` + peft, fp32, padding to the longest example of each
  micro-batch (``DataCollatorForSeq2Seq``), the same LoRA targets (all-linear), rank, alpha and batch,
  lora_dropout 0.05 as in the common recipes.
* **older recipe**: the same, but every example padded to 512 tokens, LoRA on ``q_proj, v_proj``, r=8.

Trained tokens are the examples' own tokens (no padding); loratui computes a shared prefix once but
counts it for every example, exactly as the example holds it. The first optimizer step is warm-up and
not counted. Everything printed is measured in this run.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--old-steps 2]

Target: loratui >= 2.0x the baseline's trained tokens/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit code and the child's peak RSS in MiB."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def run_loratui(work: Path, steps: int) -> dict:
    runs = work / "runs"
    cmd = [sys.executable, "-m", "loratui", "train", "--config", str(ROOT / "examples" / "quickstart.yaml"),
           f"runs_dir={runs}", "name=bench", f"train.max_steps={steps + 1}", "train.keep_best=false",
           "train.save_every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code, peak = _wait(proc)
    if code != 0:
        raise SystemExit(f"loratui train failed ({code}):\n{proc.stderr.read()[-3000:]}")
    events = [json.loads(line) for line in (runs / "bench" / "events.jsonl").read_text().splitlines()]
    rows = {e["at"]: e for e in events if e["type"] == "metric" and e.get("split") == "train"}
    first, last = rows[1], rows[steps + 1]
    config = (runs / "bench" / "config.yaml").read_text()
    micro = next(line.split(":")[1].strip() for line in config.splitlines() if line.strip().startswith("batch_size:"))
    accum = next(line.split(":")[1].strip() for line in config.splitlines() if line.strip().startswith("grad_accum:"))
    return {"tokens": last["values"]["tokens"] - first["values"]["tokens"], "seconds": last["t"] - first["t"],
            "peak_mib": peak, "micro": int(micro), "accum": int(accum)}


def child(kind: str, data_dir: str, micro: int, accum: int, steps: int) -> None:
    """One baseline recipe in this process; prints its measurement as JSON."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    train = load_from_disk(str(Path(data_dir) / manifest["splits"]["train"])).select_columns(["input_ids", "labels"])
    tokenizer = AutoTokenizer.from_pretrained(manifest["model_dir"])
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(manifest["model_dir"], dtype=torch.float32)
    old = kind == "old"
    lora = LoraConfig(r=8 if old else 16, lora_alpha=16 if old else 32, lora_dropout=0.05,
                      target_modules=["q_proj", "v_proj"] if old else "all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length" if old else "longest", max_length=512 if old else None,
                                      label_pad_token_id=-100)
    marks: list[tuple[float, int]] = []
    seen = {"tokens": 0}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), seen["tokens"]))

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            seen["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                                 max_steps=steps + 1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.05,
                                 use_cpu=True, save_strategy="no", report_to="none", seed=42, logging_steps=1,
                                 disable_tqdm=True, remove_unused_columns=False)
        CountingTrainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[Count()]).train()
    (t0, k0), (t1, k1) = marks[0], marks[-1]
    print(json.dumps({"tokens": k1 - k0, "seconds": t1 - t0}))


def run_child(kind: str, data_dir: Path, micro: int, accum: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data_dir), "--micro", str(micro),
           "--accum", str(accum), "--steps", str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, peak = _wait(proc)
    out = proc.stdout.read()
    if code != 0:
        raise SystemExit(f"{kind} failed ({code}):\n{proc.stderr.read()[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps (after one warm-up step)")
    ap.add_argument("--old-steps", type=int, default=2, help="measured steps of the (slow) 512-padded recipe")
    add_json_arg(ap)
    ap.add_argument("--child", choices=["baseline", "old"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.micro, args.accum, args.steps)
        return 0
    with tempfile.TemporaryDirectory(prefix="loratui-bench-") as tmp:
        work = Path(tmp)
        started = time.time()
        ours = run_loratui(work, args.steps)
        data_dir = work / "runs" / "bench" / "data"
        base = run_child("baseline", data_dir, ours["micro"], ours["accum"], args.steps)
        old = run_child("old", data_dir, ours["micro"], ours["accum"], args.old_steps)
    rows = [("loratui defaults", ours), ("baseline: Trainer + peft, pad to longest", base),
            ("older recipe: pad to 512, q_proj+v_proj, r=8", old)]
    ref = base["tokens"] / base["seconds"]
    print(f"train throughput, SmolLM2-135M-Instruct, quickstart data, micro-batch {ours['micro']} x accumulation "
          f"{ours['accum']}, {platform.machine()} {os.cpu_count()} CPUs, torch threads default "
          f"({time.time() - started:.0f}s)")
    print(f"{'recipe':<48} {'trained tok/s':>13} {'vs baseline':>11} {'peak RSS MiB':>12}")
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        print(f"{name:<48} {rate:>13.1f} {rate / ref:>10.2f}x {r['peak_mib']:>12.0f}")
    ratio = ours["tokens"] / ours["seconds"] / ref
    print(f"target: loratui >= 2.0x baseline: {'met' if ratio >= 2.0 else 'NOT met'} ({ratio:.2f}x)")
    record(args.json, "train_throughput", "trained tokens/s, loratui train defaults",
           f"{ours['tokens'] / ours['seconds']:.1f} tok/s", f"Trainer + peft, pad to longest {ref:.1f} tok/s", ratio,
           ">= 2.0x", ratio >= 2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
