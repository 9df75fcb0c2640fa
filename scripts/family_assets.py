"""Extract the real chat templates and vocab-only GGUFs of the llama-cpp-python sdist, once.

The family tests render data through the chat templates models really ship (Qwen3, Llama 3.x,
Phi-3.5, GPT-OSS, DeepSeek-R1 distills ...). llama.cpp keeps copies of about ninety of them, and
vocabulary-only GGUFs, under ``vendor/llama.cpp/models/`` of the llama-cpp-python sdist, the package
this project already pins and builds from source. Reading them from there keeps third-party template
texts out of this repository and needs no model hub.

    python scripts/family_assets.py      # prints the folder; a no-op when it is already there

Into ``${LORATUI_ASSETS:-~/.cache/loratui/family-assets}/llama-cpp-python-<version>/`` (the version of
requirements.lock): ``templates/*.jinja`` and ``vocab/ggml-vocab-*.gguf``, nothing else. The folder
appears whole or not at all (written beside it, then renamed), so a test never sees half of it.
Standard library and pip only; PyPI must be reachable the first time (about 76 MB, 40 s).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"
# what is taken from the sdist: (pattern inside vendor/llama.cpp/models/, folder it goes to)
WANTED = (("templates/*.jinja", "templates"), ("ggml-vocab-*.gguf", "vocab"))
MODELS = "/vendor/llama.cpp/models/"


def locked_version(lock: Path = REPO / "requirements.lock") -> str:
    """The llama-cpp-python version the project pins, so the assets match the library it builds."""
    found = re.search(rf"^{re.escape(PACKAGE)}==(\S+)\s*$", lock.read_text(encoding="utf-8"), re.M)
    if not found:
        raise SystemExit(f"{lock}: no {PACKAGE}==<version> line")
    return found.group(1)


def assets_root() -> Path:
    return Path(os.environ.get("LORATUI_ASSETS") or Path.home() / ".cache" / "loratui" / "family-assets")


def _download_sdist(version: str, into: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{PACKAGE}=={version}",
            "-d",
            str(into),
        ],
        check=True,
    )
    sdists = sorted(into.glob("*.tar.gz"))
    if len(sdists) != 1:
        raise SystemExit(f"pip download left {len(sdists)} sdists in {into}, expected one")
    return sdists[0]


def _extract(sdist: Path, staging: Path) -> dict[str, int]:
    """Copy the wanted members (plain files only, by their base name) into ``staging``; counts per folder."""
    counts = {folder: 0 for _, folder in WANTED}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            _, sep, inside = member.name.partition(MODELS)
            if not sep or not member.isfile():
                continue
            folder = next((f for pattern, f in WANTED if fnmatch.fnmatchcase(inside, pattern)), None)
            if folder is None:
                continue
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has contents
            target = staging / folder / Path(inside).name
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            counts[folder] += 1
    missing = [folder for folder, n in counts.items() if not n]
    if missing:
        raise SystemExit(f"{sdist.name}: found nothing for {', '.join(missing)} under {MODELS.strip('/')}")
    return counts


def ensure_assets(version: str, root: Path) -> Path:
    """The assets folder for ``version`` under ``root``, downloading and extracting it when absent."""
    target = root / f"{PACKAGE}-{version}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        staging = work / "assets"
        counts = _extract(_download_sdist(version, work / "download"), staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: its folder is complete too
            if not target.is_dir():
                raise
        print(f"extracted {counts['templates']} templates and {counts['vocab']} vocab GGUFs", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main() -> int:
    print(ensure_assets(locked_version(), assets_root()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
