"""loratui: fine-tune, export and serve LoRA models, from a terminal UI or headless."""

__version__ = "0.1.0"
