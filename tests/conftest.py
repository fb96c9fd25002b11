import json
import os
from pathlib import Path

import pytest

from poetry.quiet import quiet_progress_bars

os.environ.setdefault("HF_HUB_OFFLINE", "1")
quiet_progress_bars()

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "ccpa2025" / "train-data"
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from poetry.builtin.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen3")


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model whose B matrices are random, so that it changes the model's answers."""
    import torch

    from poetry.config import LoraConfig, ModelConfig
    from poetry.model import add_lora, load_model

    model = add_lora(load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False),
                     LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny random-init model of each architecture poetry.builtin.tiny builds: {arch: directory}."""
    from poetry.builtin.tiny import ARCHITECTURES, build_tiny

    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny(root / arch, arch) for arch in ARCHITECTURES}


WINDOW = 24  # Gemma's sliding window in family_models: prompts are ~10x longer


@pytest.fixture(scope="session")
def family_models(tiny_dirs, tmp_path_factory):
    """A tiny fp32 model of each family, loaded for inference: {arch: model}; Gemma-3 with a sliding-window layer
    and a full-attention one."""
    import shutil

    from poetry.config import ModelConfig
    from poetry.model import load_model

    models = {}
    for arch, path in tiny_dirs.items():
        if arch == "gemma3":
            path = shutil.copytree(path, tmp_path_factory.mktemp("windowed") / arch)
            config_file = path / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config |= {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}
            config_file.write_text(json.dumps(config), encoding="utf-8")
        models[arch] = load_model(ModelConfig(path=str(path), dtype="fp32"), for_training=False)
    return models


@pytest.fixture(scope="session")
def few_poems(tmp_path_factory):
    """Eight sample poems as one JSON list: ~20 questions, a few seconds per run."""
    from poetry.data import load_poems

    poems = load_poems(SAMPLE / "train-data").records[:8]
    path = tmp_path_factory.mktemp("data") / "poems.json"
    path.write_text(json.dumps([{"title": p.title, "content": p.content, "keywords": p.keywords, "trans": p.trans,
                                 "emotion": p.emotion} for p in poems], ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from poetry.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def fmt(tokenizer):
    """The prompt format of the tiny Qwen3 (ChatML)."""
    from poetry.prompt import PromptFormat

    return PromptFormat(tokenizer)


@pytest.fixture(scope="session")
def sample_questions():
    """The first three questions of the sample eval set."""
    from poetry.data import load_questions

    return load_questions(SAMPLE / "eval.json").records[:3]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Decoding runs thousands of tiny forwards: on a shared 2-core machine two torch threads fighting other jobs
    ran ~20x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_train():
    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"official training data not found at {SHARED_TRAIN} (../shared is absent)")
    return SHARED_TRAIN


@pytest.fixture
def fresh_accelerator():
    """Accelerate keeps its state in singletons: a test that runs train.py in-process resets them after itself."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl, a dict per line."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter(checkpoint) -> dict:
    """The adapter weights a checkpoint directory holds."""
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "adapter_model.safetensors")


def torchrun(*args: str, timeout: int = 600):
    """A script on 2 CPU processes (gloo, one thread each) from the project's root; it must succeed."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result
