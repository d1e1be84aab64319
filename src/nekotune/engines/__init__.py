"""Inference engines behind one interface (base.Engine): transformers, llama.cpp, vLLM (serve only).

The table of engines is registry.ENGINES; choose.py holds the `auto` rule, session.py opens the
engine a command uses. Importing this package loads neither torch nor llama_cpp.
"""

from nekotune.engines.choose import CHOICES, Choice, pick_engine

__all__ = ["CHOICES", "Choice", "pick_engine"]
