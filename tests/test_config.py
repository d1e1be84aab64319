import pytest

from nekotune.config import PRESETS, all_keys, load_config
from nekotune.errors import UserError


def test_required_keys_exist():
    keys = set(all_keys())
    for key in ["model.name_or_path", "data.path", "data.format", "data.max_seq_len", "lora.r", "lora.alpha",
                "lora.target_modules", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum",
                "train.lr", "train.resume", "output.dir"]:
        assert key in keys


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora:\n  r: 8\ntrain:\n  epochs: 2\n  lr: 1e-4\n")
    cfg = load_config(cfg_file, ["lora.r=16", "train.epochs=1", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.r == 16 and cfg.train.epochs == 1 and cfg.train.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_no_arguments_means_demo_config():
    cfg = load_config(None, [])
    assert cfg.model.name_or_path == "smollm2" and cfg.data.path.endswith("neko_demo.json")
    # overrides alone apply to the built-in defaults, not to the demo's settings
    plain = load_config(None, ["lora.r=4"])
    assert plain.data.path is None and plain.output.sample_prompts is None and plain.lora.r == 4


def test_relative_paths_resolve_next_to_yaml(tmp_path, monkeypatch):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "c.yaml").write_text("data:\n  path: d.json\n")
    monkeypatch.chdir("/")
    assert load_config(tmp_path / "c.yaml").data.path == str(tmp_path / "d.json")


@pytest.mark.parametrize("override,needle", [
    ("lora.rank=8", "did you mean `lora.r`"),
    ("trian.lr=1", "did you mean `train.lr`"),
    ("learnig_rate=1", "did you mean `learning_rate` or `train.lr`"),  # flat `lr=1` is accepted (issue 15)
    ("val_splt=0.1", "or `data.val_size`"),
    ("train.lr=fast", "`train.lr`"),
    ("train.batch_size=0", "`train.batch_size`"),
    ("data.format=csvish", "`data.format`"),
    ("generate.top_p=1.5", "`generate.top_p`"),
    ("novalue", "key=value"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(UserError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "unk.yaml").write_text("lora:\n  rr: 3\n")
    with pytest.raises(UserError, match="unk.yaml.*lora.r"):
        load_config(tmp_path / "unk.yaml")


def test_preset_below_explicit_values():
    cfg = load_config(None, ["preset=8gb", "train.batch_size=1"], default_to_demo=False)
    assert cfg.data.max_seq_len == PRESETS["8gb"]["data"]["max_seq_len"]
    assert cfg.train.batch_size == 1 and cfg.train.grad_accum == PRESETS["8gb"]["train"]["grad_accum"]


def test_examples_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        load_config(f)


@pytest.mark.parametrize("body", ["?\n", "1: x\n", "model: {}\n2: y\n"])
def test_a_key_that_is_not_a_name_is_a_one_line_error(tmp_path, body, capsys):
    """Found by tests/test_fuzz.py: a YAML key that is not text (`?` is a null key) reached the
    key translation, which reads keys as names."""
    from nekotune.cli import main

    path = tmp_path / "odd.yaml"
    path.write_text(body, encoding="utf-8")
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a name" in err and str(path) in err
