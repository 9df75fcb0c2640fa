"""The eval step: metrics, the models it scores (PyTorch, llama.cpp and onnxruntime, in ``runtimes.py``), reports and plots."""
