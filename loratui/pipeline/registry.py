"""The steps of the workflow, importable without any dependency (the CLI builds --help from it)."""

from __future__ import annotations

from typing import Any

# The six steps, in order; the TUI shows all six.
STEP_ORDER: tuple[str, ...] = ("data", "train", "eval", "merge", "export", "serve")

# Implemented steps: name -> "module:function" with the signature of loratui.pipeline.steps.StepFn.
# The CLI offers a subcommand for each entry.
STEPS: dict[str, str] = {
    "data": "loratui.pipeline.data.step:run",
    "train": "loratui.pipeline.train.step:run",
    "eval": "loratui.pipeline.eval.step:run",
    "merge": "loratui.pipeline.merge.step:run",
    "export": "loratui.exporters.step:run",
}

# One line of --help per step.
STEP_HELP: dict[str, str] = {
    "data": "load, validate, template and split the training data (add `preview` to show examples)",
    "train": "train a LoRA/QLoRA/DoRA adapter (`history` lists versions, `rollback N` restores one)",
    "eval": "score the tuned model against the base model on the test split (metrics, comparison, plots)",
    "merge": "fold the adapter into the unquantized base: safetensors + tokenizer + model card, parity-checked",
    "export": "write export.formats (`--format safetensors` is the merge)",
}

# Actions a step accepts as its first word (`loratui data preview`): run the step (cached), then this.
STEP_ACTIONS: dict[str, dict[str, str]] = {
    "data": {"preview": "loratui.pipeline.data.summary:show_preview"},
}

# Commands a step accepts as its first word *instead of* running (`loratui train rollback 2`):
# "module:function" called with (cfg, words after the command); returns an exit code.
STEP_COMMANDS: dict[str, dict[str, str]] = {
    "train": {
        "history": "loratui.pipeline.train.commands:history",
        "rollback": "loratui.pipeline.train.commands:rollback",
    },
}

# Step options that are shorthands for config overrides: (flag, argparse keywords, config key).
STEP_OPTIONS: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "train": [
        (
            "--resume",
            {
                "nargs": "?",
                "const": "latest",
                "metavar": "CHECKPOINT",
                "help": "continue from the latest checkpoint, or from CHECKPOINT",
            },
            "train.resume",
        ),
        (
            "--nproc",
            {"type": int, "metavar": "N", "help": "train with N data-parallel processes (per node)"},
            "train.nproc",
        ),
        (
            "--nodes",
            {
                "type": int,
                "metavar": "N",
                "help": "machines taking part, nproc processes each (default: NNODES, or SLURM_NNODES, else 1)",
            },
            "train.nodes",
        ),
        (
            "--node-rank",
            {
                "type": int,
                "metavar": "R",
                "help": "this machine's rank, 0 to nodes-1 (default: NODE_RANK, or SLURM_NODEID)",
            },
            "train.node_rank",
        ),
        (
            "--main-address",
            {"metavar": "HOST", "help": "node 0's address (default: MASTER_ADDR, or SLURM's first node)"},
            "train.main_address",
        ),
        (
            "--main-port",
            {"type": int, "metavar": "PORT", "help": "node 0's port (default: MASTER_PORT, else 29500)"},
            "train.main_port",
        ),
    ],
    "eval": [
        (
            "--model",
            {"metavar": "PATH", "help": "evaluate this adapter folder or merged model directory"},
            "eval.model",
        ),
        (
            "--max-samples",
            {"type": int, "metavar": "N", "help": "score at most N rows per dataset"},
            "eval.max_samples",
        ),
    ],
    "export": [
        (
            "--format",
            {
                "type": lambda v: f"[{v}]",
                "metavar": "FORMAT[,FORMAT]",
                "help": "formats to write instead of export.formats (safetensors, gguf, gguf-lora, onnx)",
            },
            "export.formats",
        ),
        (
            "--quant",
            {
                "type": lambda v: f"[{v}]",
                "metavar": "TYPE[,TYPE]",
                "help": "GGUF types instead of export.gguf_quants (q4_k_m, q8_0, f16 ...)",
            },
            "export.gguf_quants",
        ),
        (
            "--onnx-quant",
            {
                "type": lambda v: f"[{v}]",
                "metavar": "TYPE[,TYPE]",
                "help": "quantized ONNX models to write beside fp32 (int4, int8), instead of export.onnx_quants",
            },
            "export.onnx_quants",
        ),
    ],
}

# Step options that replace running the step (``loratui train --print-launch slurm``): (flag, argparse keywords,
# "module:function" called with (cfg, the flag's value, the --config path, the overrides); returns an exit code).
STEP_FLAGS: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "train": [
        (
            "--print-launch",
            {
                "choices": ["slurm", "torchrun"],
                "help": "print an sbatch script (slurm) or one command per node (torchrun) that trains this config "
                "on several machines, and exit",
            },
            "loratui.pipeline.train.launch:print_launch",
        ),
    ],
}
