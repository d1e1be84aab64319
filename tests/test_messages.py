"""The Chinese message catalogue: every entry is a message nekotune really raises, and
translates it; the language comes from NEKOTUNE_LANG or the locale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from nekotune import messages
from nekotune.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nekotune"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _skeleton(node: ast.AST) -> str | None:
    """An f-string's text with `{}` for each value (`{{`/`}}` for literal braces)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.replace("{", "{{").replace("}", "}}")
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value.replace("{", "{{").replace("}", "}}") if isinstance(v, ast.Constant) else "{}"
                       for v in node.values)
    return None


def _source_skeletons(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = _skeleton(node)
            if text:
                found.add(text)
                found.add(node.value if isinstance(node, ast.Constant) else text)
    return found


SKELETONS = _source_skeletons(p for p in PACKAGE.rglob("*.py") if p.name != "messages.py")


@pytest.mark.parametrize("skeleton", sorted(messages.CATALOGUE))
def test_every_entry_is_a_message_in_the_source(skeleton: str):
    assert skeleton in SKELETONS, "this English message is no longer in src/nekotune: update or remove the entry"


@pytest.mark.parametrize("skeleton", sorted(messages.CATALOGUE))
def test_every_entry_translates_its_message(skeleton: str):
    """Filled with distinct values, the English message comes back in Chinese with the values
    in the places the translation gives them (and no other entry takes it)."""
    pieces = skeleton.split("{}")
    # a value right after another one is told apart only when it is a known fragment: leave it empty
    values = ["" if i >= 1 and pieces[i] == "" else f"<v{i}>" for i in range(len(pieces) - 1)]
    english = skeleton.replace("{{", "\0").replace("}}", "\1").replace("{}", "%s") % tuple(values)
    english = english.replace("\0", "{").replace("\1", "}")
    chinese = messages.localize(english, "zh")
    assert chinese == messages.CATALOGUE[skeleton].format(*values)
    assert CJK.search(chinese) and all(v in chinese for v in values if v)
    assert messages.localize(english, "en") == english


def test_the_fragments_exist_in_the_source():
    ours = [k for k in messages.FRAGMENTS if not k.startswith(("Input should be", "Address already"))]
    for fragment in ours:
        assert fragment in SKELETONS, fragment


def test_help_texts_are_the_cli_strings():
    cli = _source_skeletons([PACKAGE / "cli.py"])
    for text in messages.HELP_ZH:
        assert text in cli, text
    assert all(CJK.search(zh) for zh in messages.HELP_ZH.values())
    assert messages.help_text("print the version", "zh") == "打印版本号"
    assert messages.help_text("no such help", "zh") == "no such help"


def _raised(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_real_errors_translate(tmp_path: Path):
    from nekotune.config import load_config
    from nekotune.data.formats import to_conversations
    from nekotune.data.sources import Row, read_rows

    missing = _raised(load_config, str(tmp_path / "nope.yaml"))
    assert messages.localize(missing, "zh") == (f"找不到配置文件 {tmp_path / 'nope.yaml'}；"
                                                "请给出一个 YAML 文件的路径（可参考 examples/）")
    unknown = _raised(load_config, None, ["train.learning_rat=1"], default_to_demo=False)
    zh = messages.localize(unknown, "zh")
    assert zh.startswith("命令行 中有未知的配置项 `train.learning_rat`；是不是想写 `") and zh.endswith("`？")
    bad = _raised(load_config, None, ["train.batch_size=0"], default_to_demo=False)
    assert messages.localize(bad, "zh") == "配置项 `train.batch_size`（命令行）：应大于 0，实际是 0"
    empty = _raised(to_conversations, [Row({"instruction": "q", "output": " "}, "d.json row 3")], "auto")
    assert messages.localize(empty, "zh").startswith("d.json row 3：字段 `output` 是空的")
    field = _raised(to_conversations, [Row({"question": "q"}, "d.json row 1")], "alpaca")
    assert "格式 alpaca 需要字段" in messages.localize(field, "zh")
    unknown_format = _raised(to_conversations, [Row({"foo": 1}, "d.json row 1")], "auto")
    assert messages.localize(unknown_format, "zh").startswith("d.json row 1：无法从字段 foo 判断数据格式")
    nofile = _raised(read_rows, str(tmp_path / "x.json"))
    assert messages.localize(nofile, "zh").startswith(f"找不到数据文件 {tmp_path / 'x.json'}")


def test_adjacent_values_split_on_fragments(tmp_path: Path):
    from nekotune.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n", encoding="utf-8")
    text = _raised(load_config, str(bad))
    assert " at line " in text
    assert messages.localize(text, "zh").startswith(f"{bad} 第 ")


def test_untranslated_messages_stay_english_whole():
    assert messages.localize("something nobody wrote a translation for", "zh") == \
        "something nobody wrote a translation for"


@pytest.mark.parametrize("env, expected", [
    ({"NEKOTUNE_LANG": "zh"}, "zh"), ({"NEKOTUNE_LANG": "zh_CN"}, "zh"),
    ({"NEKOTUNE_LANG": "en", "LANG": "zh_CN"}, "en"),
    ({"LANG": "zh_CN.UTF-8"}, "zh"), ({"LANG": "zh_TW.Big5"}, "zh"), ({"LANG": "en_US.UTF-8"}, "en"),
    ({"LC_ALL": "en_US.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),  # the first one set decides, as in gettext
    ({"LC_MESSAGES": "zh_CN.UTF-8", "LANG": "en_US"}, "zh"), ({}, "en"),
])
def test_lang(monkeypatch, env: dict, expected: str):
    for var in ("NEKOTUNE_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert messages.lang() == expected
    assert messages.label("error") == ("错误" if expected == "zh" else "error")


def test_lang_on_windows_reads_the_locale(monkeypatch):
    for var in ("NEKOTUNE_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(messages.sys, "platform", "win32")
    monkeypatch.setattr(messages.locale, "getlocale", lambda: ("Chinese (Simplified)_China", "936"))
    assert messages.lang() == "zh"  # ctypes.windll is absent here: the locale decides
    monkeypatch.setattr(messages.locale, "getlocale", lambda: ("English_United States", "1252"))
    assert messages.lang() == "en"
