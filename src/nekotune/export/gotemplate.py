"""The subset of Go's text/template that nekotune's Modelfiles use: text, {{ pipeline }},
if / else if / else / end, range (with $i, $x :=), $var :=, and the functions eq, ne, not, and,
or, len, slice, with Go's trim markers and truth rules.

Ollama renders a Modelfile's TEMPLATE with Go's text/template; the Ollama export renders the
TEMPLATE it writes with this interpreter to check it against the chat template (ollama.py).
Written here because no Python package implements Go templates, and Ollama itself is not a
dependency (nor is Go).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable


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


FUNCS: dict[str, Callable[..., Any]] = {
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
    if m is None:
        raise GoTemplateError(f"cannot parse {{{{ range {expr} }}}}")
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
