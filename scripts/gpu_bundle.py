"""Prepare, on this machine, what a lent GPU machine needs for ``scripts/gpu-check.sh``: it has no network and
takes at most 64 MiB per call (the repository's tracked files included), so everything travels as files.

Writes the ignored folder ``.gpu/``:

* ``wheels/``: loratui's own wheel and the packages ``scripts/gpu-wheels.txt`` names, at the versions of
  ``requirements.lock``, for CPython 3.12 on manylinux x86_64 (``pip download --only-binary``; a package PyPI
  has only as a source release, and pure Python, is built into a wheel here);
* ``bnb/``: bitsandbytes (QLoRA) unpacked with only its CPU library and the CUDA 13.0 one torch cu130 loads: its
  wheel carries one library per CUDA release, 41 MiB in all, 3.6 MiB trimmed;
* ``model/part-NN``: the embedded SmolLM2-135M-Instruct GGUF (94 MiB) cut into parts so that each call fits;
* ``plan.json``: the calls, each with its ``carry`` list and command, and their sizes.

Then it checks that the wheels install into a Python 3.12 target (``pip install --target --python-version 3.12
--only-binary``), and that every call is within the limit.

    .venv/bin/python scripts/gpu_bundle.py [--limit-mib 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".gpu"
MIB = 1 << 20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]  # fmt: skip
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:"]
BNB_KEEP = ("libbitsandbytes_cpu", "libbitsandbytes_cuda130")  # torch 2.11 on the GPU image is built for CUDA 13.0


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            out[name.lower().replace("_", "-")] = version
    return out


def wanted() -> list[str]:
    lines = (REPO / "scripts" / "gpu-wheels.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pip(*args: str, quiet: bool = False) -> None:
    """pip in this environment; ``quiet``: its errors too (an attempt that may fail)."""
    subprocess.run(
        [sys.executable, "-m", "pip", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
    )


def download(wheels: Path) -> None:
    versions = pins()
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name in wanted():
        spec = f"{name}=={versions[name.lower()]}"
        try:
            pip("download", "--quiet", "--no-deps", "-d", str(wheels), *TARGET, *platform_args, spec, quiet=True)
        except subprocess.CalledProcessError:  # a source release only: build it here if it is pure Python
            pip("wheel", "--quiet", "--no-deps", "-w", str(wheels), spec)
            built = next(wheels.glob(f"{name.replace('-', '_')}-*.whl"))
            if not built.name.endswith("-py3-none-any.whl"):
                raise SystemExit(
                    f"{spec}: no wheel for Python 3.12 on PyPI and not pure Python ({built.name})"
                ) from None
    pip("wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO))  # loratui itself


def trimmed_bitsandbytes(into: Path) -> None:
    version = pins()["bitsandbytes"]
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--quiet", "--no-deps", "-d", tmp, *TARGET, "--platform", "manylinux_2_24_x86_64",
            f"bitsandbytes=={version}")  # fmt: skip
        wheel = next(Path(tmp).glob("bitsandbytes-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                name = Path(member).name
                if name.startswith("libbitsandbytes_") and not name.startswith(BNB_KEEP):
                    continue
                zf.extract(member, into)


def split_model(parts_dir: Path, first: int, rest: int) -> list[Path]:
    """The embedded GGUF in parts: the first of ``first`` bytes (it shares its call with the wheels), then
    ``rest`` bytes each."""
    from loratui.pipeline import models

    gguf = models.builtin_gguf(models.DEFAULT_MODEL)
    (parts_dir / "name").write_text(gguf.name)
    parts, offset, size = [], 0, gguf.stat().st_size
    with gguf.open("rb") as src:
        while offset < size:
            n = first if not parts else rest
            part = parts_dir / f"part-{len(parts):02d}"
            part.write_bytes(src.read(n))
            parts.append(part)
            offset += n
    return parts


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def check_install(wheels: Path) -> None:
    with tempfile.TemporaryDirectory() as target:
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        pip("install", "--quiet", "--no-index", "--no-deps", "--target", target, *TARGET, *platform_args,
            *map(str, sorted(wheels.glob("*.whl"))))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-mib", type=float, default=64.0)
    args = ap.parse_args()
    limit = int(args.limit_mib * MIB)
    shutil.rmtree(OUT, ignore_errors=True)
    wheels, bnb, model = OUT / "wheels", OUT / "bnb", OUT / "model"
    for d in (wheels, bnb, model):
        d.mkdir(parents=True)
    download(wheels)
    trimmed_bitsandbytes(bnb)
    check_install(wheels)
    repo = tracked()
    margin = MIB  # untracked, unignored files travel too: room for them
    first_room = limit - repo - margin - size(wheels) - size(bnb) - 4096  # and the name file
    if first_room < 4 * MIB:
        raise SystemExit(
            f"the wheels alone ({size(wheels) / MIB:.1f} MiB) leave no room in a {args.limit_mib} MiB call"
        )
    parts = split_model(model, first_room, limit - repo - margin)
    calls = [{"carry": [".gpu/wheels", ".gpu/bnb", ".gpu/model/name", f".gpu/model/{parts[0].name}"]}]
    calls += [{"carry": [f".gpu/model/{p.name}"]} for p in parts[1:]]
    for call in calls:
        call["bytes"] = repo + margin + sum(size(REPO / c) for c in call["carry"])
        call["command"] = "true  # carries files only; they stay on the warm machine for the next call"
        if call["bytes"] > limit:
            raise SystemExit(f"a call would carry {call['bytes'] / MIB:.1f} MiB: over {args.limit_mib} MiB")
    calls[-1]["command"] = "bash scripts/gpu-check.sh"
    plan = {"limit_mib": args.limit_mib, "repo_mib": round(repo / MIB, 1), "calls": calls,
            "wheels": sorted(p.name for p in wheels.glob("*.whl"))}  # fmt: skip
    (OUT / "plan.json").write_text(json.dumps(plan, indent=2))
    for i, call in enumerate(calls, 1):
        print(f"call {i}: {call['bytes'] / MIB:.1f} MiB, carry {call['carry']}, then: {call['command']}")
    print(f"{len(plan['wheels'])} wheels ({size(wheels) / MIB:.1f} MiB) install into a Python 3.12 target; "
          f"bitsandbytes trimmed to {size(bnb) / MIB:.1f} MiB; the model in {len(parts)} parts")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
