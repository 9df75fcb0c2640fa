"""The exports report: the verification figures an exporter writes beside its files (``exports/gguf/report.json``,
``exports/gguf/lora-report.json``, ``exports/onnx/report.json``), read back by the TUI's export view.

Only the keys an exporter wrote are written back, in the order it wrote them; keys this model does not
name pass through unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from loratui.pipeline.runs import atomic_write_text

REPORT = "report.json"  # the GGUF and ONNX exports' name; the LoRA GGUF writes LORA_REPORT beside the GGUF one
LORA_REPORT = "lora-report.json"


class _Written(BaseModel):
    """A record that dumps only the keys it was given, in their order (a missing key stays missing)."""

    model_config = ConfigDict(extra="allow")
    _keys: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_keys(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        record = handler(data)
        if isinstance(data, dict) and isinstance(record, _Written):
            record._keys = list(data)
        return record

    @model_serializer(mode="wrap")
    def _given_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {key: dumped[key] for key in self._keys if key in dumped}


class ExportedFile(_Written):
    """One row: a GGUF file (``file``) or an ONNX folder (``folder``) and its figures; None: not measured."""

    type: str = "?"  # a row written without one shows as "?" in the TUI; not written back (only given keys are)
    file: str | None = None
    folder: str | None = None
    bytes: int | None = None
    bits_per_weight: float | None = None  # GGUF
    max_abs_logit_diff: float | None = None  # ONNX
    reference_max_abs_logit: float | None = None  # ONNX
    perplexity: float | None = None
    delta_perplexity: float | None = None
    top1_agreement: float | None = None
    decode_tokens_per_s: float | None = None
    scoring_rows_per_s: float | None = None  # ONNX
    replies_stopped: str | None = None
    key_facts: float | None = None
    fallbacks: str | None = None  # GGUF
    decided: int | None = None  # GGUF
    decided_agreement: float | None = None  # GGUF
    verdict: str | None = None  # None: not verified
    replies: list[dict[str, Any]] = []

    @property
    def refused(self) -> bool:
        """The file failed its verification: its row stays, the file was not written."""
        return str(self.verdict or "").startswith("refused")


class ExportReport(_Written):
    """One export's report.json."""

    builder: str | None = None  # ONNX: the builder and its version
    merged_perplexity: float | None = None
    merged_decode_tokens_per_s: float | None = None  # ONNX
    samples: int | None = None  # GGUF: the test rows verified on
    params: int | None = None  # the merged model's (LoRA GGUF: the base's)
    adapter_params: int | None = None  # LoRA GGUF
    adapter: str | None = None  # LoRA GGUF
    stop_token_ids: list[int] | None = None  # ONNX
    files: list[ExportedFile] = []

    @classmethod
    def load(cls, path: Path) -> ExportReport:
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.model_dump(), indent=2) + "\n")
