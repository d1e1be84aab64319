"""nekotune: LoRA/QLoRA fine-tuning from a JSON file to chat, an API and GGUF."""

__version__ = "0.1.0"
