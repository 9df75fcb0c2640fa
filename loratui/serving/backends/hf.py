"""The tokenizer side of a transformers model directory, shared by the PyTorch and ONNX Runtime backends."""

from __future__ import annotations

from typing import Any


class HFBase:
    """Tokenizer, chat template and stop ids of a transformers model directory."""

    def _setup_tokenizer(self, tokenizer: Any, generation_eos: Any) -> None:
        self.tokenizer = tokenizer
        stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if generation_eos is not None:
            stops |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        template = getattr(tokenizer, "chat_template", None) or ""
        for token in tokenizer.all_special_tokens:
            if token and token in template and token != tokenizer.bos_token and "end" in token.lower():
                stops.add(tokenizer.convert_tokens_to_ids(token))
        self.stop_ids = {int(s) for s in stops}
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
