"""The train step on tiny models: methods, masks, cancel and exact resume, continual modes, OOM fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.events import MemoryWriter, read_events
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, EXIT_USER, StopFlag, load_step, run_step
from loratui.pipeline.train import history as hist


def _cfg(tmp_path: Path, model: Path, *overrides: str, name: str = "t") -> RunConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.epochs=2",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )


def _train(cfg: RunConfig, stop: StopFlag | None = None):
    mem = MemoryWriter()
    code, result, _ = run_step("train", load_step("train"), cfg, writers=[mem], stop=stop)
    return code, result, mem


def _losses(mem: MemoryWriter) -> dict[int, float]:
    return {e.at: e.values["loss"] for e in mem.of_type("metric") if e.split == "train" and "loss" in e.values}


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "qlora"])
def test_each_method_trains_and_loss_goes_down(tmp_path, tiny_llama, method):
    extra = ["lora.use_rslora=true"] if method == "rslora" else [f"lora.method={method}"]
    cfg = _cfg(tmp_path, tiny_llama, "train.epochs=3", *extra)
    code, result, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    losses = list(_losses(mem).values())
    assert len(losses) == result.summary["steps"] > 5
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    run = RunDir.for_config(cfg)
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    assert adapter["use_dora"] is (method == "dora")
    assert adapter["use_rslora"] is (method == "rslora")
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    # all-linear: attention and MLP projections, never the output head
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    qlora_logs = [e for e in mem.of_type("log") if e.message.startswith("qlora on CPU")]
    assert bool(qlora_logs) is (method == "qlora")  # the 4-bit base was loaded (and said so)


def test_adapter_loads_with_plain_peft(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_llama, "train.epochs=1", "lora.target_modules=attention")
    assert _train(cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model = PeftModel.from_pretrained(base, str(run.adapter))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert sorted(adapted) == ["q_proj", "v_proj"]
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape[-1] == base.config.vocab_size


def test_auto_settings_are_written_to_config(tmp_path, tiny_llama):
    cfg = _cfg(
        tmp_path,
        tiny_llama,
        "train.epochs=auto",
        "train.batch_size=auto",
        "train.grad_accum=auto",
        "lora.r=auto",
        "train.max_steps=2",
    )
    code, result, mem = _train(cfg)
    assert code == EXIT_OK
    written = load_config(RunDir.for_config(cfg).config, [])
    assert written.lora.r == 8 and written.lora.alpha == 16  # 100 short rows: < 20k tokens
    assert written.train.batch_size * written.train.grad_accum == written.train.effective_batch == 16
    assert written.train.epochs == 10
    assert written.train.resume is False
    reasons = [e.message for e in mem.of_type("log") if e.message.startswith("setting ")]
    assert any("lora.r = 8" in r and "tokens" in r for r in reasons)


def test_the_estimate_is_announced_before_the_first_step_and_kept_beside_the_measured(tmp_path, tiny_llama):
    from loratui.pipeline.report import render_markdown

    cfg = _cfg(tmp_path, tiny_llama, "train.max_steps=3")
    code, _result, mem = _train(cfg)
    assert code == EXIT_OK
    order = [e for e in mem if e.type in ("log", "progress")]
    first_step = next(i for i, e in enumerate(order) if e.type == "progress" and e.task == "train")
    announced = [i for i, e in enumerate(order) if e.type == "log" and getattr(e, "estimate", None)]
    assert announced and announced[0] < first_step
    estimate = order[announced[0]].estimate
    assert estimate["device"] == "cpu" and estimate["time"]["source"] == "analytic"
    assert estimate["settings"]["batch_size"] == 4 and estimate["time"]["steps"] == 3
    run = RunDir.for_config(cfg)
    version = hist.current_version(run)
    assert version.estimate["peak_memory_bytes"] == sum(estimate["memory"]["parts"].values())
    assert version.metrics["peak_memory_bytes"] > 100 << 20 and version.metrics["train_seconds"] > 0
    on_disk = [e for e in read_events(run.events) if e.type == "log" and getattr(e, "estimate", None)]
    assert on_disk  # in events.jsonl too
    report = render_markdown(cfg, run)
    assert "| training time (the Trainer's) |" in report and "peak resident memory" in report


def test_a_fault_in_the_estimate_does_not_stop_training(tmp_path, tiny_llama, monkeypatch):
    from loratui.pipeline.train import step

    def broken(*args, **kwargs):
        raise RuntimeError("estimate bug")

    monkeypatch.setattr(step, "estimate_for", broken)
    monkeypatch.setattr(step, "memory_tokens", broken)
    code, result, mem = _train(_cfg(tmp_path, tiny_llama, "train.max_steps=2", "train.batch_size=auto"))
    assert code == EXIT_OK and result.summary["steps"] == 2
    warnings = [e.message for e in mem.of_type("log") if e.level == "warning"]
    assert any("no estimate for this run (RuntimeError: estimate bug)" in w for w in warnings)
    assert any("auto micro-batch without the memory model" in w for w in warnings)


def test_auto_micro_batch_is_bounded_by_the_memory_model():
    from loratui.pipeline.train import settings

    cfg = load_config(None, ["train.batch_size=auto", "train.grad_accum=auto"])
    lengths = [100] * 64
    roomy = settings.resolve_auto(cfg, lengths, device="cpu", nproc=1, memory_tokens=10_000)
    assert roomy["train.batch_size"] == 8  # the CPU budget (1,024 tokens) decides
    tight = settings.resolve_auto(cfg, lengths, device="cpu", nproc=1, memory_tokens=250)
    assert tight["train.batch_size"] == 2 and "fit in the RAM" in tight.choices["train.batch_size"].reason
    gpu = settings.resolve_auto(cfg, lengths, device="cuda", nproc=1, free_gib=20, memory_tokens=450)
    assert gpu["train.batch_size"] == 4 and gpu["train.grad_accum"] == 4
    assert "memory model" in gpu.choices["train.batch_size"].reason


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_is_fp32_on_any_cpu_and_bf16_only_when_asked(native_bf16):
    """The same run on AVX2 and AVX512-BF16 CPUs: bf16 there cost the quickstart quality for 17% speed."""
    from loratui.pipeline.device import Probe
    from loratui.pipeline.train import settings

    cpu = Probe(cpu_bf16=native_bf16)
    assert settings.resolve_precision(load_config(None, []), "cpu", cpu).value == "fp32"
    assert settings.resolve_precision(load_config(None, ["train.precision=bf16"]), "cpu", cpu).value == "bf16"
    assert settings.resolve_precision(load_config(None, []), "cuda", Probe(cuda=True, cuda_bf16=True)).value == "bf16"
    assert settings.resolve_precision(load_config(None, []), "cuda", Probe(cuda=True)).value == "fp16"
    assert settings.resolve_device(load_config(None, []), cpu).value == "cpu"


def test_train_logs_the_device_and_why(tmp_path, tiny_llama, monkeypatch):
    from loratui.pipeline import device as devices

    monkeypatch.setattr(devices, "probe", lambda: devices.Probe())
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, "train.max_steps=1"))
    assert code == EXIT_OK
    logs = [e.message for e in mem.of_type("log")]
    assert "device cpu (auto: no CUDA or MPS); precision fp32 (CPU has no native bf16" in "\n".join(logs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.method=qlora"], "4-bit base does not train on Apple MPS"),
        (["train.optimizer=adamw_8bit"], "no 8-bit optimizer kernel for Apple MPS"),
    ],
)
def test_train_on_a_probed_mps_refuses_before_loading_the_model(tmp_path, tiny_llama, monkeypatch, overrides, message):
    """Only the probe says MPS: the refusal comes before any model is loaded on it."""
    from loratui.pipeline import device as devices
    from loratui.pipeline.train import step

    monkeypatch.setattr(devices, "probe", lambda: devices.Probe(mps=True, mps_built=True, mps_bf16=True))
    monkeypatch.setattr(step, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, *overrides))
    assert code == EXIT_USER
    (error,) = mem.of_type("error")
    assert message in error.message and error.hint


def test_prompt_tokens_carry_no_loss(tmp_path, tiny_llama):
    """The collated batch trains exactly the data step's label tokens, each predicted from its own example."""
    from datasets import load_from_disk

    from loratui.pipeline.train.fast import IGNORE, PaddingFreeCollator

    cfg = _cfg(tmp_path, tiny_llama, "train.max_steps=1")
    assert _train(cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    rows = load_from_disk(str(run.data / "processed" / "train")).select(range(4))
    feats = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    batch = PaddingFreeCollator()(feats)
    targets = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    expected = [t for f in feats for t in f["labels"][1:] if t != IGNORE]
    assert targets == expected
    assert all(f["labels"][:5] == [IGNORE] * 5 for f in feats)  # the prompt really is masked


def test_cancel_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama):
    full_cfg = _cfg(tmp_path, tiny_llama, name="full")
    code, _, full = _train(full_cfg)
    assert code == EXIT_OK
    want = _losses(full)

    cfg = _cfg(tmp_path, tiny_llama, name="cut")
    stop = StopFlag()
    mem_probe = MemoryWriter()

    def probe(event):  # SIGTERM's effect, at step 5
        mem_probe(event)
        if event.type == "progress" and event.task == "train" and event.current >= 5:
            stop.set()

    code, result, _ = run_step("train", load_step("train"), cfg, writers=[probe], stop=stop)
    assert code == EXIT_CANCELLED
    assert result.resume_from.endswith("checkpoint-6")  # the step running when the signal came finishes
    assert mem_probe.of_type("cancelled")[0].resume_from == result.resume_from
    assert not RunDir.for_config(cfg).adapter.exists()

    cfg.train.resume = True
    code, _, rest = _train(cfg)
    assert code == EXIT_OK, [e.message for e in rest.of_type("error")] + [e.message for e in rest.of_type("log")][-3:]
    got = {**_losses(mem_probe), **_losses(rest)}
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), (step, got[step], loss)


def test_resume_errors_are_clear(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, "train.resume=true")
    code, _, mem = _train(cfg)
    assert code == EXIT_USER
    assert "no complete checkpoint" in mem.of_type("error")[0].message
    cfg = _cfg(tmp_path, tiny_llama, "train.resume=checkpoint-99")
    code, _, mem = _train(cfg)
    assert code == EXIT_USER and "checkpoint-99" in mem.of_type("error")[0].message


def test_continue_stack_and_rollback(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama, "train.epochs=1")
    assert _train(cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    v1 = (run.adapter / "adapter_model.safetensors").read_bytes()

    stack = _cfg(tmp_path, tiny_llama, "train.epochs=1", "train.mode=stack", "data.source=quickstart-more")
    code, result, mem = _train(stack)
    assert code == EXIT_OK and result.summary["version"] == 2
    assert any("stack: merging" in e.message for e in mem.of_type("log"))
    cont = _cfg(tmp_path, tiny_llama, "train.epochs=1", "train.mode=continue", "data.source=quickstart-more")
    code, result, _ = _train(cont)
    assert code == EXIT_OK and result.summary["version"] == 3

    history = hist.AdapterHistory.load(run)
    by_version = {v.version: v for v in history.versions}
    assert history.current == 3
    assert by_version[1].mode == "fresh" and by_version[1].stack == []
    assert by_version[2].mode == "stack" and by_version[2].stack == [1] and by_version[2].parent == 1
    assert by_version[3].mode == "continue" and by_version[3].parent == 2 and by_version[3].stack == [1]
    assert by_version[2].data["cache_key"] != by_version[1].data["cache_key"]
    assert json.loads((run.adapter / "loratui.json").read_text())["version"] == 3
    # continue starts from v2's weights, stack from a fresh adapter: both differ from v1
    assert (hist.version_dir(run, 2) / "adapter_model.safetensors").read_bytes() != v1

    hist.rollback(run, 1)
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == v1
    assert hist.AdapterHistory.load(run).current == 1
    assert len(hist.AdapterHistory.load(run).versions) == 3  # later versions are kept


def test_continue_without_an_adapter_is_a_clear_error(tmp_path, tiny_llama):
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, "train.mode=continue"))
    assert code == EXIT_USER
    assert "no trained adapter yet" in mem.of_type("error")[0].message


def test_out_of_memory_halves_the_micro_batch(tmp_path, tiny_llama, monkeypatch):
    from loratui.pipeline.train.trainer import LoratuiTrainer

    real = LoratuiTrainer.compute_loss

    def fake_oom(self, model, inputs, *args, **kwargs):
        if model.training and self.args.per_device_train_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LoratuiTrainer, "compute_loss", fake_oom)
    cfg = _cfg(tmp_path, tiny_llama, "train.epochs=1", "train.batch_size=8", "train.grad_accum=1")
    code, result, mem = _train(cfg)
    assert code == EXIT_OK
    warnings = [e.message for e in mem.of_type("log") if e.message.startswith("out of memory")]
    assert len(warnings) == 2 and "micro-batch 2 x accumulation 4" in warnings[-1]
    written = load_config(RunDir.for_config(cfg).config, [])
    assert (written.train.batch_size, written.train.grad_accum) == (2, 4)

    def always_oom(self, model, inputs, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LoratuiTrainer, "compute_loss", always_oom)
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, "train.batch_size=2", "train.grad_accum=1", name="oom"))
    assert code == EXIT_USER
    assert "out of memory at micro-batch 1" in mem.of_type("error")[0].message


def test_history_and_rollback_commands(tmp_path, tiny_llama, capsys):
    from loratui.cli import main

    cfg = _cfg(tmp_path, tiny_llama, "train.max_steps=1")
    assert _train(cfg)[0] == EXIT_OK
    args = [f"runs_dir={tmp_path / 'runs'}", "name=t"]
    assert main(["train", "history", *args]) == 0
    assert "v1" in capsys.readouterr().out
    assert main(["train", "rollback", "v1", *args]) == 0
    assert main(["train", "rollback", "7", *args]) == EXIT_USER
    assert "no adapter version 7" in capsys.readouterr().err


def test_seq2seq_trains(tmp_path, tiny_model_factory):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    t5 = tiny_model_factory(family="t5")
    cfg = _cfg(tmp_path, t5, "train.epochs=3", "lora.target_modules=attention")
    code, result, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    losses = list(_losses(mem).values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    run = RunDir.for_config(cfg)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    assert any("padded batches" in e.message for e in mem.of_type("log"))
    PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(t5)), str(run.adapter))


def _spawn_train(cfg_path: Path, *args: str):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "loratui", "train", "--config", str(cfg_path), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_then_resume_from_the_last_periodic_checkpoint(tmp_path, tiny_llama):
    import time

    from loratui.pipeline.runs import write_config

    cfg = _cfg(tmp_path, tiny_llama, "train.save_every=2", "train.keep_best=false", "train.epochs=4")
    path = tmp_path / "x.yaml"
    write_config(path, cfg)
    run = RunDir.for_config(cfg)
    proc = _spawn_train(path)
    deadline = time.monotonic() + 120
    while not (run.checkpoints / "checkpoint-4" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not run.adapter.exists()
    proc = _spawn_train(path, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    events = read_events(run.events)
    resumed = [e for e in events if e.type == "log" and e.message.startswith("resuming from")]
    assert resumed and "checkpoint-" in resumed[-1].message
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_two_processes_train_one_adapter(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_llama, "train.nproc=2", "train.epochs=1", "train.batch_size=2", "train.grad_accum=2")
    code, result, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert result.summary["processes"] == 2
    assert any("launching 2 processes" in e.message for e in mem.of_type("log"))
    # 100 rows, 2 per process per micro-batch, 2 processes, accumulation 2: 8 examples a step
    assert result.summary["steps"] == 13
    run = RunDir.for_config(cfg)
    assert len([e for e in read_events(run.events) if e.type == "done"]) == 1
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(run.adapter))


KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_the_kernels_hint_filter_drops_only_that_message(caplog):
    import logging

    from loratui.pipeline.train.quiet import BNB_CPU_LOGGER, quiet_bitsandbytes

    quiet_bitsandbytes()
    quiet_bitsandbytes()  # idempotent
    logger = logging.getLogger(BNB_CPU_LOGGER)
    assert len([f for f in logger.filters if type(f).__name__ == "_DropKernelsHint"]) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning(
            KERNELS_HINT + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes.cextension").warning(KERNELS_HINT + " (another logger)")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["some other bitsandbytes warning", KERNELS_HINT + " (another logger)"]


def test_a_lora_start_on_cpu_does_not_print_the_bitsandbytes_kernels_hint(tmp_path, tiny_llama):
    """bitsandbytes logs the hint when peft imports it (on CPUs with AVX512-BF16 and no `kernels` package)."""
    from loratui.pipeline.runs import write_config

    cfg = _cfg(tmp_path, tiny_llama, "train.max_steps=1", "train.device=cpu")
    path = tmp_path / "x.yaml"
    write_config(path, cfg)
    proc = _spawn_train(path)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert KERNELS_HINT not in stderr and "pip install kernels" not in stderr, stderr
    assert "train done" in stderr  # stderr was captured: the human view is there


def test_a_resumed_training_shows_its_whole_loss_curve_and_never_another_versions(tmp_path, tiny_llama):
    from loratui.pipeline.events import EventSink, JsonlWriter
    from loratui.pipeline.report import _num, render_markdown
    from loratui.tui.state import RunState

    cfg = _cfg(tmp_path, tiny_llama, "train.epochs=1", name="cut")
    run = RunDir.for_config(cfg)
    stop = StopFlag()
    first = MemoryWriter()

    def probe(event):  # SIGTERM's effect, at step 5: a checkpoint at step 6
        first(event)
        if event.type == "progress" and event.task == "train" and event.current >= 5:
            stop.set()

    assert run_step("train", load_step("train"), cfg, writers=[probe], stop=stop)[0] == EXIT_CANCELLED
    cfg.train.resume = True
    code, _, rest = _train(cfg)
    assert code == EXIT_OK
    want = {**_losses(first), **_losses(rest)}  # equal to an uninterrupted run's (the test above)
    assert min(_losses(rest)) == 7 and sorted(want) == list(range(1, max(want) + 1))

    # report.md's training section and the TUI's chart start at step 1, not at the resume
    text = render_markdown(cfg, run)
    assert f"Training loss {_num(want[1])} -> {_num(want[max(want)])}" in text, text
    state = RunState.load(cfg)
    assert [s for s, _ in state.train_loss] == sorted(want)
    assert [v for _, v in state.train_loss] == pytest.approx([want[s] for s in sorted(want)], abs=1e-6)
    want_eval = {
        e.at: e.values["eval_loss"] for mem in (first, rest) for e in mem.of_type("metric") if "eval_loss" in e.values
    }
    assert [s for s, _ in state.eval_loss] == sorted(want_eval) and max(want) in want_eval

    # one source for all: the Trainer's log_history, saved with the version; the resume event carries the steps before
    from loratui.pipeline.eval.report import training_curve

    resumed = next(e for e in rest.of_type("log") if e.message.startswith("resuming from"))
    assert [s for s, _ in resumed.curve["train"]] == list(range(1, 7))
    train, evals = hist.load_curve(hist.version_dir(run, 1))
    assert train == pytest.approx(want, abs=1e-6) and evals == pytest.approx(want_eval, abs=1e-6)
    assert hist.current_version(run).metrics["train_loss_first"] == pytest.approx(want[1])
    assert training_curve({"target": {"kind": "adapter", "path": str(run.adapter)}}, run)[0] == train

    # a killed attempt's stray points, then a forced fresh re-train (v2): its curve is its own
    stray = EventSink("train", [JsonlWriter(run.events)])
    stray.log("train: run cut in elsewhere", level="debug", pid=999_999_999)
    for step in range(1, 31):
        stray.metric({"loss": 99.0}, at=step, split="train")
    stray.close()
    code, _, again = _train(_cfg(tmp_path, tiny_llama, "train.max_steps=3", name="cut"))
    assert code == EXIT_OK
    v2 = _losses(again)
    assert sorted(v2) == [1, 2, 3]
    assert RunState.load(cfg).train_loss == sorted(v2.items())
    assert training_curve({"target": {"kind": "adapter", "path": str(run.adapter)}}, run)[0] == pytest.approx(v2)

    # rolled back to v1: v1's whole curve again, not the last invocation's
    hist.rollback(run, 1)
    assert [s for s, _ in RunState.load(cfg).train_loss] == sorted(want)
    assert f"Training loss {_num(want[1])} -> " in render_markdown(cfg, run)
