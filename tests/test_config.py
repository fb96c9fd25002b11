import pytest

from poetry.config import Config, ConfigError, load_config, save_config

from conftest import ROOT


def test_overrides_are_typed():
    config = load_config(None, ["train.lr=5e-5", "train.epochs=2", "lora.target_modules=[q_proj, v_proj]",
                                "model.path=/models/x", "eval.bertscore_model=", "train.cpu=true"])
    assert config.train.lr == 5e-5 and config.train.epochs == 2 and config.train.cpu is True
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.eval.bertscore_model == ""


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  micro_batch_size: 2\nmodel:\n  path: /m\n")
    config = load_config(path, ["train.micro_batch_size=8"])
    assert config.train.lr == 1e-3 and config.train.micro_batch_size == 8 and config.model.path == "/m"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'lr'?); valid keys: seed, epochs"),
    ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.precision=fp8", "train.precision: 'fp8' is not valid; choose one of auto, fp32, bf16, fp16"),
    ("train.epochs=two", "train.epochs: expected int, got 'two'"),
    ("train.cpu=3", "train.cpu: expected bool, got 3"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be at least 1, got 0"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s: must be at least 1, got 0"),
    ("data.val_fraction=1.5", "data.val_fraction: must be in [0, 1)"),
    ("data.folds=1", "data.folds: must be 0 (off) or at least 2, got 1"),
    ("data.fold=2", "data.fold=2: a held-out fold needs data.folds (at least 2)"),
    ("eval.draft_tokens=-1", "eval.draft_tokens: must be 0 (off) or positive, got -1"),
    ("eval.choose_prior_weight=-0.5", "eval.choose_prior_weight: must be in [0, 2] (0: likelihood_norm; 1: PMI)"),
    ("eval.choose_channel_weight=2.5", "eval.choose_channel_weight: must be in [0, 2] (0: likelihood_pmi), got 2.5"),
    ("train=3", "train: expected a section (mapping), got 3"),
    ("train.lr", "must look like section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_a_held_out_fold_is_one_of_the_folds():
    assert load_config(None, ["data.folds=4", "data.fold=3"]).data.fold == 3
    with pytest.raises(ConfigError, match=r"data\.fold: must be in \[0, 3\] with data\.folds=4, got 4"):
        load_config(None, ["data.folds=4", "data.fold=4"])


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  optimizer: sgd\n")
    with pytest.raises(ConfigError, match="bad.yaml: train.optimizer: 'sgd' is not valid; choose one of"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_a_long_wrong_value_is_quoted_cut(tmp_path):
    """A 1 MB string or a large nested list is quoted in a few dozen characters, not whole."""
    path = tmp_path / "long.yaml"
    path.write_text(f"train:\n  epochs: {'x' * 1_000_000}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: train.epochs: expected int, got 'xxx") and "...x" in message
    assert len(message) < len(str(path)) + 120
    path.write_text(f"train:\n  betas: {[[0.5] * 100] * 100}\n")
    with pytest.raises(ConfigError, match=r"train\.betas\[0\]: expected float, got \[0\.5, 0\.5, .*\.\.\.\]$"):
        load_config(path)


def test_snapshot_round_trips(tmp_path):
    config = load_config(None, ["train.lr=3e-4", "lora.r=4"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path, device="cuda"), Config)


def test_device_rules_are_checked_at_load(monkeypatch):
    """4-bit with in-loop evaluation on CPU, and several processes on CPU without train.cpu, fail before any process
    group or model exists."""
    with pytest.raises(ConfigError, match="model.quantization=4bit on CPU"):
        load_config(ROOT / "configs" / "qwen2.5-14b-qlora.yaml", device="cpu")
    assert load_config(ROOT / "configs" / "qwen2.5-14b-qlora.yaml", ["eval.every=0", "eval.at_start=false"],
                       device="cpu").model.quantization == "4bit"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes were launched on CPU; set train.cpu=true"):
        load_config(ROOT / "configs" / "tiny.yaml", device="cpu")
    assert load_config(ROOT / "configs" / "tiny.yaml", ["train.cpu=true", "train.fsdp=true", "train.optimizer=adamw"],
                       device="cpu").train.fsdp
