"""Preference probe: does a model put the chosen reply above the rejected one, on the bundled `preference` data?

Standalone (transformers + peft, no loratui training): each row of a split of ``loratui/data/preference``
is rendered with the model's chat template (the prompt as a user turn, each reply as the assistant
turn), and the reply is scored by the SUM of its tokens' log-probabilities, end-of-turn token included
(DPO's measure). A row counts when chosen > rejected. Prints accuracy and mean margin overall and per
`kind`, the mean token lengths of chosen and rejected (a length gap alone would tilt summed
log-probabilities), and the time taken.

    .venv/bin/python bench/preference_probe.py                        # base SmolLM2-135M-Instruct
    .venv/bin/python bench/preference_probe.py --adapter runs/preference/adapters/v1
    .venv/bin/python bench/preference_probe.py --adapter runs/preference/adapters/v1,runs/preference/adapters/v2

``--adapter A,B`` applies adapters in order, each merged before the next (``train.mode: stack``: an SFT
adapter, then the DPO adapter trained on top of it); ``--adapter`` may be given several times, each one a
separate model scored after the base. Target: the base model near chance (0.35 to 0.65).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "loratui" / "data" / "preference"


def load_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def encode_reply(tokenizer, prompt: str, reply: str) -> tuple[list[int], int, int]:
    """Token ids of the rendered conversation, and the [start, end) span of the reply's scored tokens:
    the reply and the end-of-turn token, not the template's trailing newline."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=False
    )
    assert full.startswith(head), "the chat template does not render the prompt as a prefix of the conversation"
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    assert ids[:start] == tokenizer(head, add_special_tokens=False)["input_ids"], "prompt tokens change"
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    end = (ids.index(eot, start) + 1) if eot in ids[start:] else len(ids)
    return ids, start, end


@torch.no_grad()
def reply_logprobs(model, tokenizer, items: list[tuple[str, str]], batch: int = 16) -> list[float]:
    """Summed log-probability of each (prompt, reply)'s reply tokens."""
    encoded = [encode_reply(tokenizer, p, r) for p, r in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(encoded)
    for i in range(0, len(order), batch):
        chunk = [encoded[k] for k in order[i : i + batch]]
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, _, _) in enumerate(chunk):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        for j, (ids, start, end) in enumerate(chunk):
            # logits only where a reply token is predicted (the vocabulary projection dominates otherwise)
            logp = torch.log_softmax(model.get_output_embeddings()(hidden[j, start - 1 : end - 1]).float(), dim=-1)
            out[order[i + j]] = float(logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum())
    return out


def score(model, tokenizer, rows: list[dict]) -> dict:
    chosen = reply_logprobs(model, tokenizer, [(r["prompt"], r["chosen"]) for r in rows])
    rejected = reply_logprobs(model, tokenizer, [(r["prompt"], r["rejected"]) for r in rows])
    groups: dict[str, list[float]] = defaultdict(list)
    for r, c, j in zip(rows, chosen, rejected):
        groups["all"].append(c - j)
        groups[r.get("kind", "?")].append(c - j)
    return {
        kind: {
            "n": len(m),
            "accuracy": sum(x > 0 for x in m) / len(m),
            "margin": sum(m) / len(m),
        }
        for kind, m in groups.items()
    }


def length_stats(tokenizer, rows: list[dict]) -> dict:
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        pair = (n(r["chosen"]), n(r["rejected"]))
        groups["all"].append(pair)
        groups[r.get("kind", "?")].append(pair)
    return {
        kind: {
            "chosen": sum(c for c, _ in p) / len(p),
            "rejected": sum(j for _, j in p) / len(p),
            "chosen_longer": sum(c > j for c, j in p) / len(p),
            "max_gap": max(abs(c - j) for c, j in p),
        }
        for kind, p in groups.items()
    }


def load_model(base_dir: str, adapters: list[str]):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapters:
        from peft import PeftModel

        for path in adapters:
            model = PeftModel.from_pretrained(model, path).merge_and_unload().eval()
    return model


def report(name: str, res: dict, seconds: float) -> None:
    print(
        f"\n{name}: preference accuracy {res['all']['accuracy']:.3f}, mean margin {res['all']['margin']:+.2f} nats "
        f"({res['all']['n']} rows, {seconds:.1f} s)"
    )
    for kind, v in sorted(res.items()):
        if kind != "all":
            print(f"  {kind:18s} n={v['n']:3d}  accuracy {v['accuracy']:.3f}  margin {v['margin']:+7.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a loratui model.base (built-in name or folder)")
    ap.add_argument(
        "--adapter", action="append", default=[], help="adapter folder(s), comma-separated to apply in order"
    )
    add_json_arg(ap)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from loratui.pipeline.models import resolve_model  # finds the built-in locally; no download

    t0 = time.time()
    base_dir = str(resolve_model(args.model).path)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = load_rows(args.split)
    print(
        f"preference/{args.split}: {len(rows)} rows; model {args.model} ({base_dir}); torch threads "
        f"{torch.get_num_threads()}"
    )
    lengths = length_stats(tokenizer, rows)
    print(
        "mean reply length in SmolLM2 tokens (chosen / rejected; share of pairs where chosen is longer; "
        "largest gap in a pair):"
    )
    for kind, v in sorted(lengths.items()):
        print(
            f"  {kind:18s} {v['chosen']:5.1f} / {v['rejected']:5.1f}  chosen longer {v['chosen_longer']:.2f}  "
            f"max gap {v['max_gap']}"
        )
    results = {}
    for name, adapters in [("base", [])] + [(spec, spec.split(",")) for spec in args.adapter]:
        t = time.time()
        model = load_model(base_dir, adapters)
        results[name] = score(model, tokenizer, rows)
        report(name, results[name], time.time() - t)
    print(f"\ntotal {time.time() - t0:.1f} s")
    base_acc = results["base"]["all"]["accuracy"]
    record(
        args.json,
        "preference_probe",
        f"base model preference accuracy, preference/{args.split}",
        f"{base_acc:.3f}",
        "chance 0.5",
        None,
        "0.35 to 0.65",
        0.35 <= base_acc <= 0.65,
    )
    for name in results:
        if name != "base":
            acc = results[name]["all"]["accuracy"]
            record(
                args.json,
                "preference_probe",
                f"preference accuracy, {name}",
                f"{acc:.3f}",
                f"base model {base_acc:.3f}",
                None,
                "above the base",
                acc > base_acc,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
