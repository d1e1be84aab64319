"""nekotune: LoRA/QLoRA fine-tuning from a JSON file to chat, an API and GGUF.

The Python API (nekotune.api) is imported on first use, so `import nekotune` stays fast:

    import nekotune
    run = nekotune.train(nekotune.Config.load("my.yaml"))
    print(nekotune.load(run).generate("Hello!"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Config", "Model", "Run", "UserError", "__version__", "check_data", "compare", "doctor", "estimate",
           "evaluate", "export_gguf", "export_ollama", "load", "load_config", "merge", "predict", "train", "verify"]
API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from nekotune.api import (
        Config,
        Model,
        Run,
        UserError,
        check_data,
        compare,
        doctor,
        estimate,
        evaluate,
        export_gguf,
        export_ollama,
        load,
        load_config,
        merge,
        predict,
        train,
        verify,
    )


def __getattr__(name: str) -> Any:
    if name in API:
        from nekotune import api

        return getattr(api, name)
    raise AttributeError(f"module 'nekotune' has no attribute {name!r}")
