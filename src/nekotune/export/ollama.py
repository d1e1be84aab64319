"""Ollama export: a directory with the GGUF and a Modelfile whose TEMPLATE renders what the
model was trained on.

Ollama does not run Jinja chat templates; it runs Go templates. The TEMPLATE is written per
template family (ChatML, Qwen3, Llama 3), with the pieces that vary - the generation prompt (Qwen3's
empty think block), the default system prompt, the BOS text - measured by rendering probe
conversations with nekotune's Renderer. The result is then checked: the Go template, rendered by
gotemplate.render_go_template (the subset of Go template syntax emitted here) for a few
conversations as Ollama would, must equal the chat template's rendering. A mismatch is reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.config import Config, GenerateConfig
from nekotune.errors import UserError
from nekotune.export.gguf import ExportResult, Progress
from nekotune.export.gotemplate import render_go_template

PROBE = "nekotune-probe-{}"
WRITTEN_BY = "nekotune export ollama"  # the marker of an Ollama directory (nekotune.io)


def ollama_data(messages: list[dict], default_system: str | None) -> dict:
    """The data Ollama gives a template for a chat request: SYSTEM is inserted when the request
    has no system message; all system texts are also joined into .System."""
    msgs = [dict(m) for m in messages]
    if default_system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": default_system})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs],
            "Prompt": "", "Response": ""}


# -- Modelfile TEMPLATE per family ----------------------------------------------------------
MESSAGES_LOOP = (
    '{{- range $i, $_ := .Messages }}\n'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
    '{{- if eq .Role "user" }}USER_TURN'
    '{{ else if eq .Role "assistant" }}ASSISTANT_TURN\n'
    '{{- end }}\n'
    '{{- if and (ne .Role "assistant") $last }}GENERATION_PROMPT{{ end }}\n'
    '{{- end }}')

FAMILIES = {
    # family: (system block, user turn, assistant turn; the last assistant turn stays open for prefill)
    "chatml": ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n",
               "<|im_start|>user\n{{ .Content }}<|im_end|>\n",
               "<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}"),
    "llama3": ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}\n",
               "<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}"),
}
FAMILIES["qwen3"] = FAMILIES["chatml"]  # the think block differs only in the generation prompt
SYSTEM_MARKERS = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
                  "qwen3": ("<|im_start|>system\n", "<|im_end|>"),
                  "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}


def detect_family(template: str) -> str | None:
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "qwen3" if "<think>" in template else "chatml"
    return None


def go_escape(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs care."""
    return text.replace("{{", '{{ "{{" }}')


@dataclass
class Probe:
    generation_prompt: str
    default_system: str | None
    bos_text: str


def probe_template(renderer: Any, family: str) -> Probe:
    user = [{"role": "user", "content": PROBE.format("user")}]
    closed = renderer.render(user, add_generation_prompt=False)
    opened = renderer.render(user, add_generation_prompt=True)
    if not opened.startswith(closed):
        raise UserError("the chat template renders the generation prompt in the middle of the text; "
                        "the Ollama export cannot translate it (set model.chat_template to a standard template)")
    start, end = SYSTEM_MARKERS[family]
    # Only a template that writes {{ bos_token }} has a BOS prefix (SmolLM2's BOS is <|im_start|> itself).
    bos = renderer.tokenizer.bos_token or ""
    bos = bos if bos and "bos_token" in renderer.template and closed.startswith(bos) else ""
    body = closed[len(bos):]
    default = body[len(start):body.index(end, len(start))] if body.startswith(start) else None
    return Probe(opened[len(closed):], default, bos)


def build_template(family: str, probe: Probe, runtime_adds_bos: bool) -> str:
    system, user, assistant = FAMILIES[family]
    loop = (MESSAGES_LOOP.replace("USER_TURN", user).replace("ASSISTANT_TURN", assistant)
            .replace("GENERATION_PROMPT", go_escape(probe.generation_prompt)))
    prefix = "" if runtime_adds_bos else go_escape(probe.bos_text)
    return prefix + system + loop


def system_for_modelfile(renderer: Any, probe: Probe) -> str | None:
    return renderer.system_prompt or probe.default_system


def probe_conversations(system: str | None) -> list[list[dict]]:
    one = [{"role": "user", "content": "Hello!"}]
    two = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, nya~"},
           {"role": "user", "content": "And 3+3?"}]
    convs = [one, two]
    if system:
        convs.append([{"role": "system", "content": "Answer briefly."}] + two)
    return convs


def expected_prompt(renderer: Any, messages: list[dict], bos_stripped: str) -> str:
    """What transformers feeds the model: the renderer's prompt with nekotune's system prompt."""
    if renderer.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": renderer.system_prompt}] + messages
    text = renderer.render(messages, add_generation_prompt=True)
    return text[len(bos_stripped):] if bos_stripped and text.startswith(bos_stripped) else text


def check_template(template: str, renderer: Any, system: str | None, bos_stripped: str) -> str | None:
    """None when the Go template reproduces the chat template; else a description of the first difference."""
    for messages in probe_conversations(system):
        want = expected_prompt(renderer, messages, bos_stripped)
        got = render_go_template(template, ollama_data(messages, system))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return f"at character {at}: Ollama {got[at:at + 40]!r} vs transformers {want[at:at + 40]!r}"
    return None


# -- the Modelfile ---------------------------------------------------------------------------
def stop_texts(renderer: Any) -> list[str]:
    tok = renderer.tokenizer
    texts = [renderer.eot_text] + [tok.convert_ids_to_tokens(i) for i in renderer.stop_token_ids]
    return list(dict.fromkeys(t for t in texts if t))


def quote(text: str) -> str:
    if '"""' in text:
        raise UserError('the chat template or system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str | None, system: str | None, stops: list[str],
                   gen_cfg: GenerateConfig, adapter_name: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter_name}"] if adapter_name else [])
    if template is not None:
        lines.append(f"TEMPLATE {quote(template)}")
    if system:
        lines.append(f"SYSTEM {quote(system)}")
    lines += [f"PARAMETER stop {_json_string(s)}" for s in stops]
    lines += [f"PARAMETER temperature {gen_cfg.temperature:g}", f"PARAMETER top_p {gen_cfg.top_p:g}",
              f"PARAMETER top_k {gen_cfg.top_k}", f"PARAMETER repeat_penalty {gen_cfg.repetition_penalty:g}",
              f"PARAMETER num_predict {gen_cfg.max_new_tokens}"]
    if gen_cfg.seed is not None:
        lines.append(f"PARAMETER seed {gen_cfg.seed}")
    return "\n".join(lines) + "\n"


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def ollama_name(source_name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", source_name.lower()).strip("-._") or "nekotune-model"


@dataclass
class ModelfileParts:
    template: str | None
    system: str | None
    stops: list[str]
    warning: str | None = None


def modelfile_parts(renderer: Any, runtime_adds_bos: bool) -> ModelfileParts:
    family = detect_family(renderer.template)
    stops = stop_texts(renderer)
    if family is None:
        return ModelfileParts(None, renderer.system_prompt, stops,
                              "the chat template is none of ChatML, Qwen3, Llama 3: the Modelfile has no TEMPLATE "
                              "and Ollama will guess one from the GGUF's chat template; check its answers")
    probe = probe_template(renderer, family)
    template = build_template(family, probe, runtime_adds_bos)
    system = system_for_modelfile(renderer, probe)
    mismatch = check_template(template, renderer, system, probe.bos_text if runtime_adds_bos else "")
    warning = f"the Ollama TEMPLATE differs from the chat template ({mismatch})" if mismatch else None
    return ModelfileParts(template, system, stops, warning)


@dataclass
class OllamaResult:
    export: ExportResult  # the directory, the GGUF inside it and its type
    name: str  # the model name to `ollama create`
    modelfile: Path
    warning: str | None  # a TEMPLATE that does not reproduce the chat template, or none written


def _adapter_refusal(source: Any, base_dir: Path) -> None:
    """`--adapter` (issue 19): refused, in one line, where Ollama would not apply a LoRA GGUF."""
    from nekotune.export.gguf import architecture
    from nekotune.export.gguf_lora import check_exportable, ollama_takes_adapter
    from nekotune.io import read_json

    if not source.spec.adapter:
        raise UserError(f"--adapter: {source.spec.label} holds no LoRA adapter; Ollama's ADAPTER needs a run or "
                        f"adapter directory (drop --adapter to export the model itself)")
    config = read_json(base_dir / "config.json")
    if not ollama_takes_adapter(architecture(config)):
        raise UserError(f"--adapter: Ollama runs {architecture(config)} models on its own engine, which does not "
                        f"apply LoRA adapters; drop --adapter (the export then merges the adapter)")
    check_exportable(Path(source.spec.adapter), config)


def _write_ggufs(source: Any, tmp: Path, name: str, type: str, base_dir: Path, adapter: bool,
                 progress: Progress | None, imatrix: str | None = None) -> tuple[str, str, str | None]:
    """(model GGUF name, type written, LoRA GGUF name): merged, or the base plus the adapter."""
    from dataclasses import replace

    from nekotune.export.gguf import export_gguf
    from nekotune.export.gguf_lora import write_lora_gguf
    from nekotune.io import read_json
    from nekotune.model import ModelSource

    lora_name = None
    if adapter:
        lora_name = f"{name}-lora.gguf"
        write_lora_gguf(source.spec.adapter, read_json(base_dir / "config.json"), tmp / lora_name, name=name)
        source, name = replace(source, spec=ModelSource(base=source.spec.base)), f"{name}-base"
    written = export_gguf(source, tmp / f"{name}-{type}.gguf", type, progress, imatrix)
    gguf_name = f"{name}-{written}.gguf"
    if written != type:
        (tmp / f"{name}-{type}.gguf").rename(tmp / gguf_name)
    return gguf_name, written, lora_name


def ollama_dir(cfg: Config, model_arg: str | None, out: str, type: str = "q4_0",
               progress: Progress | None = None, imatrix: str | None = None, adapter: bool = False) -> OllamaResult:
    """`nekotune export ollama`: a directory with the GGUF and a Modelfile; `adapter`: the base GGUF
    and the adapter as a LoRA GGUF (Modelfile ADAPTER) instead of one merged GGUF."""
    from nekotune.export.gguf import prepare
    from nekotune.export.gguf_meta import adds_special_tokens
    from nekotune.io import atomic_dir, claim_output_dir
    from nekotune.weights import local_model_dir, source_paths

    out_path = Path(out).expanduser()
    if out_path.is_file():
        raise UserError(f"--out {out} is a file; give a directory for the GGUF and the Modelfile")
    source = prepare(cfg, model_arg)
    base_dir = local_model_dir(source.spec.base, source.cfg.model.revision)
    if adapter:
        _adapter_refusal(source, base_dir)
    claim_output_dir(out_path, WRITTEN_BY, source_paths(source.spec, base_dir, model_arg))
    parts = modelfile_parts(source.renderer, adds_special_tokens(source.tokenizer)["bos"])
    name = ollama_name(source.name)
    with atomic_dir(out_path, WRITTEN_BY) as tmp:
        gguf_name, written, lora_name = _write_ggufs(source, tmp, name, type, base_dir, adapter, progress, imatrix)
        (tmp / "Modelfile").write_text(modelfile_text(gguf_name, parts.template, parts.system, parts.stops,
                                                      source.cfg.generate, lora_name), encoding="utf-8")
    return OllamaResult(ExportResult(out_path, written, source.spec.label, out_path / gguf_name), name,
                        out_path / "Modelfile", parts.warning)
