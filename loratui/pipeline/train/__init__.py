"""The train step: LoRA, QLoRA, DoRA and rsLoRA adapters with the transformers Trainer."""
