"""`python -m llama_cpp.server`, the benchmark's baseline, with one optional change: --no-repack loads
the model without ggml's extra buffer types. On AMX CPUs a repacked q8_0 model segfaults on every
decode of two or more tokens (llama.cpp issue 20824) and the server has no option for it; the
llama.cpp engine applies the same setting (nekotune/engines/llamacpp.py). f16 files need nothing.
"""

import sys


def main() -> None:
    if "--no-repack" in sys.argv:
        sys.argv.remove("--no-repack")
        import llama_cpp.llama as high

        original = high.llama_cpp.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = False
            return p

        high.llama_cpp.llama_model_default_params = params
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
