"""Inference engines behind one interface (base.Engine): transformers, llama.cpp, vLLM (serve only).

The table of engines and the `auto` rule live in registry.py; importing this package loads
neither torch nor llama_cpp.
"""

from nekotune.engines.registry import CHOICES, ENGINES, Choice, pick_engine

__all__ = ["CHOICES", "ENGINES", "Choice", "pick_engine"]
