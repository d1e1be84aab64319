"""Chinese for the messages a user reads: errors, warnings, the CLI's help.

Design: nekotune raises English f-strings in some 150 places, each written next to the check
it explains. Rather than turning each into a message id (a second name for every message, and
a catalogue lookup at every raise), the command layer translates the finished English line
when it prints it: `localize("config file x.yaml not found; ...")`. The catalogue is keyed by
the message's *skeleton*, the f-string's literal text with `{}` for each value, exactly as it
is written in the source; tests/test_messages.py reads every f-string in src/nekotune and fails
when a key no longer occurs there, so an English message that changes cannot leave a stale
translation behind. A message the catalogue lacks is printed in English, whole. Values (paths,
keys, numbers) are carried over unchanged; the few values that are themselves English phrases
(where a key came from, a hint) are translated by the FRAGMENTS table.

Why not message ids: they would need every raise site changed (~150 edits across modules
being restructured), and the English text would still be the one the tests and docs quote.
The regex approach is sound here because every message is one line (UserError joins lines)
and the skeletons are literal source text, so a match is exact, not a guess.
"""

from __future__ import annotations

import locale
import os
import re
import sys
from functools import lru_cache

SUPPORTED = ("en", "zh")


def lang() -> str:
    """"zh" or "en": NEKOTUNE_LANG first (zh, zh_CN, en ...), else the locale the user runs
    in: LC_ALL, LC_MESSAGES, LANG in that order (the first one set decides, as in gettext), else
    on Windows the user's UI language."""
    forced = os.environ.get("NEKOTUNE_LANG", "").strip().lower()
    if forced:
        return "zh" if forced.startswith("zh") else "en"
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "").strip()
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    if sys.platform == "win32":
        return "zh" if _windows_is_chinese() else "en"
    return "en"


def _windows_is_chinese() -> bool:
    """The UI language (what the user reads), then the locale ('Chinese (Simplified)_China',
    'zh_CN'); a Chinese Windows usually sets neither LANG nor LC_ALL."""
    try:
        import ctypes

        langid = ctypes.windll.kernel32.GetUserDefaultUILanguage()  # type: ignore[attr-defined]
        if langid & 0x3FF == 0x04:  # LANG_CHINESE, any sublanguage
            return True
    except (AttributeError, OSError):
        pass
    try:
        name = locale.getlocale()[0] or ""
    except ValueError:
        return False
    return name.lower().startswith(("zh", "chinese"))


# Skeleton (the f-string's text, `{}` per value, `{{`/`}}` for literal braces) -> Chinese with
# {0}, {1} ... for the values in the same order.
CATALOGUE: dict[str, str] = {
    # config and command line
    "config file {} not found; give the path of a YAML file (see examples/)":
        "找不到配置文件 {0}；请给出一个 YAML 文件的路径（可参考 examples/）",
    "unknown config key `{}` in {}{}": "{1} 中有未知的配置项 `{0}`{2}",
    "override `{}` is not of the form key=value (for example lora.r=16)":
        "覆盖参数 `{0}` 不是 key=value 的形式（例如 lora.r=16）",
    "{}{}: not valid YAML ({}); fix the syntax": "{0}{1}：不是有效的 YAML（{2}）；请修正语法",
    "{}: not UTF-8 text; save the config as UTF-8": "{0}：不是 UTF-8 文本；请把配置文件另存为 UTF-8 编码",
    "{}: a config must be a mapping of sections (model:, data:, lora:, train:, output:)":
        "{0}：配置文件必须由若干段组成（model:、data:、lora:、train:、output:）",
    "{}: `{}` must be a mapping of keys to values": "{0}：`{1}` 必须是「键: 值」的映射",
    "config key `{}` ({}): {}, got {}": "配置项 `{0}`（{1}）：{2}，实际是 {3}",
    "unexpected argument {}; give a config .yaml file and key=value overrides":
        "多余的参数 {0}；请给出一个 .yaml 配置文件和 key=value 形式的覆盖参数",
    # data
    "data file {} not found; give a .json/.jsonl/.csv/.parquet file, a directory or a Hugging Face dataset id "
    "(owner/name)": "找不到数据文件 {0}；请给出 .json/.jsonl/.csv/.parquet 文件、一个目录，"
                    "或 Hugging Face 数据集 id（owner/name）",
    "{}: directory holds no {} files; point data.path at a data file":
        "{0}：目录里没有 {1} 文件；请让 data.path 指向数据文件",
    "{}: line {}: not valid UTF-8 (byte {}); re-save the file as UTF-8":
        "{0}：第 {1} 行不是有效的 UTF-8（第 {2} 字节）；请把文件另存为 UTF-8 编码",
    "{}: invalid JSON ({} at column {}); fix or delete that line":
        "{0}：JSON 无效（第 {2} 列：{1}）；请修正或删除这一行",
    "{} line {}: invalid JSON ({} at column {}); fix the file (a JSON array of objects, or one object per line as "
    ".jsonl)": "{0} 第 {1} 行：JSON 无效（第 {3} 列：{2}）；请修正文件（JSON 数组，或 .jsonl 每行一个对象）",
    "{}: unsupported file type {}; use one of {}": "{0}：不支持的文件类型 {1}；请使用 {2} 之一",
    "{}: no rows; the file is empty": "{0}：没有任何数据行；文件是空的",
    "{}: field `{}` is missing for format {}; fields found: {}; map columns with data.columns.{}=<your column>":
        "{0}：格式 {2} 需要字段 `{1}`，但没有找到；现有字段：{3}；请用 data.columns.{4}=<你的列名> 映射",
    "{}: field `{}` is empty; fill it in or delete the row (`nekotune data check` lists all such rows)":
        "{0}：字段 `{1}` 是空的；请填写或删除这一行（`nekotune data check` 会列出所有这样的行）",
    "{}: field `{}` must be text, got {}": "{0}：字段 `{1}` 必须是文本，实际是 {2}",
    "{}: mapped column `{}` (for `{}`) is missing; fields found: {}; fix data.columns":
        "{0}：映射的列 `{1}`（对应 `{2}`）不存在；现有字段：{3}；请修正 data.columns",
    "{}: cannot tell the format from fields {}; set data.format (one of {}) and map columns with data.columns "
    "(e.g. data.columns.instruction=question)": "{0}：无法从字段 {1} 判断数据格式；请设置 data.format（{2} 之一），"
                                                "并用 data.columns 映射列名（例如 data.columns.instruction=question）",
    "{}: cannot tell the format from fields {}; set data.format (one of {}) and map columns with data.columns":
        "{0}：无法从字段 {1} 判断数据格式；请设置 data.format（{2} 之一），并用 data.columns 映射列名",
    "{}: `{}` must end with an assistant turn to have something to train on":
        "{0}：`{1}` 必须以 assistant 回复结尾，否则没有可训练的内容",
    "{}: {}[{}] is `{}` but a {} turn was expected; turns must alternate user/assistant":
        "{0}：{1}[{2}] 是 `{3}`，这里应是 {4}；对话必须 user/assistant 交替",
    "{}: no trainable rows left ({} dropped as longer than data.max_seq_len={} or without an answer); raise "
    "data.max_seq_len or use data.truncation=truncate":
        "{0}：没有可训练的数据行了（{1} 行因超过 data.max_seq_len={2} 或没有回答而被丢弃）；"
        "请调大 data.max_seq_len 或设置 data.truncation=truncate",
    # models and devices
    "model path {} not found; check the path or use a hub id like Qwen/Qwen3-1.7B":
        "找不到模型路径 {0}；请检查路径，或使用 Qwen/Qwen3-1.7B 这样的模型 id",
    "model file {} not found": "找不到模型文件 {0}",
    "model {} not found; give a model directory, a config.json or a hub id":
        "找不到模型 {0}；请给出模型目录、config.json 或模型 id",
    "model {} not found": "找不到模型 {0}",
    "{} is not a model directory (no config.json); give an HF model directory, a run directory, an adapter "
    "directory, a .gguf file or a hub id": "{0} 不是模型目录（没有 config.json）；请给出 HF 模型目录、训练输出目录、"
                                           "适配器目录、.gguf 文件或模型 id",
    "cannot load model {} ({})": "无法加载模型 {0}（{1}）",
    "model.quantization={} needs an NVIDIA GPU with CUDA (bitsandbytes); this machine trains on {}: remove "
    "model.quantization (LoRA in bf16/fp32 works here)": "model.quantization={0} 需要支持 CUDA 的 NVIDIA 显卡"
                                                         "（bitsandbytes）；这台机器在 {1} 上训练：请去掉 "
                                                         "model.quantization（这里可以用 bf16/fp32 的 LoRA）",
    "model.quantization needs bitsandbytes: pip install 'nekotune[qlora]' (or bitsandbytes)":
        "model.quantization 需要 bitsandbytes：pip install 'nekotune[qlora]'（或 bitsandbytes）",
    "model.device=cuda but torch sees no CUDA GPU; install a CUDA build of torch (see README) or use "
    "model.device=auto": "设置了 model.device=cuda，但 torch 找不到 CUDA 显卡；请安装 CUDA 版 torch（见 README），"
                         "或使用 model.device=auto",
    "model.device=mps but MPS is not available on this machine; use model.device=auto":
        "设置了 model.device=mps，但这台机器不能用 MPS；请使用 model.device=auto",
    "model.dtype=fp16 on CPU is about 100x slower than fp32; use model.dtype=auto or bf16":
        "在 CPU 上 model.dtype=fp16 比 fp32 慢约 100 倍；请使用 model.dtype=auto 或 bf16",
    "{} needs its own Python code to load its {}{}; nekotune does not run code from model files unless you set "
    "model.trust_remote_code=true yourself (command line or your YAML) after reading that code; a run directory's "
    "config.yaml cannot turn it on":
        "{0} 需要运行它自带的 Python 代码才能加载它的 {1}{2}；除非你读过这些代码后亲自设置 "
        "model.trust_remote_code=true（命令行或你自己的 YAML），nekotune 不会运行模型文件里的代码；"
        "训练输出目录里的 config.yaml 不能打开它",
    "cannot fetch config.json of {} ({}); download it and pass --model path/to/config.json":
        "无法获取 {0} 的 config.json（{1}）；请下载后用 --model path/to/config.json 指定",
    "--fit {}: give a memory size like 8GB or 24000MB (or auto on a GPU machine)":
        "--fit {0}：请给出内存大小，例如 8GB 或 24000MB（有显卡时可用 auto）",
    "--fit auto needs a CUDA GPU; give the budget instead, e.g. --fit 8GB":
        "--fit auto 需要 CUDA 显卡；请直接给出大小，例如 --fit 8GB",
    # training, runs and outputs
    "out of memory with batch_size={}, max_seq_len={}; try train.batch_size={} train.grad_accum={}, "
    "train.grad_checkpointing=true, data.max_seq_len={}{}; `nekotune estimate --fit <memory>` proposes settings "
    "that fit": "内存不足（batch_size={0}，max_seq_len={1}）；可以试试 train.batch_size={2} train.grad_accum={3}、"
                "train.grad_checkpointing=true、data.max_seq_len={4}{5}；`nekotune estimate --fit <内存大小>` "
                "会给出能放下的设置",
    "disk full while writing {}; free some space (nothing already saved was changed) and run the command again":
        "写入 {0} 时磁盘已满；请清理一些空间（已保存的内容都没有改动）后重新运行",
    "disk full while creating {}; free some space and train again": "创建 {0} 时磁盘已满；请清理空间后重新训练",
    "disk full while saving to {}; free space and resume with train.resume=true output.dir={} (last good checkpoint: "
    "{})": "保存到 {0} 时磁盘已满；请清理空间后用 train.resume=true output.dir={1} 继续训练"
           "（最后一个完好的检查点：{2}）",
    "train.resume=true but {}/checkpoints holds no checkpoint; use train.resume=auto to start fresh when there is "
    "none": "设置了 train.resume=true，但 {0}/checkpoints 里没有检查点；用 train.resume=auto 可在没有检查点时从头开始",
    "train.resume=true but no run under {}/ has a checkpoint (runs another process is training are skipped); set "
    "output.dir to the run to resume, or train.resume=false": "设置了 train.resume=true，但 {0}/ 下没有带检查点的训练"
                                                              "（其他进程正在训练的目录会被跳过）；请用 output.dir "
                                                              "指定要继续的训练，或设置 train.resume=false",
    "cannot resume {}: {} was {} and is now {}; use the same config or start a new run (output.dir=...)":
        "无法继续训练 {0}：{1} 原来是 {2}，现在是 {3}；请使用相同的配置，或开始新的训练（output.dir=...）",
    "{} is in use: another nekotune process is training into it (it holds {}); wait until that run ends, or train "
    "into another directory with output.dir=...": "{0} 正在使用中：另一个 nekotune 进程正在往里训练（它持有 {1}）；"
                                                  "请等它结束，或用 output.dir=... 训练到别的目录",
    "cannot create the run directory {} ({}); set output.root or output.dir to a directory you can write":
        "无法创建训练目录 {0}（{1}）；请把 output.root 或 output.dir 设为你有写权限的目录",
    "{} {} is not empty and is not an earlier `{}` output; choose a new or empty directory (nekotune never deletes "
    "what it did not write)": "{0} {1} 不是空目录，也不是之前 `{2}` 的输出；请换一个新的或空的目录"
                              "（nekotune 从不删除不是它写的东西）",
    "{} {} exists and was not written by nekotune; choose a new file name (nekotune never overwrites what it did not "
    "write)": "{0} {1} 已存在且不是 nekotune 写的；请换一个文件名（nekotune 从不覆盖不是它写的东西）",
    "{} {} is not empty and is not a nekotune run; choose a new name (nekotune never writes into folders it did not "
    "create)": "{0} {1} 不是空目录，也不是 nekotune 的训练目录；请换一个名字（nekotune 从不往不是它建的目录里写）",
    "{} {} is inside {}, which this command reads; write the output somewhere outside it":
        "{0} {1} 在本命令要读取的 {2} 里面；请把输出写到它外面",
    "{} {} is {}, which this command reads; write the output somewhere else":
        "{0} {1} 就是本命令要读取的 {2}；请把输出写到别处",
    "{} {} is a file; give a directory": "{0} {1} 是文件；请给出一个目录",
    "cannot listen on {}:{} ({}); pick another --port or stop what uses it":
        "无法监听 {0}:{1}（{2}）；请换一个 --port，或停掉占用它的程序",
    "the web UI needs gradio: pip install 'nekotune[ui]' (or pip install gradio)":
        "网页界面需要 gradio：pip install 'nekotune[ui]'（或 pip install gradio）",
    "the question is empty; pass the question as one argument in quotes": "问题是空的；请用引号把问题作为一个参数传入",
}

# English phrases that arrive as values inside a message (where a key came from, hints).
FRAGMENTS: dict[str, str] = {
    "the command line": "命令行",
    "; did you mean `{}`?": "；是不是想写 `{0}`？",
    "; run `nekotune config show` to list the keys": "；运行 `nekotune config show` 可列出所有配置项",
    ", or model.quantization=4bit on CUDA": "，或在 CUDA 上用 model.quantization=4bit",
    "Input should be greater than {}": "应大于 {0}",
    "Input should be greater than or equal to {}": "应大于等于 {0}",
    "Input should be less than {}": "应小于 {0}",
    "Input should be a valid integer, unable to parse string as an integer": "应为整数",
    "Input should be a valid number, unable to parse string as a number": "应为数字",
    "Input should be a valid boolean, unable to interpret input": "应为 true 或 false",
    "Input should be {}": "应为 {0}",
    "Address already in use": "地址已被占用",
    " at line {}": " 第 {0} 行",
}

LABELS = {"error": "错误", "warning": "警告", "interrupted": "已中断"}

# The CLI's help texts (cli.py's strings, verbatim) -> Chinese; cli.build_parser passes each
# help text through `help_text`.
HELP_ZH: dict[str, str] = {
    "LoRA/QLoRA fine-tuning: data -> train -> chat, serve and GGUF. Every command takes [config.yaml] "
    "[key=value ...].": "LoRA/QLoRA 微调：数据 -> 训练 -> 聊天、服务和 GGUF。"
                        "每个命令都接受 [config.yaml] [key=value ...]。",
    "a config file and/or dotted overrides such as lora.r=16 train.epochs=1":
        "配置文件和/或点号形式的覆盖参数，例如 lora.r=16 train.epochs=1",
    "run dir, adapter dir, HF dir, .gguf or hub id (default: the latest run under outputs/)":
        "训练目录、适配器目录、HF 模型目录、.gguf 文件或模型 id（默认：outputs/ 下最新的一次训练）",
    "address to listen on (default 127.0.0.1: this machine only)": "监听地址（默认 127.0.0.1：只有本机能访问）",
    "also answer requests addressed to NAME (Host header), e.g. mybox.lan; repeatable":
        "也响应发往 NAME 的请求（Host 头），例如 mybox.lan；可重复",
    "print the version": "打印版本号",
    "fine-tune (no arguments: the built-in demo)": "微调（不带参数：运行内置示例）",
    "plain log lines instead of a progress bar": "用普通日志行代替进度条",
    "force the progress bar": "强制显示进度条",
    "skip the before/after answers": "跳过训练前后的回答对比",
    "run on N processes through torchrun": "通过 torchrun 用 N 个进程运行",
    "show the effective config": "显示实际生效的配置",
    "print the effective config as YAML": "以 YAML 打印实际生效的配置",
    "inspect a dataset": "检查数据集",
    "report problems by row before training": "训练前按行报告数据问题",
    "tokenizer to measure lengths with (default: the config's model)": "用来计算长度的分词器（默认：配置里的模型）",
    "interactive streaming chat": "交互式流式聊天",
    "system prompt": "系统提示词",
    "one answer on stdout": "在标准输出打印一个回答",
    "machine-readable output": "机器可读的输出",
    "batched generation for every row of a dataset": "为数据集的每一行批量生成回答",
    "output JSONL": "输出的 JSONL 文件",
    "eval loss, perplexity, BLEU/ROUGE/chrF; on chosen/rejected pairs: held-out reward accuracy and margin "
    "against the run's reference":
        "评估损失、困惑度、BLEU/ROUGE/chrF；对 chosen/rejected 偏好对：留出集上相对参考模型的奖励准确率和间隔",
    "directory for eval_results.json and summary.md": "存放 eval_results.json 和 summary.md 的目录",
    "also evaluate the base model": "同时评估基座模型",
    "rows to generate for the metrics": "用于计算指标的生成行数",
    "loss and perplexity only": "只计算损失和困惑度",
    "HTML/Markdown report of several models side by side": "并排比较多个模型的 HTML/Markdown 报告",
    "comma-separated: base, run dirs, adapters, checkpoints": "逗号分隔：base、训练目录、适配器、检查点",
    "a prompts file (.txt lines, or any dataset)": "提示词文件（.txt 每行一个，或任意数据集）",
    "dataset for per-model eval loss (default: the prompts file)": "计算各模型评估损失的数据集（默认：提示词文件）",
    "merge the adapter into the base model": "把适配器合并进基座模型",
    "merge shard by shard": "逐个分片合并（省内存）",
    "GGUF, Ollama, verify": "GGUF、Ollama、校验",
    "source model to compare with (default: the latest run)": "用来对比的源模型（默认：最新的一次训练）",
    "OpenAI-compatible API": "OpenAI 兼容的 API 服务",
    "require 'Authorization: Bearer KEY'; other users see it in ps: prefer NEKOTUNE_API_KEY":
        "要求 'Authorization: Bearer KEY'；其他用户能在 ps 里看到它：建议用 NEKOTUNE_API_KEY",
    "requests that may wait for a slot; more get 429 with Retry-After (default 64)":
        "可排队等待的请求数；超出的返回 429 和 Retry-After（默认 64）",
    "largest request body, e.g. 8MB or 500KB; larger ones get 413 (default 8MB)":
        "最大请求体，例如 8MB 或 500KB；更大的返回 413（默认 8MB）",
    "comma-separated allowed origins (off by default)": "逗号分隔的允许来源（默认关闭）",
    "web UI (Gradio)": "网页界面（Gradio）",
    "require a login; other users see it in ps: prefer NEKOTUNE_UI_AUTH=USER:PASS":
        "要求登录；其他用户能在 ps 里看到它：建议用 NEKOTUNE_UI_AUTH=USER:PASS",
    "peak training memory before you train": "训练前估算训练的峰值内存",
    "model directory, config.json or hub id": "模型目录、config.json 或模型 id",
    "memory budget like 8GB (or auto) to fit settings into": "内存预算，例如 8GB（或 auto），据此给出能放下的设置",
    "check this machine": "检查这台机器的环境",
}


def _pattern(skeleton: str, fragments: str = "") -> re.Pattern[str]:
    """The skeleton as an anchored regex, one group per value. A value right after another one
    (`in {}{}`: where + hint) cannot be told apart by text alone, so it only takes a known
    fragment (or nothing) and the value before it takes the rest."""
    pieces = skeleton.split("{}")
    literal = [re.escape(p.replace("{{", "{").replace("}}", "}")) for p in pieces]
    out = literal[0]
    for i, piece in enumerate(literal[1:], start=1):
        adjacent = i >= 2 and pieces[i - 1] == ""
        out += (f"((?:{fragments})?)" if adjacent and fragments else "(.*?)") + piece
    return re.compile("^" + out + "$", re.DOTALL)


def _fragment_alternatives() -> str:
    return "|".join(_pattern(k).pattern[1:-1].replace("(.*?)", "(?:.*?)") for k in FRAGMENTS)


@lru_cache(maxsize=None)
def _compiled(table_id: str) -> list[tuple[re.Pattern[str], str]]:
    table = CATALOGUE if table_id == "catalogue" else FRAGMENTS
    # the longest literal first: a specific message wins over a general one that also matches
    ordered = sorted(table.items(), key=lambda kv: -len(kv[0].replace("{}", "")))
    alternatives = _fragment_alternatives() if table_id == "catalogue" else ""
    return [(_pattern(k, alternatives), v) for k, v in ordered]


def _translate(text: str, table_id: str, depth: int) -> str | None:
    for pattern, chinese in _compiled(table_id):
        found = pattern.match(text)
        if found:
            values = [_fragment(v, depth + 1) for v in found.groups()]
            return chinese.format(*values)
    return None


def _fragment(value: str, depth: int) -> str:
    if depth > 3 or not value:
        return value
    return _translate(value, "fragments", depth) or value


def localize(message: str, language: str | None = None) -> str:
    """The message in the user's language; English when the catalogue has no entry for it."""
    if (language or lang()) != "zh":
        return message
    return _translate(message, "catalogue", 0) or message


def label(word: str, language: str | None = None) -> str:
    """"error" -> "错误" for `nekotune: 错误: ...` lines."""
    return LABELS.get(word, word) if (language or lang()) == "zh" else word


def help_text(text: str, language: str | None = None) -> str:
    return HELP_ZH.get(text, text) if (language or lang()) == "zh" else text
