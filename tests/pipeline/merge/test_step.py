"""The merge step on tiny models: exact merges, dtypes kept or chosen, parity, stacks, QLoRA, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER, load_step, run_step

REPO = Path(__file__).resolve().parents[3]


def _cfg(tmp_path: Path, model: Path, *overrides: str, name: str = "m") -> RunConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=5e-2",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )


def _step(name: str, cfg: RunConfig):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem])
    return code, result, mem


def _file_dtypes(folder: Path) -> set[str]:
    out = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return out


def _reference_logits(base: Path, adapters: list[Path], ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """base + adapters the plain peft way: all but the last merged, the last applied unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    for path in adapters[:-1]:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(adapters[-1]))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _merged_logits(merged: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged))  # plain transformers, no loratui, no peft
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _merge_half_of_the_adapter(monkeypatch) -> None:
    """A wrong merge: the adapter's scaling halved just before it is folded in."""
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def half_merge(self, *a, **kw):
        for module in self.model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: v / 2 for k, v in module.scaling.items()}
        return real(self, *a, **kw)

    monkeypatch.setattr(LoraModel, "merge_and_unload", half_merge)


IDS = torch.tensor([[5, 17, 23, 42, 8, 99, 3, 61, 12]])


def test_fp32_merge_is_exact_and_loads_with_plain_transformers(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("merge", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    run = RunDir.for_config(cfg)
    merged = run.merged
    assert _file_dtypes(merged) == {"F32"}
    assert not list(merged.glob("adapter_*"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (merged / name).is_file(), name
    assert (
        json.loads((merged / "tokenizer_config.json").read_text()).get("chat_template")
        or (merged / "chat_template.jinja").is_file()
    )
    got = _merged_logits(merged, IDS)
    want = _reference_logits(tiny_llama, [run.adapter], IDS)
    assert (got - want).abs().max() < 1e-4
    parity = result.summary["parity"]
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    assert parity["examples"] == 8  # from the run's test split
    metric = next(e for e in mem.of_type("metric") if "parity_max_abs_diff" in e.values)
    assert metric.values["parity_max_abs_diff"] == pytest.approx(parity["max_abs_diff"])
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Parity check" in card
    assert f"max |difference| {parity['max_abs_diff']:.3g}" in card and "version 1" in card
    assert "data hash" in card and "No evaluation yet" in card
    mask = os.umask(0)
    os.umask(mask)
    # published like any folder (the temp folder and files are created private)
    assert merged.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (merged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize(
    "stored, override, want",
    [("bfloat16", "auto", "BF16"), ("float32", "bfloat16", "BF16"), ("float32", "float16", "F16")],
)
def test_dtype_is_kept_or_overridden(tmp_path, tiny_model_factory, stored, override, want):
    base = tiny_model_factory(dtype=stored)
    cfg = _cfg(tmp_path, base, f"merge.dtype={override}")
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("merge", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    merged = RunDir.for_config(cfg).merged
    assert _file_dtypes(merged) == {want}
    config = json.loads((merged / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == {"BF16": "bfloat16", "F16": "float16"}[want]
    assert result.summary["parity"]["passed"]


def test_a_corrupted_adapter_fails_parity_and_writes_nothing(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    weights = run.adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "parity check" in err.message and "NaN or inf" in err.message and "NaN" in (err.hint or "")
    assert not run.merged.exists() and not list(run.path.glob(".merged.*"))


def test_parity_fails_on_a_wrong_merge(tmp_path, tiny_llama, monkeypatch):
    """A merge that drops part of the adapter (what a wrong scaling or a skipped module does)."""
    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    _merge_half_of_the_adapter(monkeypatch)
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert err.message.startswith("parity check failed") and "top-1 agreement" in err.message
    assert not RunDir.for_config(cfg).merged.exists()


def test_stacked_adapters_merge_in_order(tmp_path, tiny_llama):
    first = _cfg(tmp_path, tiny_llama)
    assert _step("train", first)[0] == EXIT_OK
    second = _cfg(tmp_path, tiny_llama, "data.source=quickstart-more", "train.mode=stack")
    assert _step("train", second)[0] == EXIT_OK
    code, result, mem = _step("merge", second)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    run = RunDir.for_config(second)
    v1, v2 = run.path / "adapters" / "v1", run.path / "adapters" / "v2"
    got = _merged_logits(run.merged, IDS)
    assert (got - _reference_logits(tiny_llama, [v1, v2], IDS)).abs().max() < 1e-4
    assert (got - _reference_logits(tiny_llama, [v2], IDS)).abs().max() > 1e-3  # v1 really is in there
    assert "merged first, in order" in (run.merged / "README.md").read_text()


def test_qlora_adapter_merges_into_the_unquantized_base(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, "lora.method=qlora")
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("merge", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    merged = RunDir.for_config(cfg).merged
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert _file_dtypes(merged) == {"F32"}
    assert any("unquantized base" in e.message for e in mem.of_type("log"))
    assert result.summary["parity"]["passed"]


def test_a_quantized_base_is_refused(tmp_path, tiny_llama):
    import shutil

    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    quantized = tmp_path / "base-4bit"
    shutil.copytree(tiny_llama, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    code, _, mem = _step(
        "merge", cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": str(quantized)})})
    )
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "stored quantized (bitsandbytes)" in err.message and "unquantized original" in (err.hint or "")


def test_no_adapter_and_no_disk_space_are_clear_errors(tmp_path, tiny_llama, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg = _cfg(tmp_path, tiny_llama)
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_USER and "no trained adapter" in mem.of_type("error")[0].message
    assert _step("train", cfg)[0] == EXIT_OK
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "free, the merged model needs about" in err.message


def test_a_killed_merge_leaves_no_merged_directory_and_keeps_an_earlier_one(tmp_path, tiny_llama):
    cfg_args = [
        "name=k",
        f"runs_dir={tmp_path / 'runs'}",
        f"model.base={tiny_llama}",
        "data.source=quickstart",
        "train.max_steps=1",
        "train.batch_size=8",
        "train.grad_accum=1",
    ]
    cfg = load_config(None, cfg_args)
    assert _step("train", cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    cmd = [sys.executable, "-m", "loratui", "merge", *cfg_args, "merge.parity_prompts=400"]

    def kill_while_writing() -> bool:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, seen = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None:
            if list(run.path.glob(".merged.*.tmp")):  # the weights are being written or checked
                seen = True
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
        return seen

    assert kill_while_writing(), "the merge finished before it could be killed"
    assert not run.merged.exists()
    code, _, mem = _step("merge", cfg)  # clears the leftover and completes
    assert code == EXIT_OK, [e.message for e in [*mem.of_type("error"), *mem.of_type("cancelled")]]
    assert run.merged.is_dir() and not list(run.path.glob(".merged.*.tmp"))
    before = {p.name: p.read_bytes() for p in run.merged.iterdir()}
    assert kill_while_writing()  # a second merge killed halfway: the first one's output is intact
    assert {p.name: p.read_bytes() for p in run.merged.iterdir()} == before


def test_parity_catches_a_merge_that_loses_the_adapter_in_bfloat16(tmp_path, tiny_llama, monkeypatch):
    """In 16-bit the tolerance is loose; losing half of the adapter's effect still fails."""
    cfg = _cfg(tmp_path, tiny_llama, "merge.dtype=bfloat16")
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, _ = _step("merge", cfg)
    assert code == EXIT_OK and result.summary["parity"]["adapter_effect"] > result.summary["parity"]["max_abs_diff"] * 2
    _merge_half_of_the_adapter(monkeypatch)
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_USER
    assert mem.of_type("error")[0].message.startswith("parity check failed")


def test_dora_and_seq2seq_merge(tmp_path, tiny_llama, tiny_model_factory):
    from transformers import AutoModelForSeq2SeqLM

    dora = _cfg(tmp_path, tiny_llama, "lora.method=dora", name="dora")
    assert _step("train", dora)[0] == EXIT_OK
    code, result, mem = _step("merge", dora)
    assert code == EXIT_OK and result.summary["parity"]["passed"], [e.message for e in mem.of_type("error")]
    run = RunDir.for_config(dora)
    assert (_merged_logits(run.merged, IDS) - _reference_logits(tiny_llama, [run.adapter], IDS)).abs().max() < 1e-4
    assert "DoRA" in (run.merged / "README.md").read_text()
    t5 = _cfg(tmp_path, tiny_model_factory(family="t5"), name="t5")
    assert _step("train", t5)[0] == EXIT_OK
    code, result, mem = _step("merge", t5)
    assert code == EXIT_OK and result.summary["parity"]["passed"], [e.message for e in mem.of_type("error")]
    merged = RunDir.for_config(t5).merged
    AutoModelForSeq2SeqLM.from_pretrained(str(merged))
    assert "pipeline_tag: text2text-generation" in (merged / "README.md").read_text()


def test_generation_config_and_trained_chat_template_are_kept(tmp_path, tiny_llama):
    import shutil

    from transformers import AutoTokenizer

    from loratui.pipeline.data.templates import NAMED_TEMPLATES

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    gen = json.loads((base / "generation_config.json").read_text())
    gen.update(do_sample=False, temperature=0.7, top_p=0.9)  # what transformers refuses to save strictly
    (base / "generation_config.json").write_text(json.dumps(gen))
    cfg = _cfg(tmp_path, base, "data.template=alpaca")
    assert _step("train", cfg)[0] == EXIT_OK
    code, _, mem = _step("merge", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    merged = RunDir.for_config(cfg).merged
    assert json.loads((merged / "generation_config.json").read_text()) == gen
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == NAMED_TEMPLATES["alpaca"]


def test_an_adapter_is_not_merged_into_another_base(tmp_path, tiny_llama, tiny_model_factory):
    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    other = tiny_model_factory(seed=1)  # same shapes, other weights: nothing would fail, the result would be wrong
    code, _, mem = _step("merge", cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": str(other)})}))
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert f"was trained on {tiny_llama}" in err.message and "model.base=" in (err.hint or "")


def test_the_record_tells_whether_merged_is_current(tmp_path, tiny_llama):
    from loratui.pipeline.merge.merging import current_merge

    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    record, why = current_merge(cfg, run)
    assert record is None and why.endswith("merged is missing")
    assert _step("merge", cfg)[0] == EXIT_OK
    record, why = current_merge(cfg, run)
    assert record is not None and why.endswith("is current (adapter v1)"), why
    assert len(record["adapter_sha256"]) == 64 and record["settings"]["dtype"] == "auto"
    # a setting the merged files depend on
    bf16 = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"dtype": "bfloat16"})})
    assert current_merge(bf16, run) == (None, "the merge settings changed since the last merge")
    # the adapter's weights replaced under the same version number
    weights = run.adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert current_merge(cfg, run) == (None, "the adapter's weights changed since the last merge")
    # a merged/ written by an older loratui (no digest) is merged again once
    (run.merged / "loratui-merge.json").write_text(json.dumps({"version": 1, "dtype": "float32"}))
    assert "older loratui" in current_merge(cfg, run)[1]
