"""How the base is loaded per device (the arguments only: nothing is loaded on a GPU here), and what counts
as running out of memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratui.pipeline.config import load_config
from loratui.pipeline.train.model import _load_kwargs, is_oom


@pytest.mark.parametrize(
    ("device", "precision", "dtype", "device_map"),
    [
        ("cuda", "bf16", torch.bfloat16, {"": 0}),
        ("cuda", "fp16", torch.float16, {"": 0}),
        ("mps", "bf16", torch.bfloat16, {"": "mps"}),
        ("mps", "fp32", torch.float32, {"": "mps"}),
        ("cpu", "bf16", torch.float32, None),  # the CPU keeps fp32 weights; bf16 is the Trainer's autocast
    ],
)
def test_the_base_is_loaded_in_the_devices_precision(monkeypatch, device, precision, dtype, device_map):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    kwargs = _load_kwargs(load_config(None, []), Path("unused"), "seq2seq", device, precision, padding_free=False)
    assert kwargs["dtype"] is dtype
    assert kwargs.get("device_map") == device_map


def test_out_of_memory_on_cuda_and_mps_but_not_other_errors():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 17.5 GB, other allocations: 1 GB)"))
    assert not is_oom(RuntimeError("out of memory while reading the dataset"))  # neither device said it
    assert not is_oom(ValueError("shapes do not match"))
