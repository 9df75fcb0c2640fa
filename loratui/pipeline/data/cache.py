"""The content-addressed cache of built datasets: ``$LORATUI_HOME/datasets/<key>``.

The key covers everything the build reads: the data settings, the files' contents, the tokenizer
files, the chat template (and its render rules) and the task. A run's data folder is a copy of one
entry, hard-linked where the file system allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.augment import cache_settings
from loratui.pipeline.data.read import SPLITS
from loratui.pipeline.models import Task, loratui_home
from loratui.pipeline.runs import atomic_dir

# Bump when the processed output changes for the same inputs, so caches are rebuilt.
DATA_VERSION = 2  # 2: preference formats (pairs with rejected_* columns, unpaired preference_label)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (
            f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template"))
            or f.suffix == ".model"
        ):
            h.update(f.name.encode())
            h.update(_sha256_file(f).encode())
    return h.hexdigest()


def cache_key(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    model_dir: Path,
    template_source: str,
    task: Task = "causal",
    render_rules: str = "",
) -> str:
    """Key over the inputs of the build. The task enters only for seq2seq, and ``render_rules``
    (:attr:`ChatTemplate.render_rules`: the render date, reasoning handling) only when there are any,
    so the keys of other inputs stay as they were."""
    h = hashlib.sha256()
    settings = cfg.data.model_dump(mode="json", exclude={"preview_examples", "augment"})
    augment = cache_settings(cfg.data.augment, cfg.model.base)
    if augment is not None:  # only when on, so the keys of runs without it stay as they were
        settings["augment"] = augment
    h.update(json.dumps({"version": DATA_VERSION, "settings": settings}, sort_keys=True).encode())
    for split in SPLITS:
        for path in files[split]:
            h.update(f"{split}:{path}:{_sha256_file(path)}".encode())
    h.update(_tokenizer_fingerprint(model_dir).encode())
    h.update(template_source.encode())
    if task != "causal":
        h.update(f"task:{task}".encode())
    if render_rules:
        h.update(f"render:{render_rules}".encode())
    return h.hexdigest()[:20]


def datasets_cache() -> Path:
    """The folder of the cached datasets, one folder per cache key."""
    return loratui_home() / "datasets"


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def install(cached: Path, target: Path) -> None:
    """Replace ``target`` with a copy of the cache entry ``cached`` (hard links where possible)."""
    with atomic_dir(target) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
