"""``data.augment`` speed: template variations of 10,000 training rows, checked against 1,000 held-out questions.

Generates varied questions deterministically (frames x topics x details), runs the data step's augmentation
(:func:`loratui.pipeline.data.augment.augment`: template rewrites, the copy check and the held-out leakage
filter with its n-gram index) on them, and times it; then times the naive leakage filter (every variation
against every held-out question's word/word-pair set) on the first ``--naive-rows`` rows' variations as the baseline,
scaled to the same number of variations. Everything measured is printed; nothing is hard-coded.

    .venv/bin/python bench/augment_speed.py [--rows 10000] [--held-out 1000] [--variations 2] [--repeat 3]

Target: the whole augmentation of 10,000 rows in < 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 10.0
SEED = 1234

_FRAMES = (
    "What is the {a} {b} of the {c} {d}?",
    "How do I {v} the {a} {b} in the {c} {d}?",
    "Why does the {c} {v} its {b} every {t}?",
    "Can I {v} my {b} at the {c} {d} during the {t}?",
    "Where can I find the {a} {b} for the {d} {c}?",
    "When does the {c} {v} the {b} and the {d}?",
    "Explain how to {v} a {a} {b} for the {c} {d}.",
    "Is it possible to {v} the {b} of a {a} {c} after the {t}?",
    "Which {b} should I {v} for a {a} {c} with a {d}?",
    "Who is responsible for the {a} {b} at the {c} {d}?",
)
_A = "new old main public private small large daily monthly annual local remote shared default secure fast".split()
_B = (
    "ticket timetable password account invoice cabin schedule report budget policy license backup server "
    "route payment refund contract booking membership voucher certificate permit"
).split()
_C = (
    "ferry library museum harbour station clinic school office airport hotel warehouse bakery stadium "
    "gallery theatre market garden kitchen laboratory archive"
).split()
_V = "renew change cancel update check print share book upgrade transfer review export reset extend".split()
_D = (
    "entrance exit window desk counter kiosk lobby garage terminal platform corridor elevator stairs basement "
    "rooftop courtyard canteen locker printer scanner"
).split()
_NOUNS = _B + _C + _D
_T = "weekend summer winter morning evening holiday month quarter night season".split()


def questions(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct questions drawn from the frames and word lists."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        frame = rng.choice(_FRAMES)
        nouns = rng.sample(_NOUNS, 3)  # nouns from one pool: few questions share all but one word
        q = frame.format(a=rng.choice(_A), b=nouns[0], c=nouns[1], v=rng.choice(_V), t=rng.choice(_T), d=nouns[2])
        seen.setdefault(q, None)
    return list(seen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--held-out", type=int, default=1_000)
    parser.add_argument("--variations", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-rows", type=int, default=500, help="rows whose variations the naive filter checks")
    add_json_arg(parser)
    args = parser.parse_args()

    from loratui.pipeline.config import AugmentSection
    from loratui.pipeline.data import augment as aug
    from loratui.pipeline.data.formats import Example

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor() or platform.machine(),
    )
    print(f"$ {' '.join(sys.argv)}")
    print(f"# {cpu}, {cores} usable cores, python {platform.python_version()}")

    rng = random.Random(SEED)
    pool = questions(args.rows + args.held_out, rng)
    train_q, held_q = pool[: args.rows], pool[args.rows :]

    def row(i: int, q: str) -> Example:
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": f"Answer {i}."}]
        return Example("train.jsonl", i + 1, messages=messages)

    splits = {
        "train": [row(i, q) for i, q in enumerate(train_q)],
        "validation": [row(i, q) for i, q in enumerate(held_q[: len(held_q) // 2])],
        "test": [row(i, q) for i, q in enumerate(held_q[len(held_q) // 2 :])],
    }
    settings = AugmentSection(variations=args.variations)
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        out, report = aug.augment(settings, splits)
        times.append(time.perf_counter() - started)
    best, median = min(times), statistics.median(times)
    added = sum(report.added.values())

    # the parts: template rewrites alone, the index build, and the filter with the index vs the naive one
    started = time.perf_counter()
    candidates = list(aug.template_variations(train_q, settings))
    t_template = time.perf_counter() - started
    started = time.perf_counter()
    index = aug.HeldOutIndex(held_q, settings.max_overlap)
    t_index = time.perf_counter() - started
    started = time.perf_counter()
    indexed_hits = sum(1 for c in candidates if index.match(c.text))
    t_filter = time.perf_counter() - started
    subset = [c for c in candidates if c.row < args.naive_rows]
    held_grams = [aug.grams(aug.normalize(q)) for q in held_q]
    started = time.perf_counter()
    naive_hits = 0
    for c in subset:
        gs = aug.grams(aug.normalize(c.text))
        naive_hits += any(len(gs & h) > settings.max_overlap * len(h) for h in held_grams)
    t_naive = (time.perf_counter() - started) * len(candidates) / max(len(subset), 1)
    subset_indexed = sum(1 for c in subset if index.match(c.text))

    print()
    print(f"{args.rows:,} training rows x {args.variations} variations, {len(held_q):,} held-out questions")
    print(
        f"augment (template + copy check + leakage filter): best {best:.2f} s, median {median:.2f} s of {args.repeat}"
    )
    print(f"  {added:,} variations added, dropped: {dict(report.dropped)}; {len(out):,} training rows after")
    print(f"  template rewrites alone: {t_template:.2f} s for {len(candidates):,} candidates")
    print(f"  held-out index build: {t_index:.3f} s; filter with the index: {t_filter:.2f} s ({indexed_hits} matches)")
    print(
        f"  naive filter (every variation x every held-out word/word-pair set), scaled from {len(subset):,} candidates: "
        f"{t_naive:.1f} s ({naive_hits} matches there, the index found {subset_indexed})"
    )
    ratio = t_naive / t_filter if t_filter else None
    print(f"  index vs naive filter: {ratio:.0f}x faster" if ratio else "")
    met = best < TARGET_S
    print(f"target: < {TARGET_S:.0f} s for the whole augmentation: {'met' if met else 'NOT met'} ({best:.2f} s)")
    record(
        args.json,
        "augment_speed",
        f"template augmentation of {args.rows:,} rows x {args.variations} vs {len(held_q):,} held-out questions",
        f"{best:.2f} s",
        f"naive leakage filter alone {t_naive:.1f} s",
        ratio,
        f"< {TARGET_S:.0f} s",
        met,
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
