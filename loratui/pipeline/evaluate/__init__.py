"""The evaluate step: metrics, the model interface (PyTorch here; llama.cpp and onnxruntime in the exporters), reports and plots."""
