"""Ollama export: a directory with the GGUF and a Modelfile whose TEMPLATE renders what the
model was trained on.

Ollama does not run Jinja chat templates; it runs Go templates. The TEMPLATE is written per
template family (ChatML, Qwen3, Llama 3), with the pieces that vary - the generation prompt (Qwen3's
empty think block), the default system prompt, the BOS text - measured by rendering probe
conversations with nekotune's Renderer. The result is then checked: the Go template, rendered by
`render_go_template` below (the subset of Go template syntax emitted here) for a few
conversations as Ollama would, must equal the chat template's rendering. A mismatch is reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nekotune.errors import UserError

PROBE = "nekotune-probe-{}"
WRITTEN_BY = "nekotune export ollama"  # the marker of an Ollama directory (nekotune.io)


# -- Go template subset: text, {{ pipeline }}, if/else if/else/end, range, $var := ---------------
class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], with Go's trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = source[pos:]
    parts.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return [p for p in parts if p != ("text", "")]


def _parse(parts: list, i: int = 0, stop: tuple = ()) -> tuple[list, int, str]:
    """Nodes up to one of the `stop` keywords; returns (nodes, index of the stopper, its body)."""
    nodes: list = []
    while i < len(parts):
        kind, body = parts[i]
        word = body.split(None, 1)[0] if kind == "action" and body else ""
        if kind == "text":
            nodes.append(("text", body))
        elif word in ("end", "else"):
            if word not in stop:
                raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
            return nodes, i, body
        elif word in ("if", "range"):
            node, i = _parse_block(parts, i, word, body[len(word):].strip())
            nodes.append(node)
            continue
        else:
            nodes.append(("action", body))
        i += 1
    if stop:
        raise GoTemplateError("a block has no {{ end }}")
    return nodes, i, ""


def _parse_block(parts: list, i: int, word: str, expr: str) -> tuple[tuple, int]:
    body, i, stopped = _parse(parts, i + 1, stop=("end", "else"))
    otherwise: list = []
    if stopped.startswith("else if"):  # an if nested in the else branch, sharing this block's end
        nested, i = _parse_block(parts, i, "if", stopped[len("else if"):].strip())
        return (word, expr, body, [nested]), i
    if stopped == "else":
        otherwise, i, stopped = _parse(parts, i + 1, stop=("end",))
    return (word, expr, body, otherwise), i + 1


_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr)


class _Scope:
    def __init__(self, dot, root, variables: dict):
        self.dot, self.root, self.vars = dot, root, variables

    def value(self, token: str):
        if token.startswith('"'):
            return json.loads(token)
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token.startswith("$"):
            name, _, path = token.partition(".")
            if name not in self.vars:
                raise GoTemplateError(f"undefined variable {name}")
            return _field(self.vars[name], path)
        if token.startswith("."):
            return _field(self.dot, token[1:])
        raise GoTemplateError(f"unknown value {token}")


def _field(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _truth(value) -> bool:
    """Go's truth: false, 0, nil and empty strings/lists are false."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    return len(value) > 0 if hasattr(value, "__len__") else True


FUNCS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "and": lambda *xs: next((x for x in xs if not _truth(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truth(x)), xs[-1]),
    "len": len,
    "slice": lambda x, i=0, j=None: x[i:j],
}


def _eval(tokens: list[str], scope: _Scope):
    func = FUNCS.get(tokens[0]) if tokens else None
    args, i = [], 1 if func else 0
    while i < len(tokens):
        if tokens[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(_eval(tokens[i + 1:j - 1], scope))
            i = j
        else:
            args.append(scope.value(tokens[i]))
            i += 1
    if func:
        return func(*args)
    if len(args) != 1:
        raise GoTemplateError(f"cannot evaluate {' '.join(tokens)}")
    return args[0]


def _run(nodes: list, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            _action(node[1], scope, out)
        elif node[0] == "if":
            _, expr, body, otherwise = node
            branch = body if _truth(_eval(_tokens(expr), scope)) else otherwise
            _run(branch, _Scope(scope.dot, scope.root, dict(scope.vars)), out)
        else:
            _range(node, scope, out)


def _action(body: str, scope: _Scope, out: list[str]) -> None:
    assignment = re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", body, re.S)
    if assignment:
        scope.vars[assignment.group(1)] = _eval(_tokens(assignment.group(2)), scope)
        return
    value = _eval(_tokens(body), scope)
    out.append("" if value is None else str(value))


def _range(node: tuple, scope: _Scope, out: list[str]) -> None:
    _, expr, body, otherwise = node
    m = re.fullmatch(r"(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*|(\$\w+)\s*:=\s*)?(.+)", expr, re.S)
    items = _eval(_tokens(m.group(4)), scope) or []
    if not items:
        _run(otherwise, scope, out)
    for index, item in enumerate(items):
        variables = dict(scope.vars)
        if m.group(1):
            variables[m.group(1)], variables[m.group(2)] = index, item
        elif m.group(3):
            variables[m.group(3)] = item
        _run(body, _Scope(item, scope.root, variables), out)


def render_go_template(template: str, data: dict) -> str:
    """Render the subset of Go's text/template that the Modelfiles written here use."""
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, _Scope(data, data, {"$": data}), out)
    return "".join(out)


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


def probe_template(renderer, family: str) -> Probe:
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


def system_for_modelfile(renderer, probe: Probe) -> str | None:
    return renderer.system_prompt or probe.default_system


def probe_conversations(system: str | None) -> list[list[dict]]:
    one = [{"role": "user", "content": "Hello!"}]
    two = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, nya~"},
           {"role": "user", "content": "And 3+3?"}]
    convs = [one, two]
    if system:
        convs.append([{"role": "system", "content": "Answer briefly."}] + two)
    return convs


def expected_prompt(renderer, messages: list[dict], bos_stripped: str) -> str:
    """What transformers feeds the model: the renderer's prompt with nekotune's system prompt."""
    if renderer.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": renderer.system_prompt}] + messages
    text = renderer.render(messages, add_generation_prompt=True)
    return text[len(bos_stripped):] if bos_stripped and text.startswith(bos_stripped) else text


def check_template(template: str, renderer, system: str | None, bos_stripped: str) -> str | None:
    """None when the Go template reproduces the chat template; else a description of the first difference."""
    for messages in probe_conversations(system):
        want = expected_prompt(renderer, messages, bos_stripped)
        got = render_go_template(template, ollama_data(messages, system))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return f"at character {at}: Ollama {got[at:at + 40]!r} vs transformers {want[at:at + 40]!r}"
    return None


# -- the Modelfile ---------------------------------------------------------------------------
def stop_texts(renderer) -> list[str]:
    tok = renderer.tokenizer
    texts = [renderer.eot_text] + [tok.convert_ids_to_tokens(i) for i in renderer.stop_token_ids]
    return list(dict.fromkeys(t for t in texts if t))


def quote(text: str) -> str:
    if '"""' in text:
        raise UserError('the chat template or system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str | None, system: str | None, stops: list[str], gen_cfg) -> str:
    lines = [f"FROM ./{gguf_name}"]
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


def modelfile_parts(renderer, runtime_adds_bos: bool) -> ModelfileParts:
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


def ollama_command(cfg, model_arg: str | None, out: str, type: str = "q4_0") -> Path:
    from rich.console import Console

    from nekotune.export.gguf import adds_special_tokens, export_gguf, file_size, prepare
    from nekotune.io import atomic_dir, claim_output_dir
    from nekotune.merge import local_model_dir, source_paths

    console = Console(stderr=True)
    out_path = Path(out).expanduser()
    if out_path.is_file():
        raise UserError(f"--out {out} is a file; give a directory for the GGUF and the Modelfile")
    source = prepare(cfg, model_arg)
    base_dir = local_model_dir(source.spec.base, source.cfg.model.revision)
    claim_output_dir(out_path, WRITTEN_BY, source_paths(source.spec, base_dir, model_arg))
    parts = modelfile_parts(source.renderer, adds_special_tokens(source.tokenizer)["bos"])
    name = ollama_name(source.name)
    with atomic_dir(out_path, WRITTEN_BY) as tmp:
        written = export_gguf(source, tmp / f"{name}-{type}.gguf", type, console)
        gguf_name = f"{name}-{written}.gguf"
        if written != type:
            (tmp / f"{name}-{type}.gguf").rename(tmp / gguf_name)
        (tmp / "Modelfile").write_text(modelfile_text(gguf_name, parts.template, parts.system, parts.stops,
                                                      source.cfg.generate), encoding="utf-8")
    if parts.warning:
        console.print(f"[yellow]warning:[/] {parts.warning}")
    console.print(f"wrote {out_path}/Modelfile and {gguf_name} ({written}, {file_size(out_path / gguf_name)})",
                  soft_wrap=True)
    console.print("create the Ollama model with:")
    console.print(f"  ollama create {name} -f {out_path / 'Modelfile'}", soft_wrap=True, markup=False)
    return out_path
