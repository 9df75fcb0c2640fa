"""Where the work runs: CUDA, then Apple MPS, then the CPU, each with the reason and its rules.

One decision table for the steps that run a PyTorch model: training (``train.device``), evaluation,
and serving's PyTorch backend and scorer follow the same choice; the merge runs on the CPU (an addition
per weight, bound by the files; ``merge/merging.py`` says why). The table is pure: ``choose``,
``precision`` and ``training_rules`` take a :class:`Probe` record, so tests replace the hardware; only
``probe()`` asks torch (imported inside it, never at module import).

Per device:

============  ======================  ==========================  ===============================
device        precision ``auto``      QLoRA / 8-bit optimizers    loading
============  ======================  ==========================  ===============================
cuda          bf16, else fp16         yes / yes                   dtype by precision, device_map
mps           bf16 on macOS 14+,      refused / refused           dtype by precision, device_map
              else fp32                                           ``{"": "mps"}``
cpu           fp32                    yes (slow) / yes (paged:    fp32
                                      runs unpaged)
============  ======================  ==========================  ===============================

Pinned host memory only feeds a CUDA GPU; ``use_cpu`` only for the CPU.
``PYTORCH_ENABLE_MPS_FALLBACK=1`` (unless the environment sets it) lets the operators MPS lacks run on
the CPU; torch reads it once, when it is imported, so this module sets it on macOS when it is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from loratui.pipeline.errors import LoratuiError

Device = Literal["cpu", "cuda", "mps"]
MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


@dataclass(frozen=True)
class Probe:
    """What this machine's torch can run on (filled by :func:`probe`; built by hand in tests)."""

    cuda: bool = False
    cuda_name: str = ""
    cuda_bf16: bool = False
    cuda_free_gib: float | None = None
    cuda_total_gib: float | None = None
    mps: bool = False  # torch.backends.mps.is_available(): an Apple GPU, macOS 12.3+, an MPS build
    mps_built: bool = False  # torch.backends.mps.is_built(): this torch was built with MPS
    mps_bf16: bool = False  # bf16 on MPS: macOS 14+ (emulated through fp32 on M1/M2)
    cpu_bf16: bool = False  # AVX512-BF16 or AMX


class Decision(NamedTuple):
    value: str
    reason: str


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated (16x slower than fp32 measured on an
    AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def probe() -> Probe:
    """This machine's devices, from torch."""
    _set_mps_fallback()  # a no-op unless this is macOS and torch is not imported yet
    import torch

    cuda = torch.cuda.is_available()
    name, bf16, free, total = "", False, None, None
    if cuda:
        name = torch.cuda.get_device_name()
        bf16 = torch.cuda.is_bf16_supported()
        try:
            free_b, total_b = torch.cuda.mem_get_info()
            free, total = float(free_b / 2**30), float(total_b / 2**30)
        except RuntimeError:  # a GPU busy in exclusive mode, or a broken driver: no figure, still CUDA
            pass
    mps_built = bool(torch.backends.mps.is_built())
    mps = bool(torch.backends.mps.is_available())
    mps_bf16 = mps and bool(torch.backends.mps.is_macos_or_newer(14, 0))  # what transformers checks too
    return Probe(cuda, name, bf16, free, total, mps, mps_built, mps_bf16, cpu_has_native_bf16())


def _missing(want: str, hw: Probe) -> LoratuiError:
    if want == "cuda":
        return LoratuiError(
            "train.device is cuda but no CUDA GPU is visible to PyTorch"
            + ("; this machine has an Apple GPU (mps)" if hw.mps else ""),
            hint="Set train.device=auto (CUDA, then MPS, then CPU) or cpu, or run the CUDA image with --gpus all.",
        )
    if not hw.mps_built:
        return LoratuiError(
            "train.device is mps but this PyTorch was built without MPS (Apple GPU) support",
            hint="MPS needs macOS on Apple silicon with the arm64 PyTorch wheel; elsewhere set train.device=auto or cpu.",
        )
    return LoratuiError(
        "train.device is mps but MPS is not available (it needs an Apple silicon GPU and macOS 12.3 or newer)",
        hint="Set train.device=auto or cpu.",
    )


def choose(want: str, hw: Probe) -> Decision:
    """The device for ``train.device`` = ``want`` (auto, cpu, cuda, mps) on ``hw``, and why."""
    if want == "cpu":
        return Decision("cpu", "train.device")
    if want in ("cuda", "mps"):
        if not (hw.cuda if want == "cuda" else hw.mps):
            raise _missing(want, hw)
        return Decision(want, "train.device")
    if hw.cuda:
        return Decision("cuda", f"auto: CUDA GPU found ({hw.cuda_name or 'unnamed'})")
    if hw.mps:
        return Decision("mps", "auto: no CUDA; Apple MPS available")
    if hw.mps_built:
        return Decision("cpu", "auto: no CUDA, and MPS is built into torch but not available here")
    return Decision("cpu", "auto: no CUDA or MPS")


def pick(want: str = "auto") -> str:
    """The device evaluate and serve use: the same table as training, on this machine."""
    return choose(want, probe()).value


def precision(want: str, device: str, hw: Probe) -> Decision:
    """``train.precision`` = ``want`` on ``device``, and why."""
    if want != "auto":
        if device == "mps" and want == "bf16" and not hw.mps_bf16:
            raise LoratuiError(
                "train.precision is bf16 but MPS runs bf16 only from macOS 14 on",
                hint="Set train.precision=auto (fp32 here), or update macOS.",
            )
        return Decision(want, "train.precision")
    if device == "cuda":
        return Decision("bf16", "GPU supports bf16") if hw.cuda_bf16 else Decision("fp16", "GPU lacks bf16")
    if device == "mps":
        # The Trainer's fp16 needs a grad scaler, which accelerate builds on MPS only with torch 2.8+;
        # bf16 autocast needs none. transformers treats MPS bf16 as available from macOS 14.
        if hw.mps_bf16:
            return Decision(
                "bf16", "MPS on macOS 14+: bf16 needs no grad scaler (emulated on M1/M2: half the memory, not faster)"
            )
        return Decision("fp32", "MPS before macOS 14 has no bf16, and fp16 training needs a grad scaler")
    # On CPU, auto is fp32 even with native bf16: on an AVX512-BF16 EPYC the quickstart trained 17% faster
    # in bf16 (397 against 340 tokens/s) but answered 22 of 29 held-out questions against fp32's 24, and
    # evaluating in bf16 cost one more. fp32 also gives the same run on AVX2 and AVX-512 machines.
    # train.precision=bf16 still trains in bf16 where the CPU has it.
    if hw.cpu_bf16:
        return Decision("fp32", "CPU: fp32 (bf16 is native here, but cost quality; set train.precision=bf16 for speed)")
    return Decision("fp32", "CPU has no native bf16 (emulated bf16 is many times slower)")


def deepspeed_installed() -> bool:
    """Whether the ``deepspeed`` package is there (found, not imported: importing it builds or loads CUDA ops)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def training_rules(device: str, method: str, optimizer: str, nproc: int = 1, distributed: str = "ddp") -> list[str]:
    """Refuse what ``device`` cannot train (LoratuiError with the nearest alternative); the warnings to log.

    ``nproc``: the processes of the run in all (nodes x processes per node); ``distributed`` matters when
    there are several (``train.distributed``)."""
    eight_bit = "8bit" in optimizer
    if device == "mps":
        if method == "qlora":
            raise LoratuiError(
                "lora.method is qlora, but bitsandbytes' 4-bit base does not train on Apple MPS",
                hint="Use lora.method=lora (the base in bf16 on MPS is half its fp32 size), a smaller base "
                "model, or a CUDA GPU for qlora.",
            )
        if eight_bit:
            raise LoratuiError(
                f"train.optimizer is {optimizer}, but bitsandbytes has no 8-bit optimizer kernel for Apple MPS",
                hint="Set train.optimizer=adamw_torch.",
            )
        if nproc > 1:
            raise LoratuiError(
                f"{nproc} training processes (train.nproc x train.nodes), but multi-process training on Apple "
                "MPS is not supported (one GPU)",
                hint="Set train.nproc=1 and train.nodes=1, or train.device=cpu for CPU processes.",
            )
    if nproc > 1 and distributed == "deepspeed":
        _deepspeed_rules(device)
    warnings = []
    if device == "cpu" and method == "qlora":
        warnings.append(
            "qlora on CPU: bitsandbytes' CPU 4-bit kernels are slower than an fp32 base here; "
            "use method lora on CPUs with the memory for it"
        )
    if device == "cpu" and eight_bit and optimizer.startswith("paged"):
        warnings.append(f"{optimizer} on CPU: bitsandbytes runs it unpaged (as adamw_8bit)")
    return warnings


def _deepspeed_rules(device: str) -> None:
    """DeepSpeed ZeRO trains on CUDA GPUs (Linux) with the deepspeed package; refuse it anywhere else."""
    if device != "cuda":
        raise LoratuiError(
            f"train.distributed is deepspeed, but DeepSpeed trains on CUDA GPUs only (this run's device is {device})",
            hint="Use train.distributed=ddp (or fsdp) here: both run on CPUs (gloo) and GPUs. DeepSpeed ZeRO "
            "needs Linux with NVIDIA GPUs (CUDA) and `pip install deepspeed`.",
        )
    if not deepspeed_installed():
        raise LoratuiError(
            "train.distributed is deepspeed, but the deepspeed package is not installed",
            hint="pip install deepspeed (it builds its CUDA operators against the installed torch), or use "
            "train.distributed=fsdp for sharded training without it.",
        )


def inference_precision(device: str, hw: Probe) -> str:
    """The precision serving loads a model in: bf16 on CUDA, bf16 on MPS from macOS 14, else fp32."""
    return "bf16" if device == "cuda" or (device == "mps" and hw.mps_bf16) else "fp32"


_fallback: dict[str, bool] = {}  # "late": set after torch was imported; "logged": the line went out


def _set_mps_fallback() -> None:
    """``PYTORCH_ENABLE_MPS_FALLBACK=1`` unless the environment sets it, on macOS (where MPS exists)."""
    if sys.platform != "darwin" or "late" in _fallback:
        return
    _fallback["late"] = MPS_FALLBACK not in os.environ and "torch" in sys.modules
    os.environ.setdefault(MPS_FALLBACK, "1")


def enable_mps_fallback(log: Callable[[str], Any]) -> None:
    """For a run on MPS: make sure the fallback is set, and say so once per process."""
    _fallback.setdefault("late", MPS_FALLBACK not in os.environ and "torch" in sys.modules)
    os.environ.setdefault(MPS_FALLBACK, "1")
    if _fallback.get("logged"):
        return
    _fallback["logged"] = True
    value = os.environ[MPS_FALLBACK]
    if value == "0":
        log(f"{MPS_FALLBACK}=0 in the environment: an operator MPS lacks stops the run instead of using the CPU")
    elif _fallback["late"]:
        log(
            f"{MPS_FALLBACK}=1 was set after torch was loaded, so only child processes use it; "
            "export it before starting loratui to let operators MPS lacks run on the CPU"
        )
    else:
        log(f"{MPS_FALLBACK}={value}: operators MPS lacks run on the CPU (slower, logged by torch once each)")


_set_mps_fallback()  # at import: torch reads the variable once, when it is itself imported
