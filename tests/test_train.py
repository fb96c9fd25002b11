"""train.py end to end on a tiny Qwen3: the loop's promises, each checked on real runs."""
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poetry.config import load_config

from conftest import ROOT, SAMPLE, adapter, metrics

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerator")


def config(tiny_model_dir, data, run_dir, *overrides):
    """configs/tiny.yaml, made cheaper: one word and one sentence per question keeps targets short, and targets
    through the 152k-id output layer are what a tiny model's step costs. fp32 whatever the CPU (auto would pick
    bf16 on one with native bf16), and no step-0 evaluation unless a test is about it."""
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.path={tiny_model_dir}", f"data.train={data}", f"log.dir={run_dir}", "eval.decode=false",
        "log.curves=false", "data.max_items=1", "train.micro_batch_size=2", "train.precision=fp32",
        "eval.at_start=false", *overrides])


def input_casts(model) -> set[bool]:
    """Whether PEFT casts each adapter layer's input to the adapter's dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {getattr(m, "cast_input_dtype_enabled", True) for m in model.modules() if isinstance(m, BaseTunerLayer)}


def test_tiny_overfit_drives_loss_down(tiny_model_dir, few_poems, tmp_path):
    two = tmp_path / "two.json"
    two.write_text(json.dumps(json.loads(few_poems.read_text(encoding="utf-8"))[:2], ensure_ascii=False))
    cfg = config(tiny_model_dir, two, tmp_path, "data.val_fraction=0", "train.max_steps=20", "train.epochs=30",
                 "train.lr=1e-2", "train.scheduler=constant", "train.grad_accum=1", "lora.r=16", "lora.alpha=32",
                 "eval.every=0", "data.max_items=100", "lora.dropout=0")
    train_script.train(cfg)
    losses = [m["train/loss"] for m in metrics(tmp_path) if "train/loss" in m]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:2]) / 2


def test_run_directory_checkpoints_and_curves(tiny_model_dir, few_poems, tmp_path, capsys):
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=6", "train.save_every=2", "train.keep_last=1",
                 "eval.every=2", "log.curves=true", "data.val_fraction=0.3", "eval.at_start=true")
    run_dir, model = train_script.train(cfg)
    assert input_casts(model) == {True}  # fp32: no autocast, PEFT's cast stays
    printed = capsys.readouterr().out  # the effective config, overrides included, before training starts
    assert "train: seed=0" in printed and "keep_last=1" in printed and "eval: every=2" in printed
    assert printed.index("keep_last=1") < printed.index("trainable parameters") < printed.index("step 1/6 ")
    assert re.search(r"optimizer steps: 6, [\d.]+ epochs of \d+ \(train.max_steps: train.epochs is unused\)", printed)
    assert f"adapter in {run_dir / 'checkpoints' / 'step-000006'}" in printed
    assert re.search(r"of training time\), peak mem/peak_rss_gb=[\d.]+\n", printed)
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "loss.png", "lr.png"}
    records = metrics(run_dir)
    first_step = next(r for r in records if "train/loss" in r)
    step_keys = {"train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "train/skipped_steps",
                 "train/tokens_per_s", "train/target_tokens_per_s", "train/padding_efficiency", "mem/peak_rss_gb"}
    assert step_keys <= set(first_step) and 0 < first_step["train/padding_efficiency"] <= 1
    assert [r["step"] for r in records if "val/loss" in r] == [0, 2, 4, 6]  # the curves start before training
    checkpoints = run_dir / "checkpoints"
    best = json.loads((checkpoints / "best.json").read_text())
    assert best["step"] > 0  # step 0 is a curve's starting point, never a checkpoint
    kept = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert kept == sorted({"step-000006", best["path"]})  # keep_last=1 plus the best
    assert {p.name for p in (checkpoints / "step-000006").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "trainer_state.pt", "config.yaml",
        "complete.json"}
    assert not list(checkpoints.glob(".*tmp"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       checkpoints / "step-000006")
    saved = adapter(checkpoints / "step-000006")
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(saved) == len(state) and all(torch.equal(v, model.state_dict()[k.replace(".weight", ".default.weight")])
                                            for k, v in saved.items())


@pytest.mark.parametrize("extra", [(), ("data.emotion_examples=true", "train.choice_loss_weight=1")],
                         ids=["lm", "with choice loss"])
def test_resume_is_bitwise_exact(tiny_model_dir, few_poems, tmp_path, extra):
    """10 steps straight vs 5 steps, a fresh process state, then 5 more: identical adapters (dropout on, epochs
    crossed mid-way, so RNG, sampler and optimizer states all matter)."""
    common = ("train.max_steps=10", "train.save_every=5", "train.keep_last=3", "eval.every=0", "lora.dropout=0.1",
              "data.val_fraction=0", "train.epochs=10", "data.max_items=3", *extra)
    straight = tmp_path / "straight"
    train_script.train(config(tiny_model_dir, few_poems, straight, *common))
    epochs = {m["train/epoch"] for m in metrics(straight)}
    assert len(epochs) > 1
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    os.rename(straight / "checkpoints" / "step-000005", interrupted / "checkpoints" / "step-000005")
    torch.manual_seed(1234)  # a different process state must not matter
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_script.train(config(tiny_model_dir, few_poems, interrupted, *common, "train.resume=auto"))
    a, b = adapter(straight / "checkpoints" / "step-000010"), adapter(interrupted / "checkpoints" / "step-000010")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed_steps = [m["step"] for m in metrics(interrupted) if "train/loss" in m]
    assert resumed_steps == [6, 7, 8, 9, 10]
    assert any("train/choice_loss" in m for m in metrics(straight)) is bool(extra)


def captured_gradients(monkeypatch):
    """Record the accumulated LoRA gradients at the moment the loop clips them."""
    captured = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, *args, **kwargs):
        parameters = list(parameters)
        captured.append([p.grad.clone() for p in parameters])
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return captured


@pytest.mark.parametrize("micro, accum", [(2, 2), (1, 4)])
def test_accumulation_matches_one_big_batch(tiny_model_dir, few_poems, tmp_path, monkeypatch, micro, accum):
    """With loss normalised by the step's target tokens, 2x2 and 1x4 micro-batching give the 4x1 gradient."""
    def gradient(micro_batch, grad_accum, run):
        captured = captured_gradients(monkeypatch)
        train_script.train(config(tiny_model_dir, few_poems, tmp_path / run, "train.max_steps=1", "lora.dropout=0",
                                  f"train.micro_batch_size={micro_batch}", f"train.grad_accum={grad_accum}",
                                  "data.val_fraction=0", "eval.every=0", "train.precision=fp32",
                                  "data.max_items=100"))  # one question and one emotion example per poem: 16
        monkeypatch.undo()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        return captured[0]

    # a window of all 16 examples either way: 16x1 against micro x accum covering 16 as well
    big = gradient(16, 1, "big")
    small = gradient(micro * 4, accum, "small")
    assert len(big) == len(small) > 0
    for g_big, g_small in zip(big, small, strict=True):
        assert torch.allclose(g_big, g_small, atol=1e-7, rtol=1e-4)


def test_fp16_scaler_skips_and_counts_an_inf_step(tiny_model_dir, few_poems, tmp_path, monkeypatch):
    """fp16 autocast + GradScaler on CPU; an inf gradient injected at the 3rd backward makes that step skipped."""
    backward_calls = []
    original_add_adapter = train_script.add_adapter

    def add_adapter_with_fault(model, peft, lora):
        model = original_add_adapter(model, peft, lora)
        param = next(p for p in model.parameters() if p.requires_grad)
        param.register_hook(lambda grad: grad * float("inf") if len(backward_calls) == 2 else grad)
        param.register_hook(lambda grad: backward_calls.append(1) or grad)
        return model

    monkeypatch.setattr(train_script, "add_adapter", add_adapter_with_fault)
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.precision=fp16", "model.dtype=fp32", "train.max_steps=4",
                 "train.grad_accum=1", "train.micro_batch_size=1", "eval.every=0", "data.val_fraction=0")
    train_script.train(cfg)
    steps = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert [m["train/skipped_steps"] for m in steps] == [0, 0, 1, 1]
    assert steps[2]["train/loss_scale"] == steps[1]["train/loss_scale"] / 2
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in steps)


def test_cli_errors_are_one_line(tmp_path, capsys, few_poems):
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'train.lrr'") and "\n" not in err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"title": "t"}]', encoding="utf-8")
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.train={bad}",
                              f"log.dir={tmp_path / 'run'}"]) == 2
    assert "bad.json:record 0: field 'content': missing field" in capsys.readouterr().err
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "model.quantization=4bit",
                              "model.dtype=bf16", f"log.dir={tmp_path / 'q'}"]) == 2
    assert "model.quantization=4bit on CPU" in capsys.readouterr().err
    for overrides, message in [(["train.optimizer=paged_adamw_8bit"], "cannot step sharded"),
                               (["model.quantization=8bit", "model.dtype=bf16"], "cannot be sharded"),
                               ([], "sharding needs at least 2 processes")]:
        assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "train.fsdp=true", *overrides,
                                  f"log.dir={tmp_path / 'f'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: train.fsdp: ") and message in err


def test_in_loop_constrained_decoding_logs_task_curves(tiny_model_dir, few_poems, tmp_path):
    # 13 held-out sample poems: enough disjoint emotions among them for every option set
    cfg = config(tiny_model_dir, SAMPLE / "train-data", tmp_path, "eval.decode=true", "train.max_steps=2",
                 "eval.every=1", "eval.max_questions=4", "eval.max_new_tokens=4", "eval.batch_size=2",
                 "eval.best_metric=val/proxy_total", "eval.best_mode=max")
    run_dir, model = train_script.train(cfg)
    evaluations = [m for m in metrics(run_dir) if "val/loss" in m]
    assert [m["step"] for m in evaluations] == [1, 2]
    for m in evaluations:
        assert {"val/acc", "val/bleu_words", "val/bleu_sents", "val/proxy_total", "val/seconds"} <= set(m)
        assert 0 <= m["val/acc"] <= 1 and m["val/proxy_total"] == pytest.approx(
            0.5 * m["val/acc"] + 0.25 * (m["val/bleu_words"] + m["val/bleu_sents"]))
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text())["metric"] == "val/proxy_total"
    assert [m["step"] for m in metrics(run_dir) if "train/loss" in m] == [1, 2]  # training went on after decoding


def test_tensorboard_tracker_receives_the_logged_metrics(tiny_model_dir, few_poems, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tiny_model_dir, few_poems, tmp_path, "log.tracker=tensorboard", "train.max_steps=2",
                 "eval.every=1")
    run_dir, _ = train_script.train(cfg)
    events = EventAccumulator(str(run_dir / "poetry-sft")).Reload()
    logged = [m for m in metrics(run_dir) if "train/loss" in m]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(m["step"], pytest.approx(m["train/loss"])) for m in logged]
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2]


def test_a_tracker_that_is_not_installed_is_an_error(capsys, monkeypatch):
    import accelerate.tracking

    installed = accelerate.tracking.get_available_trackers()
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers",
                        lambda: [tracker for tracker in installed if str(tracker) != "wandb"])
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "log.tracker=wandb"]) == 2
    assert "log.tracker=wandb: the wandb package is not installed" in capsys.readouterr().err


def leveldb_log_records(path: Path) -> list[bytes]:
    """The records of a LevelDB log file (github.com/google/leveldb/blob/main/doc/log_format.md), the container
    of wandb's and swanlab's run files: 32 KiB blocks of chunks, each a 7-byte header (crc, length, type) and data;
    a record is a FULL chunk, or FIRST, MIDDLE.., LAST. Both files open with their own 7-byte header."""
    data, block, position, records, pending = path.read_bytes(), 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged: dict[str, list[tuple[int, float]]] = {}
    for raw in leveldb_log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    logged.setdefault(key, []).append((row["_step"], value))
    return logged


def swanlab_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    [path] = run_dir.glob("swanlog/run-*/run-*.swanlab")
    logged: dict[str, list[tuple[int, float]]] = {}
    for raw in leveldb_log_records(path):
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar"):
            logged.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    return logged


@pytest.mark.parametrize("tracker, history", [("wandb", wandb_history), ("swanlab", swanlab_history)])
def test_an_offline_tracker_receives_the_logged_metrics_without_account_or_network(tiny_model_dir, few_poems, tmp_path,
                                                                                   monkeypatch, tracker, history):
    for variable in ("WANDB_API_KEY", "SWANLAB_API_KEY", "WANDB_MODE", "SWANLAB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no saved login either
    cfg = config(tiny_model_dir, few_poems, tmp_path / "run", f"log.tracker={tracker}", "train.max_steps=2",
                 "eval.every=1", "data.val_fraction=0.3")
    run_dir, _ = train_script.train(cfg)
    logged = history(run_dir)
    for key in ("train/loss", "train/lr", "val/loss"):
        expected = [(m["step"], pytest.approx(m[key])) for m in metrics(run_dir) if key in m]
        assert logged[key] == expected and expected, key


def test_plain_log_lines_say_where_the_run_is(tiny_model_dir, few_poems, tmp_path, capsys):
    """Without a TTY (nohup, Slurm, CI) every step line carries step/total, elapsed and ETA; evaluation announces
    itself; metrics.jsonl has total_steps and eta_s."""
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=3", "log.every=1", "eval.every=2",
                 "data.val_fraction=0.3", "eval.at_start=true")
    train_script.train(cfg)
    printed = capsys.readouterr().out
    assert "step 0/3  elapsed 0:00:" in printed and "eta ?  evaluating: loss on " in printed
    for step in (1, 2, 3):
        assert re.search(rf"^step {step}/3  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d  loss=", printed, re.M), step
    steps = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert all(m["total_steps"] == 3 for m in steps)
    assert steps[-1]["eta_s"] == 0 and all(m["eta_s"] >= 0 for m in steps)


def test_defaults_save_every_tenth_of_the_run(tiny_model_dir, few_poems, tmp_path):
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=20", "train.save_every=0",
                 "train.keep_last=100", "eval.every=0", "data.val_fraction=0", "train.grad_accum=1")
    assert load_config(None).train.save_every == 0  # the default is auto
    train_script.train(cfg)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert saved == [f"step-{step:06d}" for step in range(2, 21, 2)]


def test_resume_auto_without_a_checkpoint_says_it_starts_fresh(tiny_model_dir, few_poems, tmp_path, capsys):
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=1", "eval.every=0",
                              "data.val_fraction=0", "train.resume=auto"))
    assert f"--resume auto: no complete checkpoint in {tmp_path / 'checkpoints'}, so this run starts fresh" in \
        capsys.readouterr().out


def test_resume_keeps_one_log_line_per_step_and_warns_of_changed_maths(tiny_model_dir, few_poems, tmp_path, capsys):
    """A run killed after step 4 (checkpoint at 3) and resumed: metrics.jsonl holds steps 1..5 once each, the curves
    redraw from all of it, and a changed learning rate is named."""
    common = ("train.max_steps=5", "train.save_every=3", "eval.every=0", "data.val_fraction=0", "train.keep_last=5")
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common))
    shutil.rmtree(tmp_path / "checkpoints" / "step-000005")  # as if killed after step 4 was logged
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    capsys.readouterr()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common, "train.resume=auto", "train.lr=1e-3",
                              "log.curves=true", "train.dist_timeout_s=60"))
    printed = capsys.readouterr().out
    assert "dropped 1 records of steps after 3, which this resume repeats" in printed
    assert "config that changes the training maths: train.lr: 0.003 -> 0.001" in printed
    changed = printed.split("training maths:")[1].splitlines()[0]
    assert "train.resume" not in changed and "dist_timeout_s" not in changed  # bookkeeping, not maths
    assert [m["step"] for m in metrics(tmp_path) if "train/loss" in m] == [1, 2, 3, 4, 5]
    times = [m["time"] for m in metrics(tmp_path)]
    assert times == sorted(times)  # elapsed time goes on across the resume


def test_missing_inputs_stop_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(train_script, "load_model", no_model)
    monkeypatch.setattr(train_script, "resolve_model_path", no_model)
    assert train_script.main(["--config", str(ROOT / "configs" / "qwen2.5-7b-lora.yaml"),
                              f"data.train={tmp_path / 'absent'}", f"log.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.train={tmp_path / 'absent'}: no such file or directory;")
    assert "HITICI-NLPGroup/CCPA-EvalTask" in err and "data/ccpa2025/train-data" in err and err.count("\n") == 1
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "model.path=/no/such/model",
                              f"log.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == \
        "error: model.path=/no/such/model: no such directory (and HF_HUB_OFFLINE=1, so no hub download)\n"
    assert not (tmp_path / "run").exists()


def test_overrides_may_follow_flags():
    cfg = train_script.parse_args(["--config", str(ROOT / "configs" / "tiny.yaml"), "--resume", "auto",
                                   "train.epochs=1", "--profile-memory", "lora.r=4"])
    assert (cfg.train.epochs, cfg.train.resume, cfg.train.profile_memory, cfg.lora.r) == (1, "auto", True, 4)


def test_help_shows_defaults_and_answers_before_torch_loads():
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "section.key=value" in result.stdout and "(default: off)" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "argparse" in imported and "torch" not in imported and "poetry.config" not in imported


def test_explicit_bf16_trains_fp32_adapters_and_warns_where_it_is_slow(tiny_model_dir, few_poems, tmp_path, capsys):
    """The bf16 path stays tested, kept small: 2 steps of one short example each (bf16 runs ~20x slower than fp32
    on a CPU without native bf16)."""
    from poetry.precision import cpu_native_bf16

    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.precision=bf16", "model.dtype=bf16", "train.max_steps=2",
                 "train.grad_accum=1", "train.micro_batch_size=1", "eval.every=0", "data.val_fraction=0")
    _, model = train_script.train(cfg)
    printed = capsys.readouterr().out
    native, _ = cpu_native_bf16()
    assert ("warning: train.precision=bf16 on a CPU without native bf16" in printed) is not native
    assert "train.precision=bf16 (as configured)" in printed
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert input_casts(model) == {False}  # autocast casts the adapters' inputs itself
    losses = [m["train/loss"] for m in metrics(tmp_path) if "train/loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_every_checkpoint_is_saved_once(tiny_model_dir, few_poems, tmp_path, monkeypatch):
    """When total_steps is a multiple of save_every, the old loop saved the last step twice (in the loop and after
    it); evaluation and saving now happen in one place."""
    saved, save_checkpoint = [], train_script.checkpoint.save_checkpoint

    def counting(root, step, *args, **kwargs):
        saved.append(step)
        return save_checkpoint(root, step, *args, **kwargs)

    monkeypatch.setattr(train_script.checkpoint, "save_checkpoint", counting)
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=4", "train.save_every=2",
                              "eval.every=2", "data.val_fraction=0.3", "train.keep_last=5"))
    assert saved == [2, 4]
    assert [m["step"] for m in metrics(tmp_path) if "val/loss" in m] == [2, 4]


@pytest.fixture
def cuda_snapshots(monkeypatch):
    """--profile-memory as on a GPU: CudaSnapshot enabled, torch's allocator recorder replaced by spies that log
    (call, argument, the steps metrics.jsonl holds by then)."""
    calls = []

    def logged(name, value):
        run_dir = getattr(logged, "run_dir", None)
        steps = [m["step"] for m in metrics(run_dir)] if run_dir and (run_dir / "metrics.jsonl").is_file() else []
        calls.append((name, value, steps))

    class OnGpu(train_script.profiling.CudaSnapshot):
        def __init__(self, run_dir, rank, enabled):
            super().__init__(run_dir, rank, enabled)
            self.active, logged.run_dir = enabled, Path(run_dir)

    monkeypatch.setattr(train_script.profiling, "CudaSnapshot", OnGpu)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kwargs: logged("record", enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: logged("dump", path))
    return calls


def test_memory_snapshot_records_the_first_steps_of_a_resumed_session(tiny_model_dir, few_poems, tmp_path,
                                                                      cuda_snapshots):
    """--profile-memory records SNAPSHOT_STEPS steps from where the session starts; after a resume the old loop
    compared the global step with 3, never matched, and recorded the whole session."""
    common = ("train.max_steps=8", "train.save_every=4", "eval.every=0", "data.val_fraction=0", "train.keep_last=5")
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common))
    shutil.rmtree(tmp_path / "checkpoints" / "step-000008")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common, "train.resume=auto",
                              "train.profile_memory=true"))
    dumps = [(path, steps[-1]) for call, path, steps in cuda_snapshots if call == "dump"]
    assert dumps == [(str(tmp_path / "memory_snapshot.rank0.pickle"), 4 + train_script.SNAPSHOT_STEPS)]


def test_memory_snapshot_starts_after_the_step_0_evaluation_and_survives_an_out_of_memory_step(
        tiny_model_dir, few_poems, tmp_path, cuda_snapshots, monkeypatch):
    """An OOM in the first steps is when a snapshot is wanted most: the old loop dumped only after SNAPSHOT_STEPS
    steps, so an OOM before left nothing; it also recorded the step-0 evaluation, which is not the training's
    memory. Each rank writes its own file: the ranks share the run directory."""
    optimizer_step, taken = train_script.optimizer_step, []

    def out_of_memory_at_step_2(run):
        if taken:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        taken.append(run.state.step)
        return optimizer_step(run)

    monkeypatch.setattr(train_script, "optimizer_step", out_of_memory_at_step_2)
    with pytest.raises(torch.OutOfMemoryError):
        train_script.train(config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=8", "eval.at_start=true",
                                  "data.val_fraction=0.3", "train.profile_memory=true"))
    assert [(call, value) for call, value, _ in cuda_snapshots] == [
        ("record", "all"), ("dump", str(tmp_path / "memory_snapshot.rank0.pickle")), ("record", None)]
    assert cuda_snapshots[0][2] == [0]  # recording began once the step-0 evaluation was logged
    assert cuda_snapshots[1][2] == [0, 1]  # and was dumped in the step that failed


def test_train_state_round_trips_every_counter():
    state = train_script.TrainState(step=7, micro_step=13, epoch=2, skipped=1)
    restored = train_script.TrainState()
    restored.load_state_dict(state.state_dict())
    assert restored == state and set(state.state_dict()) == {f.name for f in dataclasses.fields(state)}


@pytest.mark.parametrize("max_questions", [0, 2])  # 2: the loss of the decoded questions only, as in the demo
def test_infer_perplexity_on_the_exported_held_out_gold_is_the_runs_val_ppl(tiny_model_dir, few_poems, tmp_path,
                                                                             capsys, max_questions):
    import importlib.util

    from poetry.data.__main__ import main as data_main

    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    cfg = config(tiny_model_dir, few_poems, tmp_path / "run", "train.max_steps=2", "eval.every=2",
                 "train.save_every=2", "data.val_fraction=0.3", "data.max_items=100",  # one whole question a poem
                 f"eval.max_questions={max_questions}")
    run_dir, _ = train_script.train(cfg)
    logged = next(m for m in metrics(run_dir) if "val/ppl" in m and m["step"] == 2)
    scored = int(re.search(r"loss on (\d+) validation examples", capsys.readouterr().out).group(1))
    heldout = tmp_path / "heldout"
    assert data_main(["export-val", "--config", str(run_dir / "config.yaml"), "--out", str(heldout)]) == 0
    exported = int(re.search(r"(\d+) complete validation questions", capsys.readouterr().out).group(1))
    assert scored == (max_questions or exported) < exported + (not max_questions)  # the cap bit, or all were scored
    for name in ("questions.json", "gold.json"):  # the loop's first questions are the export's first
        (heldout / name).write_text(json.dumps(json.loads((heldout / name).read_text())[:scored], ensure_ascii=False))
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert infer.main(["perplexity", "--model", str(tiny_model_dir), "--adapter", str(checkpoint), "--dtype", "fp32",
                       "--input", str(heldout / "questions.json"), "--gold", str(heldout / "gold.json"),
                       "--batch-size", str(cfg.eval.batch_size)]) == 0
    printed = capsys.readouterr().out
    ppl, mean = map(float, re.search(r"perplexity ([\d.]+): mean loss ([\d.]+) per target token", printed).groups())
    assert mean == pytest.approx(logged["val/loss"], rel=1e-6, abs=1e-6)
    assert ppl == pytest.approx(logged["val/ppl"], rel=1e-4)


def test_curve_figures_name_their_axes_and_star_the_zero_shot_start():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poetry.runlog import CURVES, ZERO_SHOT_NOTE, curve_figure

    curve = CURVES["val.png"]
    fig = curve_figure(plt, curve, {"val/acc": [(0, 0.25), (4, 0.5), (8, 0.75)], "val/bleu_words": [(4, 0.1)]})
    [ax] = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (curve.title, "optimizer step", curve.y_label)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["val/acc", "val/bleu_words", ZERO_SHOT_NOTE]
    starred = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in starred] == [([0], [0.25])]
    plt.close(fig)
    fig = curve_figure(plt, curve, {"val/acc": [(4, 0.5)]})  # no evaluation at step 0: nothing starred
    assert ZERO_SHOT_NOTE not in [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)


def test_writing_examples_train_and_their_held_out_loss_and_rates_are_logged_as_a_hand_computation_gives_them(
        tiny_model_dir, few_poems, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from poetry.data import load_poems, split_poems
    from poetry.data.questions import validation_writing_examples
    from poetry.model import load_tokenizer
    from poetry.prompt import IGNORE_INDEX, PromptFormat
    from poetry.prosody import form_named
    from poetry.write import write_poems

    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=2", "eval.every=2", "train.save_every=2",
                 "data.val_fraction=0.4", "data.writing_examples=true", "eval.max_questions=2", "eval.decode=true",
                 "eval.max_new_tokens=2")
    run_dir, _ = train_script.train(cfg)
    logged = next(m for m in metrics(run_dir) if "val/writing_loss" in m)
    _, val = split_poems(load_poems(few_poems).records, cfg.data.val_fraction, cfg.data.split_seed)
    examples = validation_writing_examples(val)[:2]
    printed = capsys.readouterr().out
    assert len(examples) == 2 and "writing loss on 2 held-out poems" in printed and "writing 2 poems" in printed
    fmt = PromptFormat(load_tokenizer(str(tiny_model_dir)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      sorted((run_dir / "checkpoints").glob("step-*"))[-1]).eval()
    total, count = 0.0, 0
    for example in examples:
        encoded = fmt.encode(example)
        with torch.no_grad():
            logits = model(torch.tensor([encoded["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(encoded["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    assert logged["val/writing_loss"] == pytest.approx(total / count, rel=1e-5)
    assert logged["val/writing_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # the rates of the poems it wrote freely are those the checker gives what the saved adapter writes
    requests = [(form_named(example.form), example.question.title) for example in examples]
    checks = [candidates[0].check for candidates in write_poems(model, fmt, requests, constrained=False)]
    assert logged["val/writing_form"] == sum(check.lines_ok for check in checks) / 2
    assert logged["val/writing_rhyme"] == sum(check.rhyme_ok for check in checks) / 2
