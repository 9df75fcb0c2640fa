"""The bundled datasets (loratui/data/quickstart, quickstart-more) are current, well-formed and leak-free."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "loratui" / "data"
SPLITS = ("train", "validation", "test")
FIELDS = ["question", "answer", "fact", "topic"]
DOMAIN = "brambleholt.org"
# (min, max) rows per split: 4 train, 1 validation and 1 or more test rows per fact.
EXPECTED = {
    "quickstart": {"train": (88, 112), "validation": (22, 28), "test": (22, 40)},
    "quickstart-more": {"train": (56, 72), "validation": (14, 18), "test": (14, 32)},
}
URL_RE = re.compile(r"https?://[^\s]+?(?=[.,;:!?)]?(?:\s|$))")
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load(name: str, split: str) -> list[dict]:
    raw = (DATA / name / f"{split}.jsonl").read_bytes()
    text = raw.decode("utf-8")  # strict: invalid UTF-8 fails here
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{name}/{split}: one trailing newline"
    rows = []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        assert line.strip(), f"{name}/{split}:{n}: blank line"
        rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, list[dict]]]:
    return {name: {split: load(name, split) for split in SPLITS} for name in EXPECTED}


def all_rows(data):
    for name, splits in data.items():
        for split, rows in splits.items():
            for row in rows:
                yield name, split, row


def test_generator_check_passes():
    proc = subprocess.run(
        [sys.executable, "scripts/make_datasets.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"stale bundled datasets: {proc.stdout}{proc.stderr}"


def test_readme_describes_both_datasets():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for needle in ("quickstart", "quickstart-more", "scripts/make_datasets.py", "Apache-2.0"):
        assert needle in readme


def test_rows_have_four_nonempty_string_fields_and_fact_in_answer(data):
    for name, split, row in all_rows(data):
        assert list(row) == FIELDS, f"{name}/{split}: keys {list(row)}"
        for key in FIELDS:
            assert isinstance(row[key], str) and row[key].strip(), f"{name}/{split}: empty {key}: {row}"
        assert row["fact"] in row["answer"], f"{name}/{split}: fact not in answer: {row}"
        assert row["fact"].lower() not in row["question"].lower(), f"{name}/{split}: question gives it away: {row}"


def test_no_validation_or_test_question_in_train(data):
    for name, splits in data.items():
        train = {normalize(r["question"]) for r in splits["train"]}
        for split in ("validation", "test"):
            leaked = [r["question"] for r in splits[split] if normalize(r["question"]) in train]
            assert not leaked, f"{name}/{split} questions also in train: {leaked}"
        held_out = [normalize(r["question"]) for s in ("validation", "test") for r in splits[s]]
        assert len(held_out) == len(set(held_out)), f"{name}: duplicate held-out question"


def test_every_test_fact_is_trained_at_least_three_times(data):
    for name, splits in data.items():
        train_facts = [r["fact"] for r in splits["train"]]
        for split in ("validation", "test"):
            for row in splits[split]:
                assert train_facts.count(row["fact"]) >= 3, f"{name}/{split}: {row['fact']!r} rarely trained"


def test_every_fact_has_varied_phrasings(data):
    for name, splits in data.items():
        facts = {r["fact"] for r in splits["train"]}
        assert facts == {r["fact"] for r in splits["test"]} == {r["fact"] for r in splits["validation"]}
        for fact in facts:
            rows = [r for s in SPLITS for r in splits[s] if r["fact"] == fact]
            assert len({normalize(r["question"]) for r in rows}) >= 6, f"{name}: {fact!r} needs 6 questions"
            assert len({r["answer"] for r in rows}) >= 3, f"{name}: {fact!r} needs 3 answer phrasings"
            assert len({r["topic"] for r in rows}) == 1, f"{name}: {fact!r} has several topics"


def test_counts_per_split(data):
    for name, expected in EXPECTED.items():
        for split, (lo, hi) in expected.items():
            n = len(data[name][split])
            assert lo <= n <= hi, f"{name}/{split}: {n} rows, expected {lo}..{hi}"


def test_datasets_share_no_fact_or_question(data):
    def facts(name):
        return {r["fact"] for s in SPLITS for r in data[name][s]}

    def questions(name):
        return {normalize(r["question"]) for s in SPLITS for r in data[name][s]}

    assert not facts("quickstart") & facts("quickstart-more")
    assert not questions("quickstart") & questions("quickstart-more")


def test_urls_and_emails_are_ascii_on_one_domain(data):
    urls, emails = set(), set()
    for _name, _split, row in all_rows(data):
        for text in (row["answer"], row["fact"]):
            urls.update(URL_RE.findall(text))
            emails.update(EMAIL_RE.findall(text))
    assert len(urls) >= 4 + 3 and len(emails) >= 4 + 1, (urls, emails)
    for url in urls:
        assert url.isascii() and url.startswith(f"https://{DOMAIN}/"), url
    for email in emails:
        assert email.isascii() and email.endswith(f"@{DOMAIN}"), email
    url_facts = {r["fact"] for _, _, r in all_rows(data) if r["fact"].startswith("https://")}
    assert url_facts <= urls, "a URL fact is not found whole in its answers (trailing punctuation?)"


def test_answers_round_trip_through_smollm2_tokenizer(data):
    from tests.tiny_models import _smollm2_tokenizer

    tok = _smollm2_tokenizer()
    texts = {t for _, _, r in all_rows(data) for t in (r["answer"], r["question"], r["fact"])}
    bad = [t for t in sorted(texts) if tok.decode(tok.encode(t, add_special_tokens=False)) != t]
    assert not bad, f"not preserved by the SmolLM2 tokenizer: {bad}"
