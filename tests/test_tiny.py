"""The tiny-model builder: real Qwen3 tokenizer, loaded back through the user's code path."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from poetry.builtin.tiny import ARCHITECTURES, build_tiny, main
from poetry.config import ModelConfig
from poetry.model import load_model


def test_real_qwen3_tokenizer_ids(tokenizer, tiny_model_dir):
    raw = PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"))
    text = "床前明月光，疑是地上霜。Hello 世界"
    assert tokenizer(text)["input_ids"] == raw(text)["input_ids"]
    assert len(tokenizer) == 151669 and tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_builds_and_runs(tmp_path, arch):
    path = build_tiny(tmp_path / arch, arch)
    model = load_model(ModelConfig(path=str(path), dtype="fp32"))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] >= 151669 and torch.isfinite(logits).all()


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "model.safetensors").is_file() and "written to" in capsys.readouterr().out
