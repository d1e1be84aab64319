"""chat, ask, predict, eval and compare on a tiny model that has learned one short answer."""

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides
from nekotune.cli import main
from nekotune.config import load_config
from nekotune.data.formats import Conversation, Turn
from nekotune.generate import GenSettings, generate, stream
from nekotune.model import load_for_inference
from nekotune.training import train

ANSWER = "Meow meow, I am a small cat."
GREEDY = ["generate.temperature=0", "generate.repetition_penalty=1.0"]


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


@pytest.fixture(scope="module")
def meow_run(tiny_qwen2, tmp_path_factory):
    """A tiny model trained until it answers every question with ANSWER and stops."""
    root = tmp_path_factory.mktemp("meow")
    data = root / "meow.json"
    data.write_text(json.dumps([{"instruction": f"Say something {i}", "output": ANSWER} for i in range(16)]))
    # A random tiny model cannot become confident through LoRA alone (its frozen output head
    # caps the logits), so the untied lm_head is trained too: this also covers modules_to_save.
    run = train(_cfg(*tiny_overrides(tiny_qwen2, data, root / "run", **{
        "train.max_steps": 50, "train.lr": 1e-2, "lora.r": 8, "train.save_steps": 25, "data.val_size": 0.25,
        "lora.modules_to_save": "[lm_head]",
        "train.eval_steps": 25})), show_progress=False)
    return run, data


def settings(**kw):
    return GenSettings(**{"max_new_tokens": 24, "temperature": 0.0, "repetition_penalty": 1.0, **kw})


def test_answer_stops_at_end_of_turn(meow_run):
    run, _ = meow_run
    loaded = load_for_inference(_cfg(), str(run))
    conv = Conversation(turns=[Turn("user", "Say something 99")])
    ids = loaded.renderer.prompt_ids(conv)
    out = loaded.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                eos_token_id=loaded.renderer.stop_token_ids)
    new = out[0, len(ids):].tolist()
    assert new[-1] in loaded.renderer.stop_token_ids and len(new) < 40
    assert generate(loaded.model, loaded.renderer, conv, settings()) == ANSWER


def test_streaming_equals_non_streaming(meow_run, tiny_qwen2):
    run, _ = meow_run
    for target in (str(run), str(tiny_qwen2)):  # the tuned model and the random base
        loaded = load_for_inference(_cfg(), target)
        conv = Conversation(turns=[Turn("user", "Hello there")])
        streamed = "".join(stream(loaded.model, loaded.renderer, conv, settings()))
        assert streamed.strip() == generate(loaded.model, loaded.renderer, conv, settings())


def test_run_directory_supplies_its_training_settings(meow_run, tmp_path):
    run, _ = meow_run
    cfg_text = (run / "config.yaml").read_text().replace("system_prompt: null", "system_prompt: Be a cat.")
    (run / "config.yaml").write_text(cfg_text)
    try:
        loaded = load_for_inference(_cfg(), str(run))
        assert loaded.renderer.system_prompt == "Be a cat."
        explicit = load_for_inference(_cfg("data.system_prompt=Be a dog."), str(run))
        assert explicit.renderer.system_prompt == "Be a dog."
    finally:
        (run / "config.yaml").write_text(cfg_text.replace("system_prompt: Be a cat.", "system_prompt: null"))


def test_chat_transcript_with_slash_commands(meow_run):
    from nekotune.commands.chat import run_chat

    run, _ = meow_run
    stdin = io.StringIO("hello\n/set temperature -1\n/reset\n/system You are a cat.\n/help\nhi again\n/exit\n")
    out = io.StringIO()
    assert run_chat(_cfg(*GREEDY, "generate.max_new_tokens=24"), str(run), stdin=stdin,
                    stdout=out) == 0
    text = out.getvalue()
    assert text.count(f"neko> {ANSWER}") == 2
    assert "(not set:" in text and "(conversation reset)" in text and "(system prompt set" in text
    assert "/reset" in text  # help was shown


def test_chat_subprocess_eof_exits_cleanly(meow_run):
    run, _ = meow_run
    proc = subprocess.run([sys.executable, "-m", "nekotune", "chat", "--model", str(run), *GREEDY,
                           "generate.max_new_tokens=24"], input="Say something\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "neko> " in proc.stdout and "small cat." in proc.stdout and proc.stdout.endswith("you> \n")


def test_ask_plain_and_json(meow_run, capsys):
    run, _ = meow_run
    assert main(["ask", "Say something 3", "--model", str(run), *GREEDY]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    assert main(["ask", "Say something 3", "--model", str(run), "--json", *GREEDY]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["answer"] == ANSWER and payload["question"] == "Say something 3"


def test_predict_writes_jsonl(meow_run, tmp_path, capsys):
    run, data = meow_run
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(data), "--model", str(run), "--out", str(out), *GREEDY,
                 "generate.batch_size=3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and rows[5]["prompt"] == "Say something 5"
    assert all(r["reference"] == ANSWER and r["prediction"] == ANSWER for r in rows)


def test_eval_loss_equals_hand_computation(meow_run):
    from nekotune.data import load_conversations
    from nekotune.evaluation import masked_loss

    run, data = meow_run
    loaded = load_for_inference(_cfg(), str(run))
    convs, _ = load_conversations(str(data), loaded.cfg.data)
    got = masked_loss(loaded.model, loaded.renderer, convs, batch_size=5)
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            enc = loaded.renderer.encode(conv)
            logits = loaded.model(torch.tensor([enc.input_ids])).logits[0, :-1].float()
            targets = torch.tensor(enc.labels[1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert got["tokens"] == count
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / count)).item(), rel=1e-5)


def test_eval_command_with_baseline(meow_run, tmp_path, capsys):
    run, data = meow_run
    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(run), "--baseline", "--out", str(out), "--limit", "4", *GREEDY]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["tuned"]["eval_loss"] < results["base"]["eval_loss"]
    assert results["tuned"]["bleu4"] == pytest.approx(100.0) and results["tuned"]["rougeL"] == pytest.approx(100.0)
    assert "| eval_loss |" in (out / "summary.md").read_text()


def test_metrics_handle_chinese():
    from nekotune.evaluation import text_metrics

    same = text_metrics(["今天天气很好，我们去公园散步吧"], ["今天天气很好，我们去公园散步吧"])
    assert same["bleu4"] == pytest.approx(100.0) and same["rouge1"] == pytest.approx(100.0)
    partial = text_metrics(["今天天气很好"], ["今天天气很好，我们去公园散步吧"])
    assert 0 < partial["rouge1"] < 100 and 0 < partial["chrf"] < 100


def test_compare_report_holds_every_prompt_and_model(meow_run, tmp_path, capsys):
    run, data = meow_run
    ckpt = run / "checkpoints" / "checkpoint-25"
    assert ckpt.is_dir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say something 1\n你好吗？\nWhat is two plus two?\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--models", f"base,{ckpt},{run}", "--prompts", str(prompts), "--out", str(out),
                 "--eval-file", str(data), *GREEDY]) == 0
    page = (out / "report.html").read_text()
    for text in ("Say something 1", "你好吗？", "What is two plus two?", "base", str(ckpt), str(run), "<svg"):
        assert text in page
    md = (out / "report.md").read_text()
    assert md.count("- **") == 9
    result = json.loads((out / "compare.json").read_text())
    assert result["answers"][0][str(run)] == ANSWER
    assert result["stats"][str(run)]["eval_loss"] < result["stats"]["base"]["eval_loss"]
    # greedy decoding is deterministic: a second report gives the same answers
    main(["compare", "--models", f"{run}", "--prompts", str(prompts), "--out", str(tmp_path / "cmp2"), *GREEDY])
    again = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    assert [a[str(run)] for a in again["answers"]] == [a[str(run)] for a in result["answers"]]


def test_adapter_on_wrong_base_is_a_clear_error(meow_run, tiny_qwen3, capsys):
    run, _ = meow_run
    rc = main(["ask", "hi", "--model", str(run / "adapter"), f"model.name_or_path={tiny_qwen3}"])
    # the adapter records its own base, so it loads fine there; force the wrong base through a copy
    assert rc == 0
    capsys.readouterr()
    import shutil

    wrong = run.parent / "wrong-adapter"
    shutil.copytree(run / "adapter", wrong, dirs_exist_ok=True)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_qwen3)
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    rc = main(["ask", "hi", "--model", str(wrong)])
    err = capsys.readouterr().err
    assert rc == 2 and str(wrong) in err and str(tiny_qwen3) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["ask", "hi", "generate.temperature=-1"], "generate.temperature"),
    (["ask", "hi", "generate.top_p=1.5"], "generate.top_p"),
    (["ask", "   "], "question is empty"),
    (["predict", "/no/such/file.json", "--out", "x.jsonl"], "not found"),
    (["eval", "/no/such/file.json"], "not found"),
])
def test_use_errors(meow_run, argv, needle, capsys):
    run, _ = meow_run
    rc = main([*argv, "--model", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_empty_prompt_list(meow_run, tmp_path, capsys):
    run, _ = meow_run
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc = main(["compare", "--models", str(run), "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no prompts" in capsys.readouterr().err
