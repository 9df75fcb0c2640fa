"""The device decision table (CUDA, then Apple MPS, then the CPU) with the probes replaced: no GPU or
Apple hardware is needed, and none is used."""

from __future__ import annotations

import os
import sys

import pytest

from loratui.pipeline import device as devices
from loratui.pipeline.device import Probe
from loratui.pipeline.errors import LoratuiError

NOTHING = Probe()
CUDA_BF16 = Probe(cuda=True, cuda_name="NVIDIA H100", cuda_bf16=True, cuda_free_gib=70.0, cuda_total_gib=80.0)
CUDA_OLD = Probe(cuda=True, cuda_name="Tesla T4", cuda_bf16=False)
MPS_14 = Probe(mps=True, mps_built=True, mps_bf16=True)
MPS_13 = Probe(mps=True, mps_built=True, mps_bf16=False)
MPS_BUILT_ONLY = Probe(mps_built=True)  # an MPS wheel on an Intel Mac or an old macOS
CUDA_AND_MPS = Probe(cuda=True, cuda_name="NVIDIA A10", cuda_bf16=True, mps=True, mps_built=True, mps_bf16=True)


@pytest.mark.parametrize(
    ("want", "hw", "device", "reason"),
    [
        ("auto", CUDA_BF16, "cuda", "auto: CUDA GPU found (NVIDIA H100)"),
        ("auto", CUDA_AND_MPS, "cuda", "auto: CUDA GPU found (NVIDIA A10)"),
        ("auto", MPS_14, "mps", "auto: no CUDA; Apple MPS available"),
        ("auto", MPS_BUILT_ONLY, "cpu", "auto: no CUDA, and MPS is built into torch but not available here"),
        ("auto", NOTHING, "cpu", "auto: no CUDA or MPS"),
        ("cpu", CUDA_AND_MPS, "cpu", "train.device"),
        ("mps", CUDA_AND_MPS, "mps", "train.device"),
        ("cuda", CUDA_OLD, "cuda", "train.device"),
    ],
)
def test_device_order_is_cuda_then_mps_then_cpu(want, hw, device, reason):
    assert devices.choose(want, hw) == (device, reason)


@pytest.mark.parametrize(
    ("want", "hw", "message", "hint"),
    [
        ("cuda", NOTHING, "no CUDA GPU is visible", "train.device=auto"),
        ("cuda", MPS_14, "this machine has an Apple GPU (mps)", "train.device=auto"),
        ("mps", NOTHING, "built without MPS", "arm64 PyTorch wheel"),
        ("mps", MPS_BUILT_ONLY, "MPS is not available", "train.device=auto or cpu"),
        ("mps", CUDA_BF16, "built without MPS", "train.device=auto or cpu"),
    ],
)
def test_asking_for_a_missing_device_is_an_error_with_a_hint(want, hw, message, hint):
    with pytest.raises(LoratuiError) as e:
        devices.choose(want, hw)
    assert message in e.value.message and hint in (e.value.hint or "")


@pytest.mark.parametrize(
    ("device", "hw", "value", "reason"),
    [
        ("cuda", CUDA_BF16, "bf16", "GPU supports bf16"),
        ("cuda", CUDA_OLD, "fp16", "GPU lacks bf16"),
        ("mps", MPS_14, "bf16", "needs no grad scaler"),
        ("mps", MPS_13, "fp32", "before macOS 14"),
        ("cpu", Probe(cpu_bf16=True), "fp32", "bf16 is native here, but cost quality"),
        ("cpu", NOTHING, "fp32", "no native bf16"),
    ],
)
def test_auto_precision_per_device(device, hw, value, reason):
    got = devices.precision("auto", device, hw)
    assert got.value == value and reason in got.reason


def test_explicit_precision_is_kept_except_bf16_on_an_mps_without_it():
    assert devices.precision("bf16", "cpu", NOTHING) == ("bf16", "train.precision")
    assert devices.precision("fp16", "mps", MPS_13) == ("fp16", "train.precision")
    assert devices.precision("bf16", "mps", MPS_14) == ("bf16", "train.precision")
    with pytest.raises(LoratuiError, match="macOS 14") as e:
        devices.precision("bf16", "mps", MPS_13)
    assert "train.precision=auto" in (e.value.hint or "")


def test_qlora_on_mps_is_refused_with_the_nearest_alternative():
    with pytest.raises(LoratuiError, match="4-bit base does not train on Apple MPS") as e:
        devices.training_rules("mps", "qlora", "adamw_torch")
    assert "lora.method=lora" in (e.value.hint or "") and "smaller base" in (e.value.hint or "")
    assert devices.training_rules("mps", "lora", "adamw_torch") == []
    assert devices.training_rules("mps", "dora", "sgd") == []


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_are_refused_on_mps_only(optimizer):
    with pytest.raises(LoratuiError, match="no 8-bit optimizer kernel for Apple MPS") as e:
        devices.training_rules("mps", "lora", optimizer)
    assert e.value.hint == "Set train.optimizer=adamw_torch."
    assert devices.training_rules("cuda", "qlora", optimizer) == []
    cpu = devices.training_rules("cpu", "lora", optimizer)  # bitsandbytes has CPU 8-bit kernels
    assert cpu == (
        [f"{optimizer} on CPU: bitsandbytes runs it unpaged (as adamw_8bit)"] if "paged" in optimizer else []
    )


def test_qlora_on_cpu_runs_with_a_warning_and_mps_takes_one_process():
    (warning,) = devices.training_rules("cpu", "qlora", "adamw_torch")
    assert warning.startswith("qlora on CPU")
    assert devices.training_rules("cuda", "qlora", "adamw_torch", nproc=4) == []
    with pytest.raises(LoratuiError, match="multi-process training on Apple MPS") as e:
        devices.training_rules("mps", "lora", "adamw_torch", nproc=2)
    assert "train.nproc=1" in (e.value.hint or "")


def test_deepspeed_is_refused_without_cuda_even_where_the_package_is_installed(monkeypatch):
    monkeypatch.setattr(devices, "deepspeed_installed", lambda: True)
    with pytest.raises(LoratuiError) as e:
        devices.training_rules("cpu", "lora", "adamw_torch", nproc=2, distributed="deepspeed")
    assert "DeepSpeed trains on CUDA GPUs only (this run's device is cpu)" in e.value.message
    assert "train.distributed=ddp" in (e.value.hint or "") and "pip install deepspeed" in (e.value.hint or "")


def test_deepspeed_on_cuda_needs_the_package_and_one_process_ignores_the_strategy(monkeypatch):
    monkeypatch.setattr(devices, "deepspeed_installed", lambda: False)
    with pytest.raises(LoratuiError, match="the deepspeed package is not installed") as e:
        devices.training_rules("cuda", "lora", "adamw_torch", nproc=4, distributed="deepspeed")
    assert "pip install deepspeed" in (e.value.hint or "") and "fsdp" in (e.value.hint or "")
    assert devices.training_rules("cpu", "lora", "adamw_torch", nproc=1, distributed="deepspeed") == []
    assert devices.training_rules("cpu", "lora", "adamw_torch", nproc=8, distributed="fsdp") == []
    monkeypatch.setattr(devices, "deepspeed_installed", lambda: True)
    assert devices.training_rules("cuda", "lora", "adamw_torch", nproc=4, distributed="deepspeed") == []


def test_deepspeed_is_looked_for_without_importing_it():
    import importlib.util

    assert devices.deepspeed_installed() is (importlib.util.find_spec("deepspeed") is not None)
    assert "deepspeed" not in sys.modules


def test_inference_precision_follows_the_device():
    assert devices.inference_precision("cuda", CUDA_OLD) == "bf16"
    assert devices.inference_precision("mps", MPS_14) == "bf16"
    assert devices.inference_precision("mps", MPS_13) == "fp32"
    assert devices.inference_precision("cpu", Probe(cpu_bf16=True)) == "fp32"


@pytest.fixture
def fresh_fallback(monkeypatch):
    monkeypatch.setattr(devices, "_fallback", {})
    monkeypatch.delenv(devices.MPS_FALLBACK, raising=False)


@pytest.mark.parametrize("torch_loaded", [False, True])
def test_mps_fallback_is_set_and_logged_once(fresh_fallback, monkeypatch, torch_loaded):
    if torch_loaded:
        import torch  # noqa: F401
    else:
        monkeypatch.delitem(sys.modules, "torch", raising=False)  # restored after the test
    lines: list[str] = []
    devices.enable_mps_fallback(lines.append)
    devices.enable_mps_fallback(lines.append)
    assert os.environ[devices.MPS_FALLBACK] == "1"
    (line,) = lines
    if torch_loaded:  # torch read the variable when it was imported: only child processes see it
        assert "after torch was loaded" in line and "export it before starting loratui" in line
    else:
        assert line.startswith(f"{devices.MPS_FALLBACK}=1: operators MPS lacks run on the CPU")


def test_mps_fallback_keeps_the_value_the_environment_set(fresh_fallback, monkeypatch):
    monkeypatch.setenv(devices.MPS_FALLBACK, "0")
    lines: list[str] = []
    devices.enable_mps_fallback(lines.append)
    assert os.environ[devices.MPS_FALLBACK] == "0"
    assert lines == [
        f"{devices.MPS_FALLBACK}=0 in the environment: an operator MPS lacks stops the run instead of using the CPU"
    ]


@pytest.mark.parametrize(("platform", "expected"), [("darwin", "1"), ("linux", None)])
def test_the_fallback_is_set_at_import_only_on_macos(fresh_fallback, monkeypatch, platform, expected):
    monkeypatch.setattr(devices.sys, "platform", platform)
    devices._set_mps_fallback()
    assert os.environ.get(devices.MPS_FALLBACK) == expected


def test_pick_and_probe_on_this_machine(monkeypatch):
    """The real probe fills the record; ``pick`` follows whatever the probe says."""
    hw = devices.probe()
    assert hw.cpu_bf16 == devices.cpu_has_native_bf16()
    assert devices.pick() == devices.choose("auto", hw).value
    monkeypatch.setattr(devices, "probe", lambda: MPS_14)
    assert devices.pick() == "mps" and devices.pick("cpu") == "cpu"


def test_module_imports_without_torch():
    import subprocess

    code = "import sys, loratui.pipeline.device; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
