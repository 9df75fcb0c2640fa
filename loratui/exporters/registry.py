"""Export formats: name -> "module:function" of ``export(cfg, run, events, should_stop) -> dict`` (a summary).

Importable without dependencies (the CLI builds --help from it). ``export.formats`` in the config
schema lists the same names (a test keeps the two equal).
"""

from __future__ import annotations

EXPORTERS: dict[str, str] = {
    "safetensors": "loratui.exporters.safetensors:export",
    "gguf": "loratui.exporters.gguf:export",
    "gguf-lora": "loratui.exporters.gguf_lora:export",
    "onnx": "loratui.exporters.onnx:export",
}
