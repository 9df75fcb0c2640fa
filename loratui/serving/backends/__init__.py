"""Runtimes behind the server: one ``Backend`` per format (llama.cpp GGUF, PyTorch, ONNX Runtime).

:mod:`.base` holds what they share (requests, deltas, stop handling); one module per runtime
(:mod:`.llamacpp`, :mod:`.torch_backend`, :mod:`.onnxruntime_backend`) imports its runtime only when a
backend is built, so importing this package stays cheap.

Concurrency: each backend owns one model and batches continuously: a request that arrives joins the
running batch at the next decode step (up to ``max_batch_size`` rows), each row with its own sampling and
stop rules, and leaves it when done. ``TorchBackend``: a padded KV cache in PyTorch; ``LlamaCppBackend``:
one llama.cpp context with a sequence per row (:mod:`.llamacpp_batch`); ``OnnxBackend``: the export's decoder
graph with one GroupQueryAttention KV buffer (:mod:`.onnxruntime_batch`; exports it cannot drive go one at a
time through onnxruntime-genai). vLLM (:mod:`.vllm`) is a client of vLLM's own server.
"""

from loratui.serving.backends.base import Backend, Decoding, Delta, GenRequest, TextAssembler, run_request
from loratui.serving.backends.llamacpp import LlamaCppBackend
from loratui.serving.backends.onnxruntime_backend import OnnxBackend
from loratui.serving.backends.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "Decoding",
    "Delta",
    "GenRequest",
    "LlamaCppBackend",
    "OnnxBackend",
    "TextAssembler",
    "TorchBackend",
    "run_request",
]
