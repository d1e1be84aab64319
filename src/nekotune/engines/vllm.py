"""`nekotune serve --engine vllm`: the `vllm serve` command that serves a run the way nekotune does.

vLLM pins its own CUDA torch, so it never goes into nekotune's environment: nekotune starts an
external `vllm` executable. The command carries what `nekotune serve` would apply:
- the base model, served under the same names (base-<dir> and "base"), and each adapter with
  `--enable-lora` / `--lora-modules` (JSON form: a path may hold '=' or ',');
- the chat template the run trained with, its default system prompt baked in (vLLM has no
  setting for one), and enable_thinking as a default template argument;
- `--generation-config vllm`, so a model's generation_config.json does not change the defaults
  behind nekotune's back;
- the bind address, and the API key in the environment (VLLM_API_KEY), never on the command
  line, where `ps` shows it to every user;
- a middleware (engines/vllm_guard.py, loaded by `--middleware`) with serve/guard.py's Host and
  Origin rules and the key on every path: vLLM's own key check covers /v1, /v2 and /inference only.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nekotune.errors import UserError

# vllm/config/lora.py: MaxLoRARanks
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GUARD = "nekotune.engines.vllm_guard.Guard"
# What vLLM's PEFTHelper refuses, or (rank/alpha patterns) does not read and would silently ignore.
REFUSED_KEYS = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
                "alpha_pattern": "alpha_pattern"}


@dataclass(frozen=True)
class VllmLaunch:
    argv: list[str]
    env: dict[str, str]  # to add to the environment of the vllm process

    def shell(self) -> str:
        """The equivalent command to print; the key shown as a variable, never its value."""
        shown = {k: ("$NEKOTUNE_API_KEY" if k == "VLLM_API_KEY" else v) for k, v in self.env.items()}
        prefix = " ".join(f"{k}={shlex.quote(v) if not v.startswith('$') else v}" for k, v in shown.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def check_adapter(name: str, path: str | Path) -> dict:
    """The adapter's config, or a one-line refusal of what vLLM cannot serve as it was trained."""
    path = Path(path)
    where = path / "adapter_config.json"
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--adapter {name}: cannot read {where} ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--adapter {name}: {where}: peft_type {config.get('peft_type')} is not LoRA; vLLM serves "
                        f"LoRA adapters only (nekotune merge it and serve the merged directory)")
    for key, what in REFUSED_KEYS.items():
        if config.get(key):
            raise UserError(f"--adapter {name}: {where}: vLLM does not serve {what} adapters as trained; "
                            f"nekotune merge it and serve the merged directory")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"--adapter {name}: {path} has no adapter_model.safetensors; nekotune serves adapters "
                        f"from safetensors only")
    return config


def max_lora_rank(configs: Sequence[dict]) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that fits every adapter."""
    ranks = [int(c.get("r", 8)) for c in configs]
    ranks += [int(v) for c in configs for v in (c.get("rank_pattern") or {}).values()]
    need = max(ranks, default=8)
    for allowed in LORA_RANKS:
        if allowed >= need:
            return allowed
    raise UserError(f"LoRA rank {need} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]}); "
                    f"merge the adapter and serve the merged directory")


def baked_template(template: str, system_prompt: str | None) -> str:
    """`template` with nekotune's default system prompt added when a request sends none, as
    Renderer.prompt_text does (Conversation.messages(default_system))."""
    if not system_prompt:
        return template
    literal = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
            "{%- endif %}" + template)


def guard_pythonpath() -> Path:
    """A directory holding only a link to the nekotune package, for the vllm process's PYTHONPATH,
    so that it can import the guard without seeing the rest of nekotune's environment."""
    import nekotune
    from nekotune.model import cache_dir

    package = Path(nekotune.__file__).resolve().parent
    root = cache_dir() / "vllm" / "pythonpath"
    link = root / "nekotune"
    root.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != package:
        link.unlink()
    if not link.exists():
        link.symlink_to(package, target_is_directory=True)
    return root


def vllm_command(base: str, served_name: str, adapters: Sequence[tuple[str, str | Path]], chat_template: str | Path,
                 *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto", max_model_len: int | None = None,
                 api_key: str | None = None, allow_hosts: Sequence[str] = (), cors: Sequence[str] = (),
                 enable_thinking: bool | None = None, max_num_seqs: int | None = None, executable: str = "vllm",
                 guard_path: str | Path | None = None) -> VllmLaunch:
    """`vllm serve` for a base model (local directory or hub id) and its adapters [(name, directory)]."""
    from nekotune.serve.guard import host_policy
    from nekotune.serve.pool import BASE_ALIAS

    if dtype not in DTYPES:
        raise UserError(f"model.dtype {dtype} is not one of {', '.join(DTYPES)} for vLLM")
    host_policy(host, allow_hosts, cors)  # a bad --allow-host is refused here, as by nekotune serve
    argv = [executable, "serve", str(base), "--served-model-name", served_name, BASE_ALIAS,
            "--host", host, "--port", str(port), "--dtype", DTYPES[dtype],
            "--chat-template", str(chat_template), "--generation-config", "vllm",
            "--allowed-origins", json.dumps(list(cors))]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if max_num_seqs:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    if enable_thinking is not None:
        argv += ["--default-chat-template-kwargs", json.dumps({"enable_thinking": enable_thinking})]
    if adapters:
        configs = [check_adapter(name, path) for name, path in adapters]
        modules = [json.dumps({"name": name, "path": str(Path(path).resolve()), "base_model_name": served_name})
                   for name, path in adapters]
        argv += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank",
                 str(max_lora_rank(configs)), "--lora-modules", *modules]
    if api_key:
        argv += ["--disable-fastapi-docs"]  # as nekotune serve: no schema for those without the key
    argv += ["--middleware", GUARD]
    env = {"NEKOTUNE_GUARD_BIND": host, "NEKOTUNE_GUARD_ALLOW_HOSTS": ",".join(allow_hosts),
           "NEKOTUNE_GUARD_CORS": ",".join(cors)}
    if guard_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard_path), os.environ.get("PYTHONPATH", "")) if p)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return VllmLaunch(argv, env)


def write_chat_template(template: str, system_prompt: str | None, out: str | Path) -> Path:
    """The template file `--chat-template` reads (a file: vLLM takes single-line templates inline only)."""
    from nekotune.io import atomic_write_text

    out = Path(out)
    atomic_write_text(out, baked_template(template, system_prompt))
    return out


def vllm_launch(cfg, model_arg: str | None, adapters: Sequence[tuple[str, str]] = (), *, host: str = "127.0.0.1",
                port: int = 8000, api_key: str | None = None, allow_hosts: Sequence[str] = (),
                cors: Sequence[str] = (), max_concurrency: int | None = None,
                executable: str | None = None) -> VllmLaunch:
    """The `vllm serve` command for what `nekotune serve MODEL --adapter NAME=PATH ...` serves: the
    same base, names (base-<dir>, "base", the run's and each --adapter's), chat template and system
    prompt, and the key and host rules. Writes only the template file (nekotune's cache)."""
    import hashlib

    from nekotune.data.render import Renderer
    from nekotune.model import cache_dir, load_tokenizer, resolve_source
    from nekotune.serve.pool import adapter_sources, safe_name

    spec, served = resolve_source(cfg, model_arg)
    named = adapter_sources(spec, list(adapters), cfg.output.root)
    renderer = Renderer.from_config(load_tokenizer(spec, served.model), served.data)
    baked = baked_template(renderer.template, served.data.system_prompt)
    template = cache_dir() / "vllm" / f"template-{hashlib.sha256(baked.encode()).hexdigest()[:16]}.jinja"
    if not template.is_file():
        write_chat_template(renderer.template, served.data.system_prompt, template)
    return vllm_command(spec.base, safe_name(f"base-{Path(spec.base.rstrip('/')).name}"),
                        [(name, aspec.adapter or "") for name, aspec in named], template, host=host, port=port,
                        dtype=served.model.dtype, api_key=api_key, allow_hosts=allow_hosts, cors=cors,
                        enable_thinking=served.data.enable_thinking, max_num_seqs=max_concurrency,
                        executable=executable or "vllm", guard_path=guard_pythonpath())


def run_vllm(launch: VllmLaunch) -> int:
    """Start vLLM's server and wait for it; Ctrl-C reaches it too (same process group), and its exit
    code is the command's."""
    import subprocess

    try:
        return subprocess.call(launch.argv, env={**os.environ, **launch.env})
    except OSError as exc:
        raise UserError(f"cannot start {launch.argv[0]} ({exc.strerror}); check NEKOTUNE_VLLM or PATH") from None
