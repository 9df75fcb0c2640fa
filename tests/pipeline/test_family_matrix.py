"""Every family through every step, as `loratui` runs them: the family matrix.

For each family of :mod:`loratui.pipeline.families` a tiny random model (tests/tiny_models.py) gets the
family's own chat template (the real one, from the llama-cpp-python sdist: tests/family_assets.py) and
its special tokens, then goes data (single- and multi-turn chats) -> train (LoRA, padding-free where
the family allows it) -> merge (parity) -> GGUF (llama.cpp's converter, the file loaded and judged in
llama.cpp against the merged model) -> LoRA-GGUF -> ONNX (onnxruntime-genai's builder, judged in ONNX
Runtime) -> serve (one chat completion through the official `openai` client).

What the registry says a family cannot do must be refused up front with the registry's reason, and
every other cell must pass: the README's support table is generated from the same registry, so this
test is what keeps that table true.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from loratui.pipeline import families
from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

EXPORTS = ("gguf", "gguf-lora", "onnx")


@dataclass(frozen=True)
class Spec:
    template: str | None  # the real chat template's file in the llama-cpp-python sdist (None: the tokenizer's)
    specials: tuple[str, ...] = ()  # special tokens that template writes, added to the tiny vocabulary
    eos: str | None = None  # the end-of-turn token generation stops at
    system: bool = True  # the template accepts a system message
    # the tiny model's vocabulary (tests/tiny_models.py): "smollm2" (byte-level BPE), "spm" (a SentencePiece
    # model laid out as the family's own, shipped as tokenizer.model, as its checkpoints ship it) or a
    # family's own ("qwen2": Qwen's)
    tokenizer: str = "smollm2"
    config: tuple[tuple[str, object], ...] = ()  # config values of the family's released checkpoints (key, value)
    sizes: tuple[tuple[str, int], ...] = ()  # make_tiny_model sizes (layers, ...) other than its defaults
    tiny: str | None = None  # the tests/tiny_models.py family, when not the registry's key


# llama.cpp derives Gemma 2 / 3's attention scale from the head size (1/sqrt(head_dim); 27B: hidden / heads),
# as every released checkpoint sets query_pre_attn_scalar, and ignores the config's value: the tiny models'
# 24 (chosen so training tests see a scale other than head_dim ** -0.5) is set back to their head_dim 16
_GEMMA_SCALE = ("query_pre_attn_scalar", 16)
# and Gemma 3's layer pattern is fixed in llama.cpp: 5 sliding-window layers, then a full one (as released)
_GEMMA3_LAYERS = ("layer_types", ["sliding_attention"] * 5 + ["full_attention"])


_MISTRAL3 = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]")

MATRIX: dict[str, Spec] = {
    # Llama 3's RoPE scaling (llama3-type rope_scaling: llama.cpp's rope_freqs tensor) and its date-writing template
    "llama": Spec(
        "meta-llama-Llama-3.2-3B-Instruct",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        tiny="llama3",
    ),
    # no sliding window, as Mistral 7B v0.2/v0.3 and Nemo ship (sliding_window: null)
    "mistral": Spec(
        "mistralai-Mistral-Nemo-Instruct-2407", ("[INST]", "[/INST]"), None, config=(("sliding_window", None),)
    ),
    "ministral": Spec("mistralai-Mistral-Nemo-Instruct-2407", ("[INST]", "[/INST]"), None),
    "ministral3": Spec("mistralai-Ministral-3-14B-Reasoning-2512", _MISTRAL3, None),
    # Qwen's own vocabulary: transformers 5 tokenizes every qwen2 model with Qwen2's pre-tokenizer
    # (Qwen2Tokenizer) whatever its tokenizer.json says, and llama.cpp's converter recognizes that
    # pre-tokenizer by the ids it gives Qwen's vocabulary, not SmolLM2's
    "qwen2": Spec("Qwen-Qwen2.5-7B-Instruct", (), "<|im_end|>", tokenizer="qwen2"),
    "qwen3": Spec("Qwen-Qwen3-0.6B", ("<think>", "</think>"), "<|im_end|>"),
    "qwen3_moe": Spec("Qwen-Qwen3-0.6B", ("<think>", "</think>"), "<|im_end|>"),
    "qwen3_5": Spec("Qwen3.5-4B", ("<think>", "</think>"), "<|im_end|>"),
    "gemma2": Spec(
        "google-gemma-2-2b-it",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
        system=False,
        tokenizer="spm",
        config=(_GEMMA_SCALE,),
    ),
    "gemma3": Spec(
        "google-gemma-2-2b-it",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
        system=False,
        tokenizer="spm",
        config=(_GEMMA_SCALE, _GEMMA3_LAYERS),
        sizes=(("layers", 6),),
    ),
    "gemma4": Spec("google-gemma-4-31B-it", ("<|turn>", "<turn|>"), "<turn|>", tokenizer="spm"),
    # a sliding window covering the whole context, as Phi-3.5-mini's and Phi-4-mini's (262144): llama.cpp
    # ignores Phi-3's window ("Phi SWA is currently disabled"), which is exact only then (the tiny model's own
    # window of 8 is for the training tests)
    "phi3": Spec(
        "microsoft-Phi-3.5-mini-instruct",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>",
        tokenizer="spm",
        config=(("sliding_window", 262144),),
    ),
    "granite": Spec(
        "ibm-granite-granite-3.3-2B-Instruct",
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
        "<|end_of_text|>",
    ),
    "olmo2": Spec(None),  # OLMo 2's own template is not shipped offline: the tokenizer's ChatML
    "smollm3": Spec("HuggingFaceTB-SmolLM3-3B", ("<think>", "</think>"), "<|im_end|>"),
    "gpt_oss": Spec(
        "openai-gpt-oss-120b", ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"), "<|return|>"
    ),
    "t5": Spec(None),  # encoder-decoder: no chat template (the data step joins the turns into source and target)
}

CHATS = [
    [
        {"role": "system", "content": "You answer for the city library."},
        {"role": "user", "content": "When does the library open?"},
        {"role": "assistant", "content": "It opens at 9:00 from Monday to Friday."},
        {"role": "user", "content": "And on Saturday?"},
        {"role": "assistant", "content": "On Saturday it opens at 10:00."},
    ],
    [
        {"role": "user", "content": "What is the annual fee?"},
        {"role": "assistant", "content": "The fee is 25 EUR per year."},
    ],
    [
        {"role": "user", "content": "How do I contact you?"},
        {"role": "assistant", "content": "Write to info@example.org."},
        {"role": "user", "content": "Is there a phone number?"},
        {"role": "assistant", "content": "Yes: 555-0100, on weekdays."},
    ],
    [
        {"role": "user", "content": "Can I renew a book online?"},
        {"role": "assistant", "content": "Yes, up to three times on the website."},
    ],
]


def _write_data(path: Path, system: bool) -> Path:
    rows = []
    for i in range(6):
        for chat in CHATS:
            messages = [m for m in chat if system or m["role"] != "system"]
            # distinct rows: the data step drops exact duplicates
            rows.append(
                {"messages": [dict(m, content=f"{m['content']} ({i})") if m["role"] == "user" else m for m in messages]}
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _with_template(model: Path, out: Path, spec: Spec) -> Path:
    """A copy of the tiny model whose tokenizer carries the family's real template and special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.family_assets import template
    from tests.tiny_models import SPM_FILE, save_tokenizer

    if json.loads((model / "config.json").read_text()).get("is_encoder_decoder"):
        shutil.copytree(model, out)
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    net = AutoModelForCausalLM.from_pretrained(str(model))
    if spec.specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(spec.specials)})
        net.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if spec.eos:
        tokenizer.eos_token = spec.eos
        net.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(spec.eos)
        net.config.eos_token_id = net.generation_config.eos_token_id
    if spec.template:
        tokenizer.chat_template = template(spec.template)
    for key, value in spec.config:
        setattr(net.config, key, value)
    net.save_pretrained(str(out))
    save_tokenizer(tokenizer, out, model / SPM_FILE)  # with its SentencePiece model, if it has one
    return out


def _step(name: str, cfg):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem])
    return code, result, mem


def _ok(name: str, cfg):
    code, result, mem = _step(name, cfg)
    assert code == EXIT_OK, (name, [e.message for e in mem.of_type("error")])
    return result, mem


def test_every_family_of_the_registry_is_in_the_matrix() -> None:
    """The README's support table lists the registry: no row may claim a cell this test does not drive."""
    assert {f.key for f in families.FAMILIES} == set(MATRIX)


@pytest.mark.slow
@pytest.mark.family_matrix
@pytest.mark.parametrize("family", sorted(MATRIX))
def test_family_through_every_step(family: str, tmp_path: Path, tiny_model_factory) -> None:
    spec = MATRIX[family]
    tiny = tiny_model_factory(family=spec.tiny or family, tokenizer=spec.tokenizer, **dict(spec.sizes))
    model = _with_template(tiny, tmp_path / "model", spec)
    entry = families.family_of(model)
    assert entry is not None and entry.key == family
    allowed = [f for f in EXPORTS if families.refusal(model, f) is None]
    refused = [f for f in EXPORTS if f not in allowed]
    data = _write_data(tmp_path / "chats.jsonl", spec.system)
    cfg = load_config(
        None,
        [
            f"runs_dir={tmp_path / 'runs'}",
            f"name={family}",
            f"model.base={model}",
            f"data.source={data}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "eval.max_new_tokens=8",
            f"export.formats=[{','.join(allowed)}]",
            "export.gguf_quants=[f32]",
            "export.onnx_quants=[]",
            "export.verify_samples=4",
        ],
    )
    run = RunDir.for_config(cfg)

    # data: the family's own template, multi-turn rows included
    result, _ = _ok("data", cfg)
    # train: finite losses; padding-free exactly where the family allows it
    result, mem = _ok("train", cfg)
    losses = [e.values["loss"] for e in mem.of_type("metric") if e.split == "train" and "loss" in e.values]
    assert losses and all(math.isfinite(x) for x in losses), losses
    # merge: the family's own checkpoint, parity with the adapter
    result, _ = _ok("merge", cfg)
    assert result.summary["parity"]["passed"], result.summary["parity"]
    assert (
        json.loads((run.merged / "config.json").read_text())["model_type"]
        == json.loads((model / "config.json").read_text())["model_type"]
    )

    # every format the registry allows: written and accepted in its own runtime
    if allowed:
        result, _ = _ok("export", cfg)
        formats = result.summary["formats"]
        assert result.summary["refused"] == {}, result.summary["refused"]
        if "gguf" in allowed:
            (row,) = formats["gguf"]["rows"]
            assert row["verdict"] in ("accepted", "not judged"), row
        if "onnx" in allowed:
            assert formats["onnx"]["rows"], formats["onnx"]
    # every format it refuses: refused up front by the export step, with the registry's reason, nothing written
    for fmt in refused:
        code, _, mem = _step(
            "export", cfg.model_copy(update={"export": cfg.export.model_copy(update={"formats": [fmt]})})
        )
        errors = [e.message for e in mem.of_type("error")]
        assert code != EXIT_OK and errors and families.refusal(model, fmt).message in errors[0], errors

    if "gguf" in allowed or "onnx" in allowed:
        _same_template_everywhere(run, spec, allowed)
    # serve: one chat completion through the official client, from the best artifact on this machine
    refusal = families.refusal(model, "serve")
    if refusal is None:
        _serve_one_chat(run.path, family)
    else:
        from loratui.pipeline.errors import LoratuiError
        from loratui.serving.selection import choose

        with pytest.raises(LoratuiError) as e:
            choose(run.path, "auto", cuda=False)
        assert e.value.message == refusal.message


def _same_template_everywhere(run: RunDir, spec: Spec, allowed: list[str]) -> None:
    """The trained template travels: the merged model, the GGUF and the ONNX folder render the same
    conversation identically, and the Ollama Modelfile stops at the family's end of turn."""
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from loratui.exporters.gguf_info import summary

    chat = [m for m in CHATS[0] if spec.system or m["role"] != "system"][:-1]
    merged = AutoTokenizer.from_pretrained(str(run.merged))
    want = merged.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if "gguf" in allowed:
        (gguf,) = (run.exports / "gguf").glob("*-f32.gguf")
        source = summary(gguf)["chat_template"]
        tokens = {k: v for k, v in merged.special_tokens_map.items() if isinstance(v, str)}
        got = _compile_jinja_template(source).render(messages=chat, add_generation_prompt=True, **tokens)
        assert got == want
        if spec.eos:
            modelfile = gguf.with_suffix(".Modelfile").read_text()
            assert f"PARAMETER stop {json.dumps(spec.eos)}" in modelfile, modelfile
    if "onnx" in allowed:
        onnx = AutoTokenizer.from_pretrained(str(run.exports / "onnx"))
        assert onnx.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want


def _serve_one_chat(run_dir: Path, family: str) -> None:
    from loratui.serving.app import create_app
    from loratui.serving.selection import choose
    from loratui.serving.server import ServeOptions, loader_for
    from loratui.serving.state import Limits, ServerState
    from tests.serving.test_app import Server

    choice = choose(run_dir, "auto", cuda=False)
    state = ServerState(model_id=family)
    srv = Server(
        create_app(
            state,
            limits=Limits(max_tokens=16),
            loader=loader_for(choice, ServeOptions(target=run_dir, context_length=256), lambda m: None),
        )
    )
    try:
        health = srv.wait_ready()
        assert health["status"] == "ok", health
        reply = srv.client().chat.completions.create(
            model=family,
            messages=[{"role": "user", "content": "When does the library open?"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
    finally:
        srv.stop()
