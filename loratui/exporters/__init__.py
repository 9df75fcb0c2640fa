"""Exporters: merged safetensors, ONNX and GGUF, each verified in its target runtime. Headless."""
