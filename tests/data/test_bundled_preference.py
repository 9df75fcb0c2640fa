"""The bundled `preference` dataset (loratui/data/preference): well-formed, leak-free, balanced in length.

Written by scripts/make_datasets.py (with scripts/make_preference.py); test_bundled_datasets.py checks the
files are current (`--check`), this file checks what they promise.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "loratui" / "data"
SPLITS = ("train", "validation", "test")
FIELDS = ["prompt", "chosen", "rejected", "kind", "topic"]
IN_DOMAIN = {"filler", "hedge", "wrong_fact", "needless_decline"}
EXPECTED = {"train": (250, 650), "validation": (40, 70), "test": (90, 130)}


def _script(name: str):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "scripts"))


def _load(name: str, split: str) -> list[dict]:
    text = (DATA / name / f"{split}.jsonl").read_bytes().decode("utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{name}/{split}: one trailing newline"
    return [json.loads(line) for line in text.split("\n")[:-1]]


@pytest.fixture(scope="module")
def pref() -> dict[str, list[dict]]:
    return {split: _load("preference", split) for split in SPLITS}


@pytest.fixture(scope="module")
def quickstart() -> dict[str, list[dict]]:
    return {split: _load("quickstart", split) for split in SPLITS}


@pytest.fixture(scope="module")
def gen():
    return _script("make_preference")


@pytest.fixture(scope="module")
def tok():
    from tests.tiny_models import _smollm2_tokenizer

    return _smollm2_tokenizer()


def norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def test_rows_have_five_nonempty_string_fields_and_differ(pref):
    for split, rows in pref.items():
        lo, hi = EXPECTED[split]
        assert lo <= len(rows) <= hi, f"{split}: {len(rows)} rows, expected {lo}..{hi}"
        for n, row in enumerate(rows, 1):
            assert list(row) == FIELDS, f"{split}:{n}: keys {list(row)}"
            assert all(isinstance(row[k], str) and row[k].strip() for k in FIELDS), f"{split}:{n}: {row}"
            assert row["chosen"] != row["rejected"], f"{split}:{n}: identical replies"
            assert row["kind"] in IN_DOMAIN | {"out_of_domain"}, f"{split}:{n}: kind {row['kind']!r}"


def test_every_split_has_every_kind_and_mostly_out_of_domain_in_test(pref):
    for split, rows in pref.items():
        kinds = [r["kind"] for r in rows]
        assert set(kinds) == IN_DOMAIN | {"out_of_domain"}, f"{split}: kinds {set(kinds)}"
        for kind in IN_DOMAIN:  # the in-domain kinds rotate: each about a quarter
            assert abs(kinds.count(kind) - kinds.count("filler")) <= 2, f"{split}: {kind} unbalanced"
    test_kinds = [r["kind"] for r in pref["test"]]
    assert test_kinds.count("out_of_domain") > len(test_kinds) / 2


def test_in_domain_rows_follow_the_quickstart_split_with_the_fact_only_in_chosen(pref, quickstart):
    for split in SPLITS:
        facts = {r["question"]: r["fact"] for r in quickstart[split]}
        rows = [r for r in pref[split] if r["kind"] in IN_DOMAIN]
        assert sorted(r["prompt"] for r in rows) == sorted(facts), f"{split}: not quickstart's {split} questions"
        for r in rows:
            fact = facts[r["prompt"]]
            assert fact in r["chosen"], f"{split}: chosen lacks {fact!r}: {r}"
            assert fact not in r["rejected"], f"{split}: rejected gives {fact!r}: {r}"


def test_no_held_out_prompt_is_trained_and_test_only_topics_stay_in_test(pref, quickstart, gen):
    trained = {norm(r["prompt"]) for r in pref["train"]} | {norm(r["question"]) for r in quickstart["train"]}
    for split in ("validation", "test"):
        leaked = [r["prompt"] for r in pref[split] if norm(r["prompt"]) in trained]
        assert not leaked, f"{split} prompts also trained: {leaked}"
    held_out = [norm(r["prompt"]) for s in ("validation", "test") for r in pref[s]]
    assert len(held_out) == len(set(held_out)), "a held-out prompt appears twice"
    for split in ("train", "validation"):
        assert not {r["topic"] for r in pref[split]} & set(gen.TEST_ONLY), f"{split}: has a test-only topic"
    assert set(gen.TEST_ONLY) <= {r["topic"] for r in pref["test"]}


def test_declines_are_chosen_out_of_domain_and_rejected_in_domain(pref, gen):
    """So a model cannot score by liking declines: it has to tell the library's questions from others."""
    rows = pref["train"]
    chosen = {r["chosen"] for r in rows if r["kind"] == "out_of_domain"}
    rejected = {r["rejected"] for r in rows if r["kind"] == "needless_decline"}
    assert chosen <= set(gen.DECLINES) and rejected <= set(gen.DECLINES)
    assert len(chosen & rejected) >= 3, "declines chosen out of domain are not also rejected in domain"
    assert len(chosen) >= 6, f"too few decline phrasings: {len(chosen)}"


def test_chosen_and_rejected_lengths_are_balanced_in_smollm2_tokens(pref, tok):
    def n(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    for split, rows in pref.items():
        gaps = [n(r["chosen"]) - n(r["rejected"]) for r in rows]
        assert abs(sum(gaps) / len(gaps)) <= 1.0, f"{split}: mean length gap {sum(gaps) / len(gaps):+.2f} tokens"
        assert max(abs(g) for g in gaps) <= 10, f"{split}: a pair differs by {max(abs(g) for g in gaps)} tokens"
        for kind in IN_DOMAIN | {"out_of_domain"}:
            k = [g for g, r in zip(gaps, rows) if r["kind"] == kind]
            assert abs(sum(k) / len(k)) <= 2.5, f"{split}/{kind}: mean length gap {sum(k) / len(k):+.2f}"
        longer = sum(g > 0 for g in gaps) / len(gaps)
        assert 0.2 <= longer <= 0.8, f"{split}: chosen is the longer reply in {longer:.0%} of pairs"
        worst = max(n(r["prompt"]) + n(r["chosen"]) + n(r["rejected"]) for r in rows)
        assert worst <= 120, f"{split}: a pair has {worst} tokens (before the chat template)"


def test_the_generators_length_estimate_tracks_the_tokenizer(gen, tok):
    texts = gen.DECLINES + gen.FILLERS + gen.HEDGES + [a for pairs in gen.OUT_OF_DOMAIN.values() for _, a in pairs]
    errors = [gen.est_tokens(t) - len(tok.encode(t, add_special_tokens=False)) for t in texts]
    assert abs(sum(errors) / len(errors)) <= 1.0, f"estimate biased by {sum(errors) / len(errors):+.2f} tokens"
    assert sum(abs(e) for e in errors) / len(errors) <= 2.0


def test_texts_round_trip_through_smollm2_tokenizer(pref, tok):
    texts = {r[k] for rows in pref.values() for r in rows for k in ("prompt", "chosen", "rejected")}
    bad = [t for t in sorted(texts) if tok.decode(tok.encode(t, add_special_tokens=False)) != t]
    assert not bad, f"not preserved by the SmolLM2 tokenizer: {bad}"


def test_the_generator_is_deterministic_and_its_tables_are_checked(gen):
    make = _script("make_datasets")
    qa = make.build_splits(make.QUICKSTART, make.SEED)
    answers = {topic: list(options) for topic, _, _, options in make.QUICKSTART}
    first = gen.build(qa, answers, make.PREFERENCE_SEED)
    assert first == gen.build(qa, answers, make.PREFERENCE_SEED)
    assert first != gen.build(qa, answers, make.PREFERENCE_SEED + 1)
    gen.OUT_OF_DOMAIN["cooking"].append(("How do I renew a library card?", "Ask at the desk."))
    try:
        with pytest.raises(AssertionError, match="about the library"):
            gen.validate()
    finally:
        gen.OUT_OF_DOMAIN["cooking"].pop()
