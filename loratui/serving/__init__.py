"""OpenAI-compatible serving over torch, llama.cpp and onnxruntime backends. Headless."""
