"""The Trainer's device settings: pinned memory only for a CUDA GPU, ``use_cpu`` only for the CPU."""

from __future__ import annotations

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.runs import RunDir
from loratui.pipeline.train.arguments import training_arguments
from loratui.pipeline.train.settings import Resolved


@pytest.mark.parametrize(
    ("device", "pin", "use_cpu"), [("cuda", True, False), ("mps", False, False), ("cpu", False, True)]
)
def test_pinned_memory_and_use_cpu_per_device(tmp_path, device, pin, use_cpu):
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=t"])
    resolved = Resolved()
    for key, value in {"train.batch_size": 2, "train.grad_accum": 1, "train.epochs": 1}.items():
        resolved.set(key, value, "test")
    args = training_arguments(cfg, RunDir.for_config(cfg), resolved, device, "fp32", has_eval=False)
    assert args.dataloader_pin_memory is pin
    assert args.use_cpu is use_cpu
    assert args.dataloader_num_workers == 0
