"""Exports of a trained model: GGUF (llama.cpp), Ollama, and the check that they match transformers."""
