"""FSDP2 on CPU (gloo), 2 processes: the sharded run learns what the DDP run learns, saves an ordinary PEFT adapter
and resumes exactly; it may decode before any loss forward, and ranks whose decoding takes different numbers of
forwards stay paired. Accelerate ignores FSDP on CPU, so these runs ask for it with train.fsdp=true."""
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, SAMPLE, adapter, metrics, torchrun

STEPS = 4


def train_tiny(tiny_model_dir, few_poems, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return torchrun(str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                    f"model.path={tiny_model_dir}", f"data.train={few_poems}", f"log.dir={run_dir}", "train.cpu=true",
                    "log.curves=false", "data.max_items=1", "train.micro_batch_size=2", "data.val_fraction=0.25",
                    "train.precision=fp32", "lora.dropout=0", f"train.max_steps={STEPS}", "train.save_every=2",
                    "train.keep_last=10", "eval.every=2", "eval.max_questions=2", "eval.max_new_tokens=4",
                    "eval.batch_size=2", *overrides)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, few_poems, tmp_path_factory):
    """The same 4 steps as DDP, as FSDP, and as FSDP stopped at step 2 and resumed in another directory."""
    root = tmp_path_factory.mktemp("fsdp")
    outputs = {"ddp": train_tiny(tiny_model_dir, few_poems, root / "ddp"),
               "fsdp": train_tiny(tiny_model_dir, few_poems, root / "fsdp", "train.fsdp=true")}
    outputs["resumed"] = train_tiny(tiny_model_dir, few_poems, root / "resumed", "train.fsdp=true",
                                    f"train.resume={root / 'fsdp' / 'checkpoints' / 'step-000002'}")
    return root, outputs


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return adapter(run_dir / "checkpoints" / f"step-{STEPS:06d}")


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_fsdp_learns_what_ddp_learns(runs):
    root, outputs = runs
    assert "processes: 2 (FSDP)" in outputs["fsdp"].stdout and "processes: 2 (DDP)" in outputs["ddp"].stdout
    ddp, fsdp = final_adapter(root / "ddp"), final_adapter(root / "fsdp")
    assert sorted(ddp) == sorted(fsdp)  # the same PEFT keys: loadable wherever the DDP adapter is
    assert any("lora_B" in k and fsdp[k].abs().max() > 0 for k in fsdp)
    for key in ddp:  # all-reduce and reduce-scatter add in different orders
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6)
    ddp_lines, fsdp_lines = metrics(root / "ddp"), metrics(root / "fsdp")
    assert [m["step"] for m in fsdp_lines if "train/loss" in m] == list(range(1, STEPS + 1))  # one writer
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/bleu_words"):  # decoded answers too
        expected = [m[name] for m in ddp_lines if name in m]
        assert expected and [m[name] for m in fsdp_lines if name in m] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_fsdp_resume_is_exact(runs):
    root, outputs = runs
    assert "resumed from" in outputs["resumed"].stdout
    straight, resumed = final_adapter(root / "fsdp"), final_adapter(root / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = torch.load(root / "fsdp" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert any("lora_A" in name for name in state["optimizer"]["state"])  # whole state, keyed by parameter name


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_fsdp_decodes_before_any_loss_forward_and_then_trains(tiny_model_dir, few_poems, tmp_path):
    """eval.loss=false with eval.at_start: the first forwards are decoding's, which call the layers without the loss
    module. FSDP takes as root the first unit to run forward, so the root must be settled when sharding: else each
    layer becomes its own root and the training forward after raises."""
    output = train_tiny(tiny_model_dir, few_poems, tmp_path, "train.fsdp=true", "eval.loss=false",
                        "train.max_steps=1")
    assert "processes: 2 (FSDP)" in output.stdout
    lines = metrics(tmp_path)
    first_evaluation = next(m for m in lines if "val/bleu_words" in m)
    assert first_evaluation["step"] == 0 and "val/loss" not in first_evaluation
    assert [m["step"] for m in lines if "train/loss" in m] == [1]


@pytest.mark.parametrize("name, kind", [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml")).distributed_type == kind


def test_an_fsdp_launch_selects_the_sharded_path(monkeypatch):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP, Accelerate's FSDP type
    on GPUs: the config says train.fsdp=true from the start and is validated as such (Accelerate ignores it on CPU)."""
    from poetry.config import ConfigError, load_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert load_config(ROOT / "configs" / "tiny.yaml", device="cuda").train.fsdp
    with pytest.raises(ConfigError, match="train.fsdp: train.optimizer=paged_adamw_8bit"):
        load_config(ROOT / "configs" / "qwen2.5-7b-lora.yaml", device="cuda")
    assert not load_config(ROOT / "configs" / "tiny.yaml", ["train.cpu=true"], device="cpu").train.fsdp
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert not load_config(ROOT / "configs" / "qwen2.5-7b-lora.yaml", device="cuda").train.fsdp


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_fsdp_fp16_skips_an_overflow_on_every_rank(tiny_model_dir, few_poems, tmp_path):
    """fp16 autocast + the sharded GradScaler: an inf in rank 1's gradient shard alone, at the 3rd step, makes both
    ranks skip that step and halve the scale together (else their shards would drift apart)."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
from poetry.config import load_config
from poetry.parallel import Parallel

original_grad_scaler = Parallel.grad_scaler

def grad_scaler_with_fault(self, device_type, enabled):
    scaler = original_grad_scaler(self, device_type, enabled)
    unscale, calls = scaler.unscale_, []

    def unscale_(optimizer):
        calls.append(1)
        if len(calls) == 3 and os.environ["RANK"] == "1":
            shards = [p.grad.to_local() for group in optimizer.param_groups for p in group["params"]]
            next(shard for shard in shards if shard.numel()).view(-1)[0] = float("inf")  # this rank's shard only
        return unscale(optimizer)

    scaler.unscale_ = unscale_
    return scaler

Parallel.grad_scaler = grad_scaler_with_fault
train.train(load_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, [
    "model.path={tiny_model_dir}", "data.train={few_poems}", "log.dir={tmp_path / 'run'}", "train.cpu=true",
    "train.fsdp=true", "train.precision=fp16", "model.dtype=fp32", "train.max_steps=4", "train.grad_accum=1",
    "train.micro_batch_size=1", "data.val_fraction=0", "data.max_items=1", "log.curves=false"]))
""")
    torchrun(str(script))
    steps = [m for m in metrics(tmp_path / "run") if "train/loss" in m]  # rank 0's view
    assert [m["train/skipped_steps"] for m in steps] == [0, 0, 1, 1]
    assert steps[2]["train/loss_scale"] == steps[1]["train/loss_scale"] / 2
    assert all(torch.isfinite(value).all() for value in final_adapter(tmp_path / "run").values())


def test_a_decoder_without_layers_cannot_be_sharded(monkeypatch):
    from torch import nn

    from poetry.config import ConfigError, load_config
    from poetry.parallel import Parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    parallel = Parallel(SimpleNamespace(num_processes=2), load_config(ROOT / "configs" / "tiny.yaml",
                                                                      ["train.fsdp=true", "train.optimizer=adamw"],
                                                                      device="cuda"))
    with pytest.raises(ConfigError, match="keeps no decoder layers in `.layers`"):
        parallel.wrap(SimpleNamespace(decoder=nn.Sequential(nn.Linear(2, 2))))


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_fsdp_ranks_whose_decoding_takes_different_forwards_stay_paired(tiny_model_dir, tmp_path):
    """Each decoding forward all-gathers every layer, and how many forwards a rank runs is its own: a value ends where
    the greedy token closes it, and ranks on other GPUs or kernels can pick other tokens. Ranks here agree on every
    token, so rank 1 answers one question more. Unpaired, rank 0 would take its next collective while rank 1 still
    all-gathers: gloo aborts on the size mismatch, or both wait until the timeout."""
    script = tmp_path / "decode.py"
    script.write_text(f"""
import dataclasses, json, sys
from datetime import timedelta
from types import SimpleNamespace
sys.path.insert(0, {str(ROOT)!r})
import torch
from poetry.choice import answer_questions
from poetry.config import ModelConfig
from poetry.data import load_questions
from poetry.loss import TargetOnlyLoss
from poetry.model import load_model, load_tokenizer
from poetry.parallel import Parallel
from poetry.prompt import PromptFormat

torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=30))
rank = torch.distributed.get_rank()
model = load_model(ModelConfig(path={str(tiny_model_dir)!r}, dtype="fp32"), for_training=False)
parallel = Parallel(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(train=SimpleNamespace(fsdp=True)))
loss_module = parallel.wrap(TargetOnlyLoss(model))
fmt = PromptFormat(load_tokenizer({str(tiny_model_dir)!r}))
questions = load_questions({str(SAMPLE / "eval.json")!r}).records
ids = torch.tensor([fmt.prompt_ids(questions[0])])
with torch.no_grad():  # the validation loss first, as an evaluation in the training loop runs it
    loss_module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
# rank 1 first answers a longer question: its last forwards, on question 0, meet rank 0's padding forwards
mine = [questions[9], questions[0]] if rank else [questions[0]]
with parallel.whole_model(loss_module):
    decoded = answer_questions(model, fmt, mine, batch_size=1, max_new_tokens=4, method="likelihood_norm")
answers = [None, None]
torch.distributed.all_gather_object(answers, [dataclasses.asdict(d.answer) for d in decoded])
if rank == 0:
    print(json.dumps(answers))
""")
    rank0, rank1 = json.loads(torchrun(str(script), timeout=180).stdout.splitlines()[-1])
    assert len(rank1) == 2 and rank1[1] == rank0[0]  # the weights gathered against padding are the real ones
