"""Data step throughput: 100k alpaca rows through the real data step, against a naive per-row baseline.

Generates rows deterministically into a temporary JSONL file, runs the data step end to end in-process
(``run_step("data", ...)``), times its stages separately on the same data (read + validate, and
template + tokenize + mask for the train split), times the naive approach (two
``apply_chat_template`` calls per row) on the first 5,000 rows, and a second run of the step with the
same inputs (the cache hit). Everything measured is printed; nothing is hard-coded.

    .venv/bin/python bench/data_prep.py [--rows 100000] [--repeat 3] [--num-proc N] [--profile ROWS]

Target: the full step at >= 5,000 rows/s on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_ROWS_PER_S = 5000.0
TARGET_CORES = 2
BASELINE_ROWS = 5000
SEED = 1234
MIN_TOKENS, MAX_TOKENS = 20, 200  # content tokens per generated row

# --------------------------------------------------------------------------------------------
# Deterministic alpaca rows
# --------------------------------------------------------------------------------------------

_WORDS = (
    "the a an of to and in for on with by from at as is are was were be been has have had will would can "
    "could should may might must this that these those it its they their there here which who what when "
    "where why how all any each every some many few more most less least other such only own same so than "
    "too very just also not no yes new old good great small large long short high low early late first last "
    "next simple clear quick easy hard important common different possible available local public private "
    "system process data file model user customer team project report result value number time day week "
    "month year price cost order account service product market plan goal problem solution question answer "
    "example method step rule policy request response message email letter document page table list record "
    "network server database query function variable loop error test version release update feature design "
    "energy water food health school student teacher city country history science music art language river "
    "mountain garden kitchen recipe travel train flight hotel ticket budget invoice payment contract meeting "
    "use make take give find keep show send check build run read write learn explain describe compare improve "
    "reduce increase measure choose follow create remove change open close start finish help need want know "
    "think include provide support require allow expect consider suggest review prepare share store"
).split()
_TOPICS = [
    "photosynthesis",
    "compound interest",
    "a binary search",
    "the water cycle",
    "public key cryptography",
    "supply and demand",
    "vaccines",
    "a hash table",
    "climate change",
    "the French Revolution",
    "inflation",
    "machine learning",
    "plate tectonics",
    "a sourdough starter",
    "HTTP caching",
    "the immune system",
    "container orchestration",
    "solar panels",
    "the stock market",
    "recursion",
    "DNS resolution",
    "gravity",
]
_NAMES = ["Maria", "John", "Aisha", "Kenji", "Lucas", "Priya", "Olga", "Tom", "Fatima", "Chen", "Sofia", "Ravi"]
_LANGS = ["French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Swedish"]
_DOMAINS = ["example.com", "example.org", "mail.example.net", "company.example", "uni.example.edu"]
_INSTRUCTIONS = [
    "Explain how {topic} works in simple terms.",
    "Write a short email to {name} about the {noun} {verb}.",
    "Summarize the following text.",
    "Translate the following sentence into {lang}.",
    "List {n} tips for a better {noun}.",
    "What is {a} plus {b}?",
    "Give three reasons why {topic} matters.",
    "Classify the sentiment of the following review as positive, negative or neutral.",
    "Extract all e-mail addresses and links from the text below.",
    "Rewrite the following paragraph in a formal tone.",
    "Describe the main steps to {verb} a {noun}.",
    "Write a Python function that returns the {noun} count for a list of {noun2}s.",
    "Answer the question using the context.",
    "Compare {topic} and {topic2}.",
    "Convert {n} kilometers to miles and show the calculation.",
    "Suggest a title for an article about {topic}.",
    "Fix the grammar in the following sentence.",
    "How many days are there between {d1} and {d2}?",
    "Draft a polite reply to a customer who asks about order #{order}.",
    "Create a to-do list for planning a {noun} {noun2}.",
]
_WITH_INPUT = {2, 3, 7, 8, 9, 12, 16}  # instructions that always come with an input


def _email(rng: random.Random) -> str:
    return f"{rng.choice(_NAMES).lower()}.{rng.choice(_WORDS)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"


def _url(rng: random.Random) -> str:
    path = "/".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
    host = f"{rng.choice(['www', 'docs', 'shop', 'help'])}.{rng.choice(_DOMAINS)}"
    return f"https://{host}/{path}?id={rng.randint(1, 99999)}"


def _token(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.015:
        return _email(rng)
    if r < 0.03:
        return _url(rng)
    if r < 0.08:
        return rng.choice(
            [
                str(rng.randint(0, 9999)),
                f"{rng.uniform(0, 100):.2f}",
                f"{rng.randint(1, 99)}%",
                f"{rng.randint(1, 28)}.{rng.randint(1, 12)}.{rng.randint(1990, 2030)}",
            ]
        )
    if r < 0.10:
        return rng.choice(_NAMES)
    return rng.choice(_WORDS)


def _sentences(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while words > 0:
        n = min(words, rng.randint(5, 16))
        ws = [_token(rng) for _ in range(n)]
        ws[0] = ws[0][:1].upper() + ws[0][1:]
        if n > 6 and rng.random() < 0.3:
            ws[rng.randint(2, n - 2)] += ","
        out.append(" ".join(ws) + rng.choice([".", ".", ".", "!", "?"]))
        words -= n
    return " ".join(out)


def _output(rng: random.Random, words: int, kind: int) -> str:
    style = rng.random()
    if kind == 11 and style < 0.8:  # code
        var = rng.choice(_WORDS)
        body = [
            f"def count_{var}(items):",
            f'    """{_sentences(rng, max(4, words // 4))}"""',
            "    total = 0",
            "    for item in items:",
            f"        if item.get('{rng.choice(_WORDS)}'):",
            "            total += 1",
            "    return total",
        ]
        code = "\n".join(body)
        return f"Here is a function:\n\n```python\n{code}\n```\n\n" + _sentences(rng, max(3, words // 3))
    if style < 0.25:  # a numbered list
        items, left = [], words
        while left > 0:
            n = min(left, rng.randint(4, 12))
            items.append(f"{len(items) + 1}. {_sentences(rng, n)}")
            left -= n
        return "\n".join(items)
    if style < 0.35:
        return f"{_sentences(rng, words)}\n\nFor details see {_url(rng)} or write to {_email(rng)}."
    return _sentences(rng, words)


def make_row(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(len(_INSTRUCTIONS))
    a, b = rng.randint(1, 10 ** rng.randint(1, 6)), rng.randint(1, 10 ** rng.randint(1, 6))
    instruction = _INSTRUCTIONS[kind].format(
        topic=rng.choice(_TOPICS),
        topic2=rng.choice(_TOPICS),
        name=rng.choice(_NAMES),
        lang=rng.choice(_LANGS),
        noun=rng.choice(_WORDS),
        noun2=rng.choice(_WORDS),
        verb=rng.choice(_WORDS),
        n=rng.randint(2, 9),
        a=a,
        b=b,
        d1=f"{rng.randint(2000, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        d2=f"{rng.randint(2025, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        order=rng.randint(10000, 999999),
    )
    # Content tokens per row (instruction + input + output) between ~20 and ~200, skewed short like real
    # instruction data; ~1.9 tokens per generated word for this vocabulary.
    budget_words = int((24 + 150 * rng.betavariate(1.6, 3.0)) / 1.9)
    budget_words -= len(instruction.split())
    inp = ""
    if kind in _WITH_INPUT or rng.random() < 0.15:
        in_words = max(4, int(budget_words * rng.uniform(0.2, 0.5)))
        inp = _sentences(rng, in_words)
        if kind == 8:
            inp += f" Contact {_email(rng)} or see {_url(rng)}."
        budget_words -= len(inp.split())
    out_words = max(3, budget_words)
    if kind == 5:
        output = f"{a} plus {b} is {a + b}." + (" " + _sentences(rng, out_words - 5) if out_words > 8 else "")
    else:
        output = _output(rng, out_words, kind)
    return {"instruction": instruction, "input": inp, "output": output}


def content_tokens(rows: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """Tokens of instruction (+ input) and output per row, without any template."""
    prompts = [f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"] for r in rows]
    a = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    b = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    return [len(x) + len(y) for x, y in zip(a, b)]


def write_rows(
    path: Path, n: int, tokenizer: Any, seed: int = SEED, lo: int = MIN_TOKENS, hi: int = MAX_TOKENS
) -> tuple[list[dict[str, str]], list[int]]:
    """``n`` rows whose content is ``lo``..``hi`` tokens: rows outside are redrawn from the same stream."""
    rng = random.Random(seed)
    rows = [make_row(rng) for _ in range(n)]
    lens = content_tokens(rows, tokenizer)
    bad = [i for i, k in enumerate(lens) if not lo <= k <= hi]
    while bad:
        redrawn = [make_row(rng) for _ in bad]
        for i, row, k in zip(bad, redrawn, content_tokens(redrawn, tokenizer)):
            rows[i], lens[i] = row, k
        bad = [i for i in bad if not lo <= lens[i] <= hi]
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows, lens


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def naive_encode(examples: list[Any], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """The per-row approach: render+tokenize the conversation, then the prompt, mask the prefix."""
    out = []
    for ex in examples:
        messages = ex.messages
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        labels = [-100] * len(prompt) + list(ids[len(prompt) :])
        out.append((list(ids), labels))
    return out


def machine() -> list[tuple[str, str]]:
    import datasets
    import tokenizers
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("nproc (usable cores)", str(usable)),
        ("cpu_count", str(os.cpu_count())),
        ("CPU model", cpu),
        ("python", platform.python_version()),
        ("tokenizers", tokenizers.__version__),
        ("transformers", transformers.__version__),
        ("datasets", datasets.__version__),
        ("platform", platform.platform()),
        ("load average (1/5/15 min) at the end", " / ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def step_run(overrides: list[str], name: str) -> tuple[float, Any, list[Any]]:
    from loratui.pipeline.config import load_config
    from loratui.pipeline.data.step import run
    from loratui.pipeline.events import MemoryWriter
    from loratui.pipeline.steps import run_step

    cfg = load_config(None, overrides + [f"name={name}"])
    mem = MemoryWriter()
    t0 = time.perf_counter()
    code, result, _ = run_step("data", run, cfg, writers=[mem])
    seconds = time.perf_counter() - t0
    if code != 0 or result is None:
        errors = [e.message for e in mem.of_type("error")]
        raise SystemExit(f"data step failed (exit {code}): {errors}")
    return seconds, result, mem


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows to generate (default 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="cold runs of the full step; the median is reported")
    ap.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="also time encode_examples with this num_proc (default: not measured)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="cProfile encode_examples on this many train rows and print the top 15 (default off)",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: shown below

    from loratui.pipeline.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct").path  # the prepared model, normal LORATUI_HOME

    _, import_s = timed(lambda: (__import__("transformers"), __import__("datasets")))

    with tempfile.TemporaryDirectory(prefix="loratui-bench-data-") as tmp_str:
        tmp = Path(tmp_str)
        source = tmp / "alpaca.jsonl"
        from transformers import AutoTokenizer

        gen_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        (rows, lens), gen_s = timed(write_rows, source, args.rows, gen_tokenizer)
        overrides = [
            f"model.base={model_dir}",
            f"data.source={source}",
            f"runs_dir={tmp / 'runs'}",
            "data.val_ratio=0.01",
            "data.test_ratio=0.01",
        ]

        with env("LORATUI_HOME", str(tmp / "home")):
            from loratui.pipeline.config import load_config
            from loratui.pipeline.data.manifest import DataReport
            from loratui.pipeline.data.read import BuildFindings, read_examples, split_examples
            from loratui.pipeline.data.tokens import encode_examples
            from loratui.pipeline.events import null_sink
            from loratui.pipeline.models import load_tokenizer_and_template

            # 1. The full step, cold cache, `--repeat` times (the cache is emptied before each run);
            #    this shared VM varies by 10-20 % from run to run, so the median is the headline.
            cold_runs = []
            for k in range(args.repeat):
                shutil.rmtree(tmp / "home" / "datasets", ignore_errors=True)
                seconds, result, _ = step_run(overrides, "bench-cold" if k == 0 else f"bench-cold-{k}")
                cold_runs.append(seconds)
            step_s = statistics.median(cold_runs)
            report = DataReport.load(tmp / "runs" / "bench-cold" / "data").model_dump(mode="json", exclude_unset=True)

            # 2. The same inputs again: the cache hit.
            hit_s, result2, _ = step_run(overrides, "bench-hit")
            hit = result2.summary

            # 3. Stages, on the same data, timed here.
            cfg = load_config(None, overrides + ["name=bench-stages"])
            out = BuildFindings()
            examples, read_s = timed(read_examples, cfg, [source], out, "train")
            splits, split_s = timed(split_examples, cfg, {"train": examples, "validation": [], "test": []}, out)
            (tokenizer, template, _), load_s = timed(load_tokenizer_and_template, cfg, null_sink("data"))
            train = splits["train"]
            enc, encode_s = timed(
                encode_examples, train, tokenizer, template, cfg, null_sink("data"), lambda: False, "train"
            )
            np_s, np_error = None, None
            if args.num_proc:
                try:
                    _, np_s = timed(
                        encode_examples,
                        train,
                        tokenizer,
                        template,
                        cfg,
                        null_sink("data"),
                        lambda: False,
                        "train",
                        num_proc=args.num_proc,
                    )
                except Exception as e:  # reported in the table, not hidden
                    np_error = f"{type(e).__name__}: {e}".splitlines()[0][:160]

            # 4. Naive baseline on the first rows, and encode on the very same rows.
            first = examples[:BASELINE_ROWS]
            naive, naive_s = timed(naive_encode, first, tokenizer)
            same, same_s = timed(
                encode_examples, first, tokenizer, template, cfg, null_sink("data"), lambda: False, "baseline"
            )
            same_ids = sum(1 for (ids, _), got in zip(naive, same["input_ids"]) if ids == list(got))
            # The naive mask also trains the newline after the end-of-turn token; encode stops at it.
            same_trained = 0
            for (_, labels), got in zip(naive, same["labels"]):
                mine, theirs = [x for x in got if x != -100], [x for x in labels if x != -100]
                same_trained += theirs[: len(mine)] == mine and len(theirs) - len(mine) <= 1

            prof_text = None
            if args.profile:
                import cProfile
                import io
                import pstats

                sample = train[: args.profile]
                prof = cProfile.Profile()
                prof.enable()
                encode_examples(sample, tokenizer, template, cfg, null_sink("data"), lambda: False, "train")
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(15)
                prof_text = buf.getvalue()

    n = args.rows
    step_rate = rate(n, step_s)
    enc_rate = rate(len(train), encode_s)
    naive_rate = rate(len(first), naive_s)
    same_rate = rate(len(first), same_s)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)

    failed: list[str] = []
    table = [
        (f"full data step, cold cache (median of {len(cold_runs)})", f"{n:,}", step_s, step_rate),
        ("  read + validate (read_examples)", f"{n:,}", read_s, rate(n, read_s)),
        ("  split + dedupe (split_examples)", f"{n:,}", split_s, rate(n, split_s)),
        ("  encode: template+tokenize+mask (train)", f"{len(train):,}", encode_s, enc_rate),
    ]
    if np_s is not None:
        table.append((f"  encode, num_proc={args.num_proc} (train)", f"{len(train):,}", np_s, rate(len(train), np_s)))
    elif np_error:
        failed.append(f"encode with num_proc={args.num_proc} FAILED: {np_error}")
    table += [
        (f"naive apply_chat_template x2 (first {len(first):,})", f"{len(first):,}", naive_s, naive_rate),
        (f"encode on the same first {len(first):,}", f"{len(first):,}", same_s, same_rate),
        ("full data step, cache hit", f"{n:,}", hit_s, rate(n, hit_s)),
    ]
    w = max(len(r[0]) for r in table)
    print("\nloratui data step benchmark")
    print("=" * (w + 40))
    print(f"{'measurement':<{w}}  {'rows':>9}  {'seconds':>9}  {'rows/s':>10}")
    print("-" * (w + 40))
    for label, rws, secs, r in table:
        print(f"{label:<{w}}  {rws:>9}  {secs:>9.2f}  {r:>10,.0f}")
    for line in failed:
        print(line)
    print("-" * (w + 40))
    print(f"speedup encode vs naive baseline (rows/s ratio):       {enc_rate / naive_rate:.1f}x")
    print(f"speedup encode vs naive baseline (same {len(first):,} rows):     {same_rate / naive_rate:.1f}x")
    print(
        f"cache-hit run: {hit_s:.2f} s (step's own summary: cache_hit={hit.get('cache_hit')}, "
        f"{hit.get('seconds')} s); cold runs: "
        + ", ".join(f"{x:.2f} s ({rate(args.rows, x):,.0f} rows/s)" for x in cold_runs)
    )
    print(
        f"other: generate {n:,} rows {gen_s:.2f} s (untimed); import transformers+datasets {import_s:.2f} s "
        f"(before the step); load tokenizer+template {load_s:.2f} s (inside the step)"
    )
    print(
        f"sanity: naive vs encode on the first {len(first):,}: identical input_ids {same_ids:,}, "
        f"same trained tokens {same_trained:,} "
        "(up to the newline after end-of-turn, which only the naive mask trains)"
    )
    print(
        f"data: content tokens per row (instruction+input+output): min {min(lens)}, "
        f"median {statistics.median(lens):.0f}, p95 {sorted(lens)[int(0.95 * (len(lens) - 1))]}, max {max(lens)}; "
        f"rows with input {sum(1 for r in rows if r['input']):,}"
    )
    t = report["tokens"]
    print(
        f"step report: splits {report['splits']}, dropped {report['rows']['dropped']}, "
        f"truncated {report['rows']['truncated']}, max_length {report['max_length']}, "
        f"train tokens median {t['train']['median']:.0f} max {t['train']['max']}, "
        f"tokens/epoch {t['per_epoch']:,} ({t['trained_per_epoch']:,} trained)"
    )
    met = step_rate >= TARGET_ROWS_PER_S
    record(
        args.json,
        "data_prep",
        f"data step rows/s, {n:,} alpaca rows, cold cache",
        f"{step_rate:,.0f} rows/s",
        f"naive per-row apply_chat_template {naive_rate:,.0f} rows/s",
        step_rate / naive_rate,
        f">= {TARGET_ROWS_PER_S:,.0f} rows/s",
        met,
    )
    print(
        f"\ntarget: full step >= {TARGET_ROWS_PER_S:,.0f} rows/s on {TARGET_CORES} cores; measured "
        f"{step_rate:,.0f} rows/s on {cores} usable cores -> {'MET' if met else 'NOT MET'}"
        + ("" if cores == TARGET_CORES else f" (note: this machine has {cores} cores, not {TARGET_CORES})")
    )
    print("\nmachine:")
    for k, v in machine():
        print(f"  {k}: {v}")
    print(f"  load average (1 min) at the start: {load_before:.2f}")
    print(f"command: {command}")
    if prof_text:
        print(
            f"\ncProfile of encode_examples on {min(args.profile, len(train)):,} train rows "
            "(top 15 by cumulative time):"
        )
        print(prof_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
