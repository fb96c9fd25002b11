"""bench/gpu.py is for a GPU no one here has; its CPU smoke run keeps every stage of it alive, and the pieces that
need CUDA to train (the 4-bit base) are built on CPU as the GPU run builds them."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402


def test_cpu_smoke_runs_every_stage_and_saves_them(tmp_path, capsys):
    assert gpu.main(["--cpu-smoke", "--results-dir", str(tmp_path), "--scratch-dir", str(tmp_path / "scratch")]) == 0
    [saved] = tmp_path.glob("gpu-smoke-*.json")
    rows = json.loads(saved.read_text())["rows"]
    assert [(row["quantization"], row["lora_layer"]) for row in rows] == [("none", "Linear"), ("8bit", "Linear8bitLt")]
    for row in rows:
        assert row["train_step"]["allocated_gb"] > 0 and row["eval_forward"]["allocated_gb"] > 0
        assert row["largest_micro_batch"] == 4  # nothing runs out of memory on CPU: the search stops at --max-batch
        assert 0 < row["estimate_over_peak"] < 10
        assert row["gradient_difference_after_eval"] < 1e-6  # no 4-bit layer: the eval forward changes nothing
    assert not any((tmp_path / "scratch").iterdir())  # each random checkpoint is deleted once loaded


def test_a_stage_that_fails_keeps_the_stages_before_it(tmp_path, monkeypatch):
    first = gpu.SMOKE_SETUPS[0]
    monkeypatch.setattr(gpu, "SMOKE_SETUPS", (first, dataclasses.replace(first, name="failing")))

    def measure_or_fail(setup, *args):
        if setup.name == "failing":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"setup": setup.name}

    monkeypatch.setattr(gpu, "measure", measure_or_fail)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu.main(["--cpu-smoke", "--results-dir", str(tmp_path)])
    [saved] = tmp_path.glob("gpu-smoke-*.json")
    assert [row["setup"] for row in json.loads(saved.read_text())["rows"]] == [first.name]


def test_the_qlora_stage_builds_its_4bit_base_as_train_py_does(tmp_path):
    """The CUDA stage's construction on CPU (training a 4-bit base needs CUDA): transformers' loader quantizes the
    random checkpoint, so PEFT wraps its own 4-bit layer, checkpointing is on, and the nf4 weights hold the random
    values, not uninitialised memory."""
    import bitsandbytes as bnb

    setup = dataclasses.replace(gpu.SMOKE_SETUPS[1], quantization="4bit")
    bench = gpu.Bench(setup, gpu.CpuMemory(), seq=64, scratch=tmp_path)
    assert bench.lora_layer == "Linear4bit"
    base = bench.model.get_base_model()
    assert base.is_loaded_in_4bit and base.is_activation_checkpointing
    weight = base.model.layers[0].mlp.up_proj.base_layer.weight
    assert bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().std() == pytest.approx(0.02,
                                                                                                        rel=0.1)


def stand_in_quantized_by_hand():
    """The stand-in with bitsandbytes 8-bit layers put in by hand, as this bench once built its 4-bit base: no
    loader flagged it quantized."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, Qwen2Config

    model = AutoModelForCausalLM.from_config(Qwen2Config(**gpu.COMMON, **gpu.STAND_IN))
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    setattr(parent, name, bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                                              bias=linear.bias is not None, has_fp16_weights=False))
    return model


def test_the_check_refuses_a_base_train_py_would_not_train(tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import Qwen2Config

    from poetry.config import LoraConfig, ModelConfig
    from poetry.model import add_lora, load_model

    prepared = prepare_model_for_kbit_training(stand_in_quantized_by_hand(), use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="LoRA layers are Linear, not Linear8bitLt"):
        gpu.check_as_trained(add_lora(prepared, LoraConfig()), "8bit")
    gpu.write_random_checkpoint(Qwen2Config(**gpu.COMMON, **gpu.STAND_IN), tmp_path, torch.float32,
                                torch.device("cpu"))
    unchecked = load_model(ModelConfig(path=str(tmp_path), dtype="fp32", quantization="8bit"))
    with pytest.raises(RuntimeError, match="gradient checkpointing is off"):
        gpu.check_as_trained(add_lora(unchecked, LoraConfig()), "8bit")


def test_without_a_gpu_it_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--cpu-smoke" in done.stderr and "Traceback" not in done.stderr
