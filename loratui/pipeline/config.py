"""The one run configuration: a pydantic schema shared by the CLI, the TUI and CI.

A config is YAML with the sections below plus dotted overrides from the command line
(``train.lr=1e-4 lora.r=32``). Every field has a type, a default and a description; the TUI
builds its forms from the descriptions and the README's config reference is generated from them.

Fields that accept ``"auto"`` are resolved from the data before a step starts and the resolved
values are written back into the run's ``config.yaml``, so a run is reproducible from that file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from loratui.pipeline.data.problems import PROBLEMS, TRUNCATABLE, Policy, ProblemKind
from loratui.pipeline.errors import LoratuiError

Auto = Literal["auto"]


def _positive_or_auto(message: str) -> Callable[[Any], Any]:
    """A field validator for ``int | auto`` fields: an integer must be positive."""

    def check(v: Any) -> Any:
        if isinstance(v, int) and v <= 0:
            raise ValueError(message)
        return v

    return check


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (typos must not be ignored silently)."""

    # extra="forbid": typos are errors. coerce_numbers_to_str: `name: 2024` or `revision: 1234567`
    # are read by YAML as numbers but mean text.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )


class ModelSection(Section):
    """Which base model to fine-tune and how to load it."""

    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a built-in name (`loratui models list`), a local Hugging Face "
        "directory, a `.gguf` file (imported once into a cached HF directory), or a hub id such as "
        "`HuggingFaceTB/SmolLM2-135M-Instruct` (needs the network unless already in the HF cache).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype when loading. `auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the checkpoint to run. Leave off unless you trust it."
    )


# Methods of ``data.augment`` (loratui.pipeline.data.augment.METHODS has their code).
AUGMENT_METHODS: tuple[str, ...] = ("template", "paraphrase")

# One example: the embedded 135M model answers a bare instruction to reword far more often than it rewords.
PARAPHRASE_PROMPT = (
    "Rewrite the question in other words. Keep its meaning and every name and number. Do not answer it.\n\n"
    "Question: When does the museum open on Saturdays?\nRewritten: What time does the museum open on a Saturday?\n\n"
    "Question: {question}\nRewritten:"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ParaphraseSection(Section):
    """``data.augment.paraphrase``: the model that rewrites the questions, its prompt and its sampling."""

    model: str | None = Field(
        None,
        description="Rewriting model, any reference `model.base` accepts (a built-in name, a local Hugging Face "
        "directory, a hub id) or a `.gguf` file (run in llama.cpp). Empty: the run's base model.",
    )
    endpoint: str | None = Field(
        None,
        description="Instead of a local model: the base URL of an OpenAI-compatible server, e.g. "
        "`http://127.0.0.1:8000/v1` (`loratui serve`, vLLM, llama.cpp's server, Ollama, a hosted API).",
    )
    endpoint_model: str | None = Field(
        None, description="The model id to ask the endpoint for. Empty: the first model its /models lists."
    )
    api_key_env: str | None = Field(
        None,
        description="The NAME of the environment variable that holds the endpoint's API key (the key itself never "
        "goes into the config). Empty: no key (a local server).",
    )
    prompt: str = Field(
        PARAPHRASE_PROMPT,
        description="The instruction sent as the user message; `{question}` is replaced by the user turn to vary.",
    )
    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature (0: greedy, one variation).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: the top tokens holding this probability.")
    max_tokens: int = Field(48, ge=8, le=1024, description="Most tokens generated per paraphrase.")
    tries: int = Field(
        3,
        ge=1,
        le=10,
        description="Attempts per wanted variation: a row whose outputs were dropped is asked again for the "
        "missing ones, at most this many rounds.",
    )
    min_similarity: float = Field(
        0.5,
        ge=0,
        le=1,
        description="`off` filter: the share of the question's content words (not stopwords; a word counts as "
        "kept when the output holds it or a word with the same first 5 letters) a paraphrase must keep; it must "
        "keep every number and name in any case.",
    )
    runtime: Literal["auto", "torch", "llama.cpp"] = Field(
        "auto",
        description="How a local model runs: `auto` (llama.cpp for a `.gguf` file or a built-in, which ships as "
        "one; PyTorch otherwise), "
        "`torch` (transformers, batched), `llama.cpp` (a `.gguf` file or a built-in's own GGUF).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_the_config(cls, v: Any) -> Any:
        if isinstance(v, dict) and any(k in v for k in ("api_key", "key", "token")):
            raise ValueError(
                "an API key does not belong in the config file: put it in an environment variable and give that "
                "variable's name as api_key_env (e.g. api_key_env: OPENAI_API_KEY)"
            )
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError(
                "api_key_env is the NAME of an environment variable holding the key (letters, digits, _), not the "
                "key itself: export the key, e.g. MY_API_KEY=..., and write api_key_env: MY_API_KEY"
            )
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+", v):
            raise ValueError("expected the base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_has_question(cls, v: str) -> str:
        try:
            filled = v.format(question="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"the prompt may hold only the placeholder {{question}} (write {{{{ and }}}} for braces): {e}"
            ) from None
        if "\0" not in filled:
            raise ValueError("the prompt must hold {question}, where the user turn to vary goes")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ParaphraseSection:
        if self.endpoint and self.model:
            raise ValueError("give either model (a local rewriting model) or endpoint (a server), not both")
        if not self.endpoint and (self.endpoint_model or self.api_key_env):
            raise ValueError("endpoint_model and api_key_env apply to an endpoint: set endpoint too")
        return self


class AugmentSection(Section):
    """``data.augment``: variations of each training row's user turn, the reply kept (off when empty)."""

    methods: list[str] = Field(
        default_factory=lambda: ["template"],
        description="How variations are made: `template` (seeded rewrites that need no model: politeness "
        "prefixes, word order of short questions, casing and punctuation, keyboard-neighbour typos), "
        "`paraphrase` (a model rewrites the question: see `paraphrase`). Both may be listed.",
    )
    variations: int = Field(2, ge=1, le=10, description="Variations per training row (and method).")
    seed: int = Field(0, description="Seed of the rewrites: the same seed and rows give the same variations.")
    typo_rate: float = Field(
        0.02,
        ge=0,
        le=0.2,
        description="`template`: chance per letter of a keyboard-neighbour typo, in lower-case words of 4+ "
        "letters only (never in numbers, capitalized names or code-like words).",
    )
    max_overlap: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Leakage filter: a variation that holds more than this share of a validation or test "
        "question's words and pairs of neighbouring words (lower-cased, without punctuation) is dropped and "
        "listed; one that normalizes to a held-out question always is. At 0.7, one word changed in a question of "
        "six words or more is caught.",
    )
    paraphrase: ParaphraseSection = Field(
        default_factory=ParaphraseSection,
        description="`paraphrase`: the rewriting model (`model`, or `endpoint` with `endpoint_model` and "
        "`api_key_env`), `prompt`, `temperature`, `top_p`, `max_tokens`, `tries`, `min_similarity`, `runtime`.",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in AUGMENT_METHODS]
        if unknown:
            raise ValueError(
                f"unknown augmentation method {', '.join(repr(m) for m in unknown)}; "
                f"known: {', '.join(AUGMENT_METHODS)}"
            )
        if len(set(v)) != len(v):
            raise ValueError("each method may be named once")
        return v


class DataSection(Section):
    """Where the training data comes from and how it becomes examples."""

    source: str | list[str] = Field(
        "quickstart",
        description="Training data: a bundled dataset name (`quickstart`, `quickstart-more`, `preference`), a JSON, "
        "JSONL, CSV or Parquet file, a glob, a list of those, or a folder of .txt/.md documents.",
    )
    format: Literal[
        "auto", "alpaca", "qa", "chat", "sharegpt", "text", "preference", "openai_preference", "unpaired_preference"
    ] = Field(
        "auto",
        description="Row format. `auto` detects it from the columns and reports why. Preference formats (for "
        "`train.objective` dpo, orpo, kto): `preference` (`prompt`, `chosen`, `rejected`: text or messages), "
        "`openai_preference` (OpenAI's `input.messages`, `preferred_output`, `non_preferred_output`), "
        "`unpaired_preference` (KTO's `prompt`, `completion`, `label` true/false).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping from the format's field names to yours, e.g. "
        "`{instruction: prompt, output: answer}`.",
    )
    template: Literal["auto", "alpaca", "chatml", "llama2", "phi"] = Field(
        "auto",
        description="Prompt template. `auto` uses the tokenizer's chat template and falls back to "
        "`chatml` when the model has none. Use the same template at inference.",
    )
    system_prompt: str | None = Field(None, description="System message added to every example.")
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompt tokens. Default: loss only on assistant turns. Does not apply to "
        "preference rows (only their final reply is trained).",
    )
    max_length: int | Auto = Field(
        "auto",
        description="Maximum tokens per example. `auto`: the longest example rounded up to a multiple of "
        "64, capped by the model's context (and 4096).",
    )
    on_problem: dict[ProblemKind, Policy] = Field(
        default_factory=dict,
        description="Policy per problem kind: `drop` (default; the row is listed in the report), `fail` "
        "(stop with an error), or `truncate` (only for `too_long`, its default). Kinds: "
        + ", ".join(f"`{k}`" for k in PROBLEMS)
        + ".",
    )
    dedupe: bool = Field(
        True,
        description="Drop exact duplicate rows. Validation/test rows that are also in training are always dropped.",
    )
    val_ratio: float = Field(0.1, ge=0, lt=1, description="Share of rows held out for validation.")
    test_ratio: float = Field(0.1, ge=0, lt=1, description="Share of rows held out for the final test.")
    val_source: str | None = Field(None, description="Separate validation file (instead of `val_ratio`).")
    test_source: str | None = Field(None, description="Separate test file (instead of `test_ratio`).")
    chunk_tokens: int = Field(512, gt=0, description="Chunk size in tokens for folders of documents.")
    chunk_overlap: int = Field(64, ge=0, description="Overlap in tokens between consecutive document chunks.")
    seed: int = Field(42, description="Seed for shuffling and splitting.")
    preview_examples: int = Field(3, ge=0, description="Examples rendered in `data/preview.txt`.")
    augment: AugmentSection | None = Field(
        None,
        description="Data augmentation, off when empty (`{}` turns it on with the defaults): N variations of "
        "each training row's user turn (reply unchanged), made after the split from training rows only. Keys: "
        "`methods` (`[template]`; also `paraphrase`), `variations` (2 per row, at most 10), `seed` (0), `typo_rate` (0.02, at most "
        "0.2), `max_overlap` (0.7: a variation holding more of a validation/test question's words and word pairs "
        "is dropped, as is one equal to it after normalization), `paraphrase` (the `paraphrase` method's model or "
        "endpoint, prompt, sampling, tries and `min_similarity`). E.g. `{methods: [template], variations: 2}` or "
        "`{methods: [paraphrase], paraphrase: {endpoint: 'http://127.0.0.1:8000/v1', api_key_env: MY_KEY}}`.",
    )

    @field_validator("on_problem")
    @classmethod
    def _truncate_only_too_long(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k, policy in v.items() if policy == "truncate" and k not in TRUNCATABLE]
        if bad:
            raise ValueError(f"'truncate' only applies to too_long, not to {', '.join(bad)}")
        return v

    _positive_length = field_validator("max_length")(_positive_or_auto("must be a positive number of tokens or 'auto'"))

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_is_a_mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (dict, AugmentSection)):
            raise ValueError("expected a mapping such as {methods: [template], variations: 2}, or empty (off)")
        return v


class LoraSection(Section):
    """The adapter: method, rank and which modules it wraps (peft conventions)."""

    method: Literal["lora", "qlora", "dora"] = Field(
        "lora",
        description="`lora`: low-rank adapters on a full-precision base. `qlora`: the base is loaded "
        "in 4-bit NF4 (bitsandbytes) to save memory. `dora`: weight-decomposed LoRA (slower, often "
        "better at low rank).",
    )
    r: int | Auto = Field(
        16, description="Adapter rank. Higher learns more and costs more memory. `auto` picks from the data size."
    )
    alpha: int | Auto = Field(
        "auto", description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA). `auto`: 2 x r."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter input. 0 (as in Unsloth and LLaMA-Factory) skips a random mask "
        "per adapted layer, about 15% of a CPU training step.",
    )
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        "all-linear",
        description="Modules to adapt: `all-linear` (every attention and MLP projection and MoE experts, not "
        "the output head or a vision tower), `attention` (the query and value projections, `q_proj, v_proj`, "
        "the original LoRA recipe; `qkv_proj` where the family fuses them), `mlp` (the MLP projections or "
        "experts) or a list of module names. The README's family table lists each family's names.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. `lm_head` for new tokens).",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type for `qlora`.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (`qlora`).")
    init_from: str | None = Field(
        None,
        description="Adapter directory that `train.mode: continue` or `stack` starts from "
        "(empty: this run's current adapter).",
    )

    _positive_rank = field_validator("r", "alpha")(_positive_or_auto("must be a positive integer or 'auto'"))


class TrainSection(Section):
    """Optimization: how long, how fast, on what device."""

    mode: Literal["fresh", "continue", "stack"] = Field(
        "fresh",
        description="`fresh`: a new adapter on the base model. `continue`: keep training the current adapter "
        "(or `lora.init_from`) on this data. `stack`: merge the current adapter into the base, then train a "
        "new adapter on top (continual learning, one version after another).",
    )
    objective: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="What training optimizes. `sft`: supervised, the replies' likelihood (on preference data: "
        "the chosen replies). `dpo`: Direct Preference Optimization on chosen/rejected pairs, against a frozen "
        "reference (the model without this adapter: the base, or base + earlier adapters with `mode: stack`); "
        "the usual second stage after `sft`. `orpo`: odds-ratio preference plus SFT in one stage, no reference "
        "model (from a base that was not tuned yet). `kto`: unpaired data, each reply marked good or bad "
        "(thumbs up/down logs), against the same reference as `dpo`.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="Preference strength. `dpo`/`kto`: how far the model may move from the reference "
        "(lower: further; 0.1 is the usual start). `orpo`: the weight of the odds-ratio term against the "
        "SFT loss (λ in the paper).",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="`dpo`: add this times the chosen replies' negative log-likelihood to the loss (RPO), which "
        "keeps the chosen replies likely while the margin grows; 0 is plain DPO.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="`kto`: weight of the good (label true) replies' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="`kto`: weight of the bad (label false) replies' loss.")
    epochs: float | Auto = Field("auto", description="Passes over the training set. `auto` picks from the data size.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int | Auto = Field(
        "auto", description="Examples per micro-batch (per process). `auto` fits it to the token lengths."
    )
    grad_accum: int | Auto = Field(
        "auto", description="Micro-batches per optimizer step. `auto` keeps the effective batch at `effective_batch`."
    )
    effective_batch: int = Field(
        16, ge=1, description="Examples per optimizer step that `auto` keeps (batch_size x grad_accum x processes)."
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps used for LR warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field(
        "adamw_torch", description="Optimizer (transformers names; 8-bit ones use bitsandbytes)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Compute precision. `auto`: bf16 on GPUs that run it natively, fp16 on older GPUs, "
        "bf16 on Apple MPS from macOS 14 (else fp32), fp32 on CPU (bf16 on an AVX512-BF16 CPU was 17% "
        "faster but answered fewer quickstart questions).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (about 30% slower).")
    padding_free: bool = Field(
        True,
        description="Concatenate each micro-batch into one sequence with attention kept inside each "
        "example: no padding, and logits only where a token is trained. Falls back to padded batches for "
        "models that cannot (seq2seq, remote code).",
    )
    share_prefix: bool = Field(
        True,
        description="With `padding_free`: compute a prompt prefix that every example of a micro-batch "
        "shares (such as a default system prompt) once per micro-batch. Exact: same loss and gradients.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto",
        description="Where to train, evaluate and serve with PyTorch. `auto`: a CUDA GPU, else Apple MPS, else "
        "the CPU (the reason is logged). On `mps`: precision `auto` is bf16 from macOS 14 (else fp32); QLoRA, "
        "8-bit optimizers and `nproc` > 1 are refused; `PYTORCH_ENABLE_MPS_FALLBACK=1` lets operators MPS lacks "
        "run on the CPU. `cuda` or `mps` where it is missing is an error.",
    )
    nproc: int = Field(
        1, ge=1, description="Processes for data-parallel training (DDP through accelerate; gloo on CPU)."
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="Multi-process strategy when `nproc` > 1 or `nodes` > 1: DDP, FSDP, or DeepSpeed ZeRO "
        "(`zero_stage`, through accelerate's DeepSpeed plugin; CUDA only).",
    )
    zero_stage: Literal[2, 3] = Field(2, description="With `distributed: deepspeed`: ZeRO stage 2 or 3.")
    nodes: int | None = Field(
        None,
        ge=1,
        description="Machines taking part in training, `nproc` processes each (empty: from the environment "
        "torchrun or SLURM set, else 1). Every node runs the same command on a run folder they share.",
    )
    node_rank: int | None = Field(
        None, ge=0, description="This machine's rank among `nodes` (empty: from `NODE_RANK` or `SLURM_NODEID`)."
    )
    main_address: str | None = Field(
        None, description="Address of the rank-0 node (empty: from `MASTER_ADDR`, or the first SLURM node)."
    )
    main_port: int | None = Field(
        None, ge=1, le=65535, description="Port on the rank-0 node (empty: from `MASTER_PORT`, else 29500)."
    )
    eval_every: int = Field(0, ge=0, description="Validate every N steps (0: once per epoch).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: once per epoch).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the oldest are deleted; the best is kept).")
    logging_every: int = Field(1, ge=1, description="Report loss, learning rate and speed every N steps.")
    early_stopping_patience: int | None = Field(
        None, description="Stop after this many validations without improvement (empty: never)."
    )
    keep_best: bool = Field(
        True, description="With validation data: the adapter written at the end is the one with the lowest eval loss."
    )
    oom_fallback: bool = Field(
        True,
        description="On CUDA out-of-memory: halve the micro-batch, double accumulation, resume from the "
        "last checkpoint.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers (off by default); tensorboard logs go to the run."
    )
    resume: bool | str = Field(
        False, description="Resume from the latest checkpoint (`true`) or from a checkpoint path."
    )
    seed: int = Field(42, description="Seed for initialization and data order.")


ExportFormat = Literal["safetensors", "gguf", "gguf-lora", "onnx"]
EvalMetric = Literal[
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "bleu",
    "exact_match",
    "token_f1",
    "contains",
    "loss",
    "perplexity",
    "preference_accuracy",
    "reward_margin",
]
EVAL_METRICS: tuple[EvalMetric, ...] = get_args(EvalMetric)


class EvalSection(Section):
    """How the tuned model is scored against the base model."""

    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(EVAL_METRICS),
        min_length=1,
        description="Metrics to compute. Generation metrics (rouge*, bleu, exact_match, token_f1, contains) "
        "compare greedy replies with the references; loss and perplexity score the references' tokens. "
        "preference_accuracy and reward_margin score preference data: how often, and by how many nats, the "
        "model's log-probability of the chosen reply is above the rejected one's (PyTorch targets only; for "
        "unpaired data, the tuned-vs-base log-ratio against the good/bad label).",
    )
    split: Literal["test", "validation"] = Field(
        "test", description="Split to score (the validation split is used when the data has no test split)."
    )
    model: str | None = Field(
        None,
        description="What to score: empty for the run's current adapter; or an adapter folder, or a "
        "merged model directory.",
    )
    compare_base: bool = Field(True, description="Also score the base model, for a before/after table.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per test prompt (greedy decoding).")
    max_samples: int | None = Field(None, gt=0, description="Score at most this many rows per dataset (empty: all).")
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left-padded, with a KV cache).")
    fact_field: str = Field(
        "fact",
        description="Field of a data row that holds the key fact its reply must contain (the `contains` "
        "metric); rows without it use the whole reference.",
    )
    comparison_examples: int = Field(
        10, ge=0, description="Rows shown side by side in comparison.md: half the worst, half the best."
    )
    retention: bool = Field(
        True,
        description="After continue/stack training, also score every earlier dataset in the run's "
        "adapter history, to show what the model still knows.",
    )
    retention_sources: list[str] = Field(
        default_factory=list,
        description="More datasets to re-score (files or folders), to measure forgetting.",
    )


class MergeSection(Section):
    """Folding the adapter into the base weights."""

    adapter: str | None = Field(
        None,
        description="Adapter folder to merge (empty: the run's current adapter). Adapters it was stacked "
        "on (its loratui.json) are merged first, in order.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the merged weights. `auto` keeps the base model's dtype (also after QLoRA: "
        "the merge always goes into the unquantized base).",
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    parity: bool = Field(
        True,
        description="Compare the logits of base + adapter with those of the written merged model; the "
        "step fails when they differ by more than `parity_tolerance`.",
    )
    parity_prompts: int = Field(8, ge=1, description="Examples (from the run's test data) the parity check runs.")
    parity_tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest allowed absolute logit difference (empty: by dtype, a share of the "
        "largest logit: float32 1e-5 (never below 1e-4), float16 0.02, bfloat16 0.1).",
    )


class ExportSection(Section):
    """Formats written from the merged model; each is verified in its own runtime."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["safetensors", "gguf"]),
        description="Formats to export. `gguf-lora`: the adapter as a llama.cpp LoRA GGUF (`--lora`) plus its base GGUF.",
    )
    gguf_quants: list[str] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        description="llama.cpp types: `f32`, `f16`, `bf16`, `q8_0` straight from the converter; `q4_k_m`, "
        "`q5_k_m`, `q6_k`, `q4_0`, `q5_0`, `iq4_nl` ... quantized from an f16 intermediate.",
    )
    gguf_keep_f16: bool = Field(False, description="Keep the f16 intermediate GGUF that quantized types are made from.")
    verify_samples: int = Field(32, ge=1, description="Rows of the test data each export is checked on.")
    gguf_lora_type: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="Type of the `gguf-lora` adapter and of the base GGUF written with it."
    )
    ollama_modelfile: bool = Field(True, description="Write an Ollama Modelfile next to the GGUF.")
    onnx_quants: list[Literal["int4", "int8"]] = Field(
        default_factory=list,
        description="Quantized ONNX models to write beside fp32, each in `exports/onnx-<type>/`: weight-only, "
        "block-wise (MatMulNBits, blocks of 32), for fast CPU decoding. Each is verified like fp32 and refused "
        "(its figures stay in the report) below 97% top-1 agreement with the merged model.",
    )
    verify: bool = Field(True, description="Load every export in its runtime and compare it with the merged model.")


# serve.backend's runtime names -> the --format names of `loratui serve` and `generate`.
BACKEND_FORMAT: dict[str, str] = {"llama.cpp": "gguf", "onnxruntime": "onnx"}


class ServeSection(Section):
    """The OpenAI-compatible server."""

    host: str = Field("127.0.0.1", description="Address to listen on (`0.0.0.0` inside containers).")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    backend: Literal["auto", "torch", "llama.cpp", "onnxruntime"] = Field(
        "auto", description="Inference runtime. `auto`: PyTorch on CUDA, else GGUF via llama.cpp, else ONNX."
    )
    artifact: str | None = Field(
        None,
        description="What to serve: a merged directory, a .gguf file or an ONNX directory (empty: the run's best).",
    )
    model_name: str | None = Field(None, description="Model id clients send (empty: the run name).")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer <key>` when set.")
    max_batch_size: int = Field(8, ge=1, description="Requests batched together on backends that batch.")
    max_queue: int = Field(64, ge=1, description="Requests running or waiting at once; more are answered 429.")
    max_tokens: int = Field(2048, ge=1, description="The largest `max_tokens` a request may ask for.")
    context_length: int = Field(2048, gt=0, description="Context window (prompt + completion) in tokens.")
    threads: int | None = Field(None, description="CPU threads (empty: all cores).")
    fine_tuning: bool = Field(
        True, description="Also serve OpenAI's files and fine-tuning jobs API (`/v1/files`, `/v1/fine_tuning/jobs`)."
    )
    jobs_dir: str | None = Field(
        None, description="Where uploaded files and job records live (empty: `<runs_dir>/.fine_tuning`)."
    )
    max_upload_mb: int = Field(512, ge=1, description="Largest file `POST /v1/files` accepts, in MiB.")
    job_slots: int | Auto = Field(
        "auto",
        description="Fine-tuning jobs that run at once; the rest wait in a queue. `auto`: one per CUDA GPU, else one.",
    )
    max_loaded_models: int = Field(
        2, ge=1, description="Fine-tuned models kept loaded for chat at once (the least recently used is unloaded)."
    )
    engine: Literal["loratui", "vllm"] = Field(
        "loratui",
        description="What generates: loratui's own backends (`backend`), or vLLM's OpenAI server started behind "
        "loratui's API (the merged model, or the base with the run's adapters as vLLM LoRA modules).",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Extra arguments for `vllm serve`, passed as they are (e.g. `--tensor-parallel-size 8`).",
    )
    vllm_python: str | None = Field(
        None,
        description="Python of the environment vLLM is installed in (empty: `LORATUI_VLLM_PYTHON`, this "
        "environment if it has vLLM, else `.venv-vllm` beside it, as `make vllm` makes).",
    )
    vllm_url: str | None = Field(
        None,
        description="Use a vLLM server that is already running (e.g. a multi-node Ray cluster) at this URL "
        "instead of starting one.",
    )
    ui: bool | Auto = Field(
        "auto",
        description="Serve the chat page at `/` (try, compare and share the model in a browser). `auto`: on when "
        "`host` is a loopback address; `true` serves it on any address (the page asks for the API key).",
    )
    compare_base: bool = Field(
        True,
        description="Serving a run: also serve its base model, loaded on first use, as the model id "
        "`model.base` names (base vs tuned on the chat page and for any client).",
    )


class RunConfig(Section):
    """A whole run: one YAML file drives data, train, eval, merge, export and serve."""

    name: str = Field("quickstart", description="Run name: artifacts go to `<runs_dir>/<name>/`.")
    runs_dir: str = Field("runs", description="Folder that holds run directories.")
    model: ModelSection = Field(default_factory=ModelSection, description=ModelSection.__doc__)
    data: DataSection = Field(default_factory=DataSection, description=DataSection.__doc__)
    lora: LoraSection = Field(default_factory=LoraSection, description=LoraSection.__doc__)
    train: TrainSection = Field(default_factory=TrainSection, description=TrainSection.__doc__)
    eval: EvalSection = Field(default_factory=EvalSection, description=EvalSection.__doc__)
    merge: MergeSection = Field(default_factory=MergeSection, description=MergeSection.__doc__)
    export: ExportSection = Field(default_factory=ExportSection, description=ExportSection.__doc__)
    serve: ServeSection = Field(default_factory=ServeSection, description=ServeSection.__doc__)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or v in {".", ".."} or "/" in v or "\\" in v:
            raise ValueError("must be a plain folder name (no slashes)")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))


SECTIONS: tuple[str, ...] = ("model", "data", "lora", "train", "eval", "merge", "export", "serve")


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where it is, what it was, what is allowed."""

    source: str  # file name, or "override 'train.lr=abc'"
    field: str  # dotted path, e.g. "train.lr"
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.field or '(top level)'}: {self.message}"


class ConfigError(LoratuiError):
    """A config that cannot be used; carries one problem per mistake."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def dump_yaml(data: Any) -> str:
    text: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    return text


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [ConfigProblem(f"override {text!r}", key, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take the text as a string and let the schema judge it
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Set dotted overrides in ``data`` in place; return {dotted key: "override 'k=v'"} for messages."""
    origin: dict[str, str] = {}
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        origin[".".join(path)] = f"override {text!r}"
    return origin


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    sub = path + (str(key.value),)
                    index[sub] = key.start_mark.line + 1
                    walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = path + (str(i),)
                index[sub] = item.start_mark.line + 1
                walk(item, sub)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


_TYPE_ERRORS = (
    "literal_error",
    "int_parsing",
    "int_type",
    "int_from_float",
    "float_parsing",
    "float_type",
    "bool_parsing",
    "bool_type",
    "string_type",
    "list_type",
    "dict_type",
    "model_type",
)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"int", "float", "str", "bool"})


# Settings an earlier release had, and what took their place: a config that still names one is told why.
RETIRED = {
    "export.onnx_int8": "use export.onnx_quants: [int8] (or int4): quantized ONNX models are now weight-only and "
    "block-wise (dynamic int8 kept only 84.7% top-1 agreement on SmolLM2)",
    "export.onnx_opset": "the ONNX export is now written by onnxruntime-genai's model builder, which picks the "
    "opset its fused kernels need; remove the line",
}


def _friendly(err: ErrorDetails, expected: str) -> str:
    """One line for one pydantic error: the value given and what is allowed."""
    kind = err["type"]
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        if ".".join(loc) in RETIRED:
            return f"no longer a setting: {RETIRED['.'.join(loc)]}"
        allowed = list(getattr(_annotation_at(loc[:-1]), "model_fields", None) or [])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listing = f" Allowed here: {', '.join(allowed)}." if allowed else ""
        return f"unknown field{hint}{listing}"
    if kind in _TYPE_ERRORS and expected:
        return f"got {shown}; expected {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"got {shown}; {msg[0].lower() + msg[1:]}"


def _problems_from_validation(
    exc: ValidationError, source: str, lines: dict[tuple[str, ...], int], origin: dict[str, str]
) -> list[ConfigProblem]:
    # A Union field reports one error per member, with the member's tag in the location
    # ('int', "literal['auto']", 'list[str]'). Group the errors by the location before the first tag
    # and keep the deepest one: the member whose shape matched says the most (e.g. which list item).
    best: dict[tuple[str, ...], tuple[list[str], ErrorDetails]] = {}
    for err in exc.errors():
        raw = list(err["loc"])
        tags = [i for i, part in enumerate(raw) if _is_union_tag(part)]
        loc = [str(part) for i, part in enumerate(raw) if i not in tags]
        key = tuple(str(part) for part in raw[: tags[0]]) if tags else tuple(loc)
        if key not in best or len(loc) > len(best[key][0]):
            best[key] = (loc, err)
    problems: list[ConfigProblem] = []
    for loc, err in best.values():
        dotted = ".".join(loc)
        annotation = _annotation_at(loc)
        expected = describe_type(annotation) if annotation is not None else ""
        src, line = source, lines.get(tuple(loc))
        for field, override in origin.items():
            if dotted == field or dotted.startswith(field + "."):
                src, line = override, None
        problems.append(ConfigProblem(src, dotted, _friendly(err, expected), line))
    problems.sort(key=lambda p: (p.source, p.line or 0))
    return problems


def _annotation_at(loc: list[str]) -> Any:
    """The type expected at a location (a field, or an item of a list field); None if unknown."""
    import typing

    current: Any = RunConfig
    for part in loc:
        if part.isdigit():  # a list item: the list's item type (also inside Union[..., list[X]])
            candidates = [current, *typing.get_args(current)]
            lists = [c for c in candidates if typing.get_origin(c) is list]
            if not lists:
                return None
            current = typing.get_args(lists[0])[0]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        current = fields[part].annotation
    return current


_PLAIN_WORDS: dict[type, str] = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def describe_type(annotation: Any, markdown: bool = False) -> str:
    """Words for what a field accepts: for error messages, or (``markdown``) for the reference table."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _describe_literal(args, markdown)
    if origin in (Union, types.UnionType):
        return _describe_union(args, markdown)
    if origin is list:
        inner = describe_type(args[0], markdown) if args else ""
        return f"list[{inner}]" if markdown else f"a list of {inner or 'values'}"
    if origin is dict:
        return "mapping" if markdown else "a mapping"
    if markdown:
        return str(getattr(annotation, "__name__", annotation))
    return _PLAIN_WORDS.get(annotation, "")


def _describe_literal(values: tuple[Any, ...], markdown: bool) -> str:
    if markdown:
        return " \\| ".join(f"`{a}`" for a in values)
    return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(repr(a) for a in values)


def _describe_union(members: tuple[Any, ...], markdown: bool) -> str:
    parts = [describe_type(a, markdown) for a in members if a is not type(None)]
    if markdown:
        return " \\| ".join(parts + (["null"] if type(None) in members else []))
    return " or ".join(p for p in parts if p) + (" or empty" if type(None) in members else "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    Raises ConfigError listing every problem with file, line, field, value and what is allowed.
    """
    overrides = overrides or []
    source = str(path) if path is not None else "(defaults)"
    text = ""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([ConfigProblem(source, "", "file not found" if not p.exists() else "not a file")])
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError([ConfigProblem(source, "", f"not UTF-8 text (byte {e.start})")]) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError([ConfigProblem(source, "", f"invalid YAML: {problem}", line)]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                [
                    ConfigProblem(
                        source, "", f"expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}"
                    )
                ]
            )
    origin = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems_from_validation(exc, source, _line_index(text), origin)) from None


# --------------------------------------------------------------------------------------------
# Local files a config names (``loratui config validate``)
# --------------------------------------------------------------------------------------------

# Fields that name data: a file, a glob, a folder or a bundled dataset name (as the data step reads them).
DATA_PATH_FIELDS: tuple[str, ...] = ("data.source", "data.val_source", "data.test_source", "eval.retention_sources")
# Fields that name one artifact (an adapter, a model directory, a file). One inside the config's own run
# directory may be made by the run itself, so it need not exist yet.
ARTIFACT_PATH_FIELDS: tuple[str, ...] = ("lora.init_from", "eval.model", "merge.adapter", "serve.artifact")


def check_local_paths(
    cfg: RunConfig, path: str | Path | None = None, overrides: list[str] | None = None
) -> list[ConfigProblem]:
    """One problem per local file or folder that ``cfg`` names and that is not there.

    Checked: ``model.base`` when it is neither a built-in name nor a hub id, the data fields (reading them
    as the data step does: bundled names, globs, folders with data files, files) and the artifact fields.
    Relative paths resolve against the working directory, as every step resolves them, not against the
    config file's folder; a path that is there relative to the config file's folder says so.
    """
    missing = _MissingPaths(path, overrides or [])
    _check_base(cfg, missing)
    _check_data_paths(cfg, missing)
    _check_artifact_paths(cfg, missing)
    return missing.problems


class _MissingPaths:
    """The problems found so far, each placed where the user wrote the path: a line of the config file, or
    the override that set it."""

    def __init__(self, path: str | Path | None, overrides: list[str]) -> None:
        self.cwd = Path.cwd().resolve()
        self.config_dir = Path(path).resolve().parent if path is not None else None
        text = Path(path).read_text(encoding="utf-8") if path is not None and Path(path).is_file() else ""
        self.lines = _line_index(text)
        self.source = str(path) if path is not None else "(defaults)"
        self.overrides = {o.partition("=")[0].strip(): o for o in overrides}
        self.problems: list[ConfigProblem] = []

    def _there_from_config(self, value: str) -> bool:
        import glob

        if self.config_dir is None or self.config_dir == self.cwd or Path(value).expanduser().is_absolute():
            return False
        if any(ch in value for ch in "*?["):
            return bool(glob.glob(str(self.config_dir / value), recursive=True))
        return (self.config_dir / value).exists()

    def report(self, field: str, loc: tuple[str, ...], value: str, what: str) -> None:
        message = f"{value!r}: {what}"
        if not Path(value).expanduser().is_absolute():
            message += f" (resolved against the working directory {self.cwd})"
            if self._there_from_config(value):
                message += (
                    f"; it is there relative to the config file ({self.config_dir}), but relative paths "
                    f"resolve against the working directory; run from {self.config_dir} or use an absolute path"
                )
        by = [o for k, o in self.overrides.items() if field == k or field.startswith(k + ".")]
        self.problems.append(
            ConfigProblem(
                f"override {by[-1]!r}" if by else self.source,
                field,
                message,
                None if by else self.lines.get(loc) or self.lines.get(loc[:2]),
            )
        )


def _value_at(cfg: RunConfig, field: str) -> Any:
    section, name = field.split(".")
    return getattr(getattr(cfg, section), name)


def _check_base(cfg: RunConfig, missing: _MissingPaths) -> None:
    from loratui.pipeline import models

    base = cfg.model.base.strip()
    if base not in models.BUILTINS and not Path(base).expanduser().exists() and not models.is_hub_id(base):
        missing.report(
            "model.base",
            ("model", "base"),
            base,
            f"no such file or folder, and not a built-in model ({', '.join(models.BUILTINS)}) or a hub id (org/name)",
        )


def _check_data_paths(cfg: RunConfig, missing: _MissingPaths) -> None:
    from loratui.pipeline.data.loaders import expand_sources

    for field in DATA_PATH_FIELDS:
        value = _value_at(cfg, field)
        items = [] if value is None else [value] if isinstance(value, str) else list(value)
        for i, item in enumerate(items):
            loc = tuple(field.split(".")) + (() if isinstance(value, str) else (str(i),))
            try:
                expand_sources(item)
            except LoratuiError as e:  # its words: no such file, folder or bundled dataset; no files match ...
                missing.report(field, loc, item, e.message.rpartition(": ")[2])


def _check_artifact_paths(cfg: RunConfig, missing: _MissingPaths) -> None:
    run_dir = cfg.run_dir.resolve()
    for field in ARTIFACT_PATH_FIELDS:
        value = _value_at(cfg, field)
        if not value:
            continue
        p = Path(value).expanduser()
        if p.exists() or p.resolve().is_relative_to(run_dir):
            continue
        missing.report(field, tuple(field.split(".")), value, "no such file or folder")


# --------------------------------------------------------------------------------------------
# Reference documentation generated from the schema
# --------------------------------------------------------------------------------------------


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if value is None:
        return "(empty)"
    flow: str = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return "`" + flow.strip().removesuffix("...").strip() + "`"


def config_reference_markdown() -> str:
    """The config reference as Markdown tables, one per section, from the schema's descriptions."""
    out = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in RunConfig.model_fields.items():
        if name in SECTIONS:
            continue
        out.append(
            f"| `{name}` | {describe_type(info.annotation, markdown=True)} | {_default_text(info)} | {info.description} |"
        )
    for section in SECTIONS:
        model = RunConfig.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out += [
            "",
            f"### `{section}`: {model.__doc__}",
            "",
            "| field | type | default | description |",
            "|---|---|---|---|",
        ]
        for name, info in model.model_fields.items():
            out.append(
                f"| `{section}.{name}` | {describe_type(info.annotation, markdown=True)} | {_default_text(info)} | {info.description} |"
            )
    return "\n".join(out) + "\n"
