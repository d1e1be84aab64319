"""The Python API: what `import nekotune` offers, and what the command line itself calls.

    import nekotune

    cfg = nekotune.Config.load("my.yaml", ["train.epochs=1"])
    run = nekotune.train(cfg)                      # a Run: run.dir, run.adapter, run.metrics
    model = nekotune.load(run)
    print(model.generate("Who are you?"))
    nekotune.evaluate(run, "heldout.json")
    nekotune.merge(run, "merged/")
    nekotune.export_gguf(run, "neko.gguf", "q8_0")

Every function takes what the command of the same name takes, as Python values; `cfg` is
optional where the command's config is (it then holds the defaults). Nothing here prints: results
come back as dataclasses, progress through the `progress`/`reporter` arguments, notes through
the "nekotune" logger (`logging.basicConfig()` shows them).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nekotune.config import Config, load_config
from nekotune.errors import UserError
from nekotune.registry import ENGINE_CHOICES, ENGINES, TRAINING_STAGES
from nekotune.runs import Run

if TYPE_CHECKING:
    from nekotune.compare import CompareResult
    from nekotune.data.check import CheckReport
    from nekotune.data.preference_tokens import PreferenceReport
    from nekotune.evaluation import EvalResult, PredictResult
    from nekotune.export.gguf import ExportResult
    from nekotune.export.gguf_lora import LoraGGUF
    from nekotune.export.ollama import OllamaResult
    from nekotune.export.verify import VerifyReport
    from nekotune.generate import GenSettings
    from nekotune.memory import MemoryReport
    from nekotune.model import Loaded
    from nekotune.training import TrainReporter
    from nekotune.weights import MergeResult

Progress = Callable[[int, int], None]  # (done, total)


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else load_config(None, [], default_to_demo=False)


def _arg(model: str | os.PathLike | None) -> str | None:
    return os.fspath(model) if model is not None else None


# -- training --------------------------------------------------------------------------------
def train(cfg: Config, *, stage: str | None = None, reporter: TrainReporter | None = None, show_progress: bool = True,
          after_train: Callable[[Any, Any, Path], None] | None = None, stop_flag: Any = None,
          callbacks: list | None = None) -> Run:
    """Fine-tune as `nekotune train` does and return the run directory.

    `stage` (default train.stage): sft, pt, dpo, orpo, simpo, kto (registry.TRAINING_STAGES).
    `reporter` hears the progress (subclass nekotune.training.TrainReporter); `stop_flag`, any
    object with a `requested` attribute, stops after the current step when it turns true."""
    if stage is not None and stage != cfg.train.stage:
        if stage not in TRAINING_STAGES:
            raise UserError(f"training stage {stage!r} is not one of {', '.join(TRAINING_STAGES)}")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stage": stage})})
    stage = cfg.train.stage
    if stage not in TRAINING_STAGES:
        raise UserError(f"training stage {stage!r} is not one of {', '.join(TRAINING_STAGES)}")
    recipe = TRAINING_STAGES[stage]
    if recipe.formats and cfg.data.format == "auto":  # train.stage=pt: the rows are plain text
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": recipe.formats[0]})})
    if recipe.formats and cfg.data.format not in recipe.formats:
        raise UserError(f"training stage {stage} trains on data.format {' or '.join(recipe.formats)}; "
                        f"set data.format={recipe.formats[0]}")
    module, _, function = recipe.recipe.partition(":")
    run = getattr(importlib.import_module(module), function)(
        cfg, show_progress=show_progress, after_train=after_train, stop_flag=stop_flag, callbacks=callbacks,
        reporter=reporter)
    return Run(run)


def check_data(file: str | os.PathLike, cfg: Config | None = None, model: str | os.PathLike | None = None,
               ) -> CheckReport | PreferenceReport:
    """`nekotune data check`: every row converted, rendered and measured with the model's tokenizer;
    a preference file (chosen/rejected pairs, KTO rows, or any file under a preference train.stage)
    gives a PreferenceReport."""
    from nekotune.data.check import check_file
    from nekotune.data.preference import preference_kind
    from nekotune.model import HubChoice, resolve
    from nekotune.model.load import load_renderer

    cfg = _cfg(cfg)

    def tokenizer() -> tuple[Any, str]:
        source = resolve(_arg(model) or cfg.model.name_or_path, hub=HubChoice.of(cfg.model))
        return load_renderer(source, cfg)[1], source.base  # a VLM's renderer counts its image tokens

    kind = preference_kind(os.fspath(file), cfg.data, cfg.train.stage)
    if kind is not None:  # issue 18
        from nekotune.data.preference_tokens import check_preference_file
        from nekotune.data.render import Renderer

        tok, where = tokenizer()
        renderer = tok if isinstance(tok, Renderer) else Renderer.from_config(tok, cfg.data)
        report = check_preference_file(os.fspath(file), cfg.data, renderer, kind)
        report.tokenizer = where
        return report
    return check_file(os.fspath(file), cfg.data, tokenizer)


# -- using a model ---------------------------------------------------------------------------
class Model:
    """A loaded model with its tokenizer, prompt settings and adapter: `generate` and `stream`
    render prompts exactly as training did (same chat template, system prompt, thinking mode)."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.model = loaded.model  # the transformers (peft) model
        self.tokenizer = loaded.renderer.tokenizer
        self.cfg = loaded.cfg  # the effective config: yours over the run's own prompt and sampling settings
        self.label = loaded.spec.label
        self.session: Any = None  # an engines.session.Session when another engine generates

    @classmethod
    def from_session(cls, session: Any) -> "Model":
        """A model generating on another engine (llama.cpp); `model` is None there."""
        self = cls.__new__(cls)
        self.loaded, self.session = session.loaded, session
        self.model = session.loaded.model if session.loaded is not None else None
        self.tokenizer, self.cfg, self.label = session.renderer.tokenizer, session.cfg, session.label
        return self

    def _conversation(self, prompt: Any, system: str | None) -> Any:
        from nekotune.data.formats import Conversation, Turn

        if isinstance(prompt, Conversation):
            return prompt
        if isinstance(prompt, str):
            return Conversation(turns=[Turn("user", prompt)], system=system)
        turns = [Turn(m["role"], m["content"]) for m in prompt if m["role"] in ("user", "assistant")]
        systems = [m["content"] for m in prompt if m["role"] == "system"]
        return Conversation(turns=turns, system=system or ("\n\n".join(systems) if systems else None))

    def settings(self, **overrides: Any) -> GenSettings:
        """The generation settings: the config's `generate:` section with `overrides` on top."""
        from nekotune.generate import GenSettings

        return GenSettings.from_config(self.cfg.generate, **overrides)

    def generate(self, prompt: Any, system: str | None = None, **settings: Any) -> str:
        """The answer to a question, a list of {"role", "content"} messages or a Conversation;
        `settings`: max_new_tokens, temperature (0: greedy), top_p, top_k, repetition_penalty, seed."""
        from nekotune.generate import generate

        if self.session is not None:
            return self.session.generate(self._conversation(prompt, system), self.settings(**settings))
        return generate(self.model, self.loaded.renderer, self._conversation(prompt, system), self.settings(**settings))

    def stream(self, prompt: Any, system: str | None = None, **settings: Any) -> Iterator[str]:
        """The answer piece by piece, as it is generated."""
        from nekotune.generate import stream

        if self.session is not None:
            yield from self.session.stream(self._conversation(prompt, system), self.settings(**settings))
            return
        yield from stream(self.model, self.loaded.renderer, self._conversation(prompt, system),
                          self.settings(**settings))


def load(model: str | os.PathLike | None = None, cfg: Config | None = None, engine: str = "transformers") -> Model:
    """A run, adapter, model directory, .gguf or hub id (default: the latest run) loaded for chat.

    `engine`: transformers (the default here: `Model.model` is the torch model) or any of
    registry.ENGINE_CHOICES; the commands use generate.engine (default auto) instead."""
    from nekotune.engines.session import open_session
    from nekotune.model import load_for_inference

    if engine not in ENGINE_CHOICES:
        raise UserError(f"inference engine {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
    if engine in ENGINES and ENGINES[engine].serve_only:
        raise UserError(f"inference engine {engine} serves only (nekotune serve --engine {engine}); load with "
                        f"transformers, llama.cpp or auto")
    cfg = _cfg(cfg)
    if engine == "transformers":
        return Model(load_for_inference(cfg, _arg(model)))
    return Model.from_session(open_session(_with_engine(cfg, engine), _arg(model)))


def _with_engine(cfg: Config, engine: str) -> Config:
    return cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"engine": engine})})


def evaluate(model: str | os.PathLike | None, file: str | os.PathLike, cfg: Config | None = None, *,
             out: str | os.PathLike | None = None, baseline: bool = False, limit: int | None = None,
             generate: bool = True) -> EvalResult:
    """`nekotune eval`: loss, perplexity and BLEU/ROUGE/chrF, written to `out` (default <run>/eval); on a
    preference file (chosen/rejected pairs), held-out reward accuracy and margin against the run's reference."""
    from nekotune.data.preference import preference_kind
    from nekotune.evaluation import evaluate as run_eval

    cfg = _cfg(cfg)
    if Path(file).is_file() and preference_kind(os.fspath(file), cfg.data, "sft") is not None:  # issue 18
        from nekotune.preference import evaluate_pairs

        return evaluate_pairs(cfg, _arg(model), os.fspath(file), _arg(out))
    return run_eval(_cfg(cfg), _arg(model), os.fspath(file), out_dir=_arg(out), baseline=baseline, limit=limit,
                    generate=generate)


def predict(model: str | os.PathLike | None, file: str | os.PathLike, out: str | os.PathLike,
            cfg: Config | None = None, *, limit: int | None = None, progress: Progress | None = None,
            ) -> PredictResult:
    """`nekotune predict`: one answer per row, as JSON lines in `out`."""
    from nekotune.evaluation import predict as run_predict

    return run_predict(_cfg(cfg), _arg(model), os.fspath(file), os.fspath(out), limit=limit, progress=progress)


def compare(models: list[str], prompts: str | os.PathLike, out: str | os.PathLike, cfg: Config | None = None, *,
            limit: int | None = None, eval_file: str | None = None, names: list[str] | None = None) -> CompareResult:
    """`nekotune compare`: every prompt answered by every model, as an HTML and a Markdown report;
    `names`: the column titles, one per model (default: the model paths)."""
    from nekotune.compare import compare as run_compare

    return run_compare(_cfg(cfg), models, os.fspath(prompts), os.fspath(out), limit=limit, eval_file=eval_file,
                       names=names)


# -- merge and export ------------------------------------------------------------------------
def merge(model: str | os.PathLike | None, out: str | os.PathLike, cfg: Config | None = None, *,
          low_memory: bool = False, dtype: str | None = None, progress: Progress | None = None) -> MergeResult:
    """`nekotune merge`: the adapter merged into its base, as a model directory."""
    from nekotune.weights import merge as run_merge

    return run_merge(_cfg(cfg), _arg(model), os.fspath(out), low_memory=low_memory, dtype=dtype, progress=progress)


def export_gguf(model: str | os.PathLike | None, out: str | os.PathLike, type: str = "q8_0",
                cfg: Config | None = None, *, progress: Progress | None = None,
                imatrix: str | os.PathLike | None = None) -> ExportResult:
    """`nekotune export gguf`: one .gguf file for llama.cpp (types: nekotune.registry.GGUF_TYPES);
    `imatrix`: a llama.cpp importance matrix weighting the 2-6 bit types."""
    from nekotune.export.gguf import gguf_file

    return gguf_file(_cfg(cfg), _arg(model), os.fspath(out), type, progress, _arg(imatrix))


def export_ollama(model: str | os.PathLike | None, out: str | os.PathLike, type: str = "q4_0",
                  cfg: Config | None = None, *, progress: Progress | None = None,
                  imatrix: str | os.PathLike | None = None, adapter: bool = False) -> OllamaResult:
    """`nekotune export ollama`: a directory with the GGUF and a Modelfile for `ollama create`;
    `adapter`: the base GGUF plus the adapter as a LoRA GGUF (Modelfile ADAPTER), not merged."""
    from nekotune.export.ollama import ollama_dir

    return ollama_dir(_cfg(cfg), _arg(model), os.fspath(out), type, progress, _arg(imatrix), adapter=adapter)


def export_gguf_lora(model: str | os.PathLike | None, out: str | os.PathLike, cfg: Config | None = None, *,
                     dtype: str = "f16") -> LoraGGUF:
    """`nekotune export gguf-lora`: the run's adapter in llama.cpp's LoRA GGUF format (issue 19)."""
    from nekotune.export.gguf_lora import export_lora

    return export_lora(_cfg(cfg), _arg(model), os.fspath(out), dtype)


def verify(gguf: str | os.PathLike, model: str | os.PathLike | None = None, cfg: Config | None = None, *,
           limit: int | None = None, reference: str | os.PathLike | None = None) -> VerifyReport:
    """`nekotune export verify`: llama.cpp on the GGUF against transformers on its source; the
    fixed text's divergence against `reference` (a GGUF, e.g. the f16 export) or the source."""
    from nekotune.export.verify import Verification

    with Verification(_cfg(cfg), os.fspath(gguf), _arg(model), limit, _arg(reference)) as check:
        return check.run()


# -- before and around training ---------------------------------------------------------------
def estimate(model: str | os.PathLike | None = None, cfg: Config | None = None, *, fit: str | None = None,
             ) -> MemoryReport:
    """`nekotune estimate`: peak training memory (and with `fit`, settings that fit a budget)."""
    from nekotune.memory import estimate_training

    return estimate_training(_cfg(cfg), _arg(model), fit)


def doctor() -> dict:
    """`nekotune doctor`: what this machine has, and what that means for training."""
    from nekotune.doctor import collect

    return collect()
