"""Quickstart quality: does the trained adapter answer the held-out paraphrases with the key fact?

Greedy answers of the base model and of base + the run's adapter to every row of the test split
(questions paraphrased away from the training rows, ``loratui/data/quickstart/test.jsonl``). A row
counts when the normalized key fact (``fact``) appears in the normalized answer. The Evaluate step
builds the full metrics; this is the small check the train issue asks for.

    loratui train --config examples/quickstart.yaml
    .venv/bin/python bench/quickstart_quality.py [--run runs/quickstart]

Target: the tuned model's fact match >= 0.8 (the base model's figure is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

TEST = Path(__file__).resolve().parent.parent / "loratui" / "data" / "quickstart" / "test.jsonl"


def normalize(text: str) -> str:
    text = re.sub(r"[^\w/:.@-]+", " ", text.lower())
    return " ".join(w.strip(".") for w in text.split())


def answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    out: list[str] = []
    for i in range(0, len(prompts), 8):
        batch = tokenizer(
            prompts[i : i + 8], return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False
        )
        with torch.no_grad():
            gen = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        out += tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def score(rows: list[dict], replies: list[str]) -> float:
    return sum(normalize(r["fact"]) in normalize(a) for r, a in zip(rows, replies)) / len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart", help="run directory with adapter/ and data/dataset.json")
    ap.add_argument("--show", type=int, default=5, help="print this many answers")
    add_json_arg(ap)
    args = ap.parse_args()
    run = Path(args.run)
    manifest = json.loads((run / "data" / "dataset.json").read_text())
    rows = [json.loads(line) for line in TEST.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(manifest["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(manifest["model_dir"], dtype=torch.float32).eval()
    t = time.time()
    base = answers(model, tokenizer, [r["question"] for r in rows])
    tuned_model = PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    tuned = answers(tuned_model, tokenizer, [r["question"] for r in rows])
    history = json.loads((run / "adapters" / "history.json").read_text())
    current = next(v for v in history["versions"] if v["version"] == history["current"])
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    train_s = [e for e in events if e.get("step") == "train" and e.get("type") == "done"]
    print(f"quickstart test split: {len(rows)} held-out paraphrases, greedy decoding ({time.time() - t:.0f}s)")
    print(f"  base  fact match {score(rows, base):.3f}")
    print(f"  tuned fact match {score(rows, tuned):.3f}  (target >= 0.8)")
    record(
        args.json,
        "quickstart_quality",
        "key-fact match on held-out paraphrases, tuned",
        f"{score(rows, tuned):.3f}",
        f"base model {score(rows, base):.3f}",
        None,
        ">= 0.8",
        score(rows, tuned) >= 0.8,
    )
    print(
        f"  training: {current['steps']} steps, last train loss {current['metrics']['train_loss_last']:.4f}, "
        f"{train_s[-1]['seconds'] if train_s else '?'} s for the whole train step"
    )
    for r, b, a in list(zip(rows, base, tuned))[: args.show]:
        print(f"- Q: {r['question']}\n  fact: {r['fact']}\n  base:  {b.strip()[:120]}\n  tuned: {a.strip()[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
