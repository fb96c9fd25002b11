"""SIGKILL a real train.py process at chosen points of one run (mid-accumulation, mid-epoch, during evaluation,
during a save), resume each with train.resume=auto, and get the uninterrupted run's final adapter bit for bit, with
every step once in metrics.jsonl. The kill comes from inside the process (a patched function sends SIGKILL to its
own pid at the chosen moment), so the points are exact and nothing gets to clean up: no exception, no finally."""
import subprocess
import sys
import textwrap

import pytest
import torch

from poetry import checkpoint

from conftest import ROOT, adapter, metrics

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = ["train.max_steps=8", "train.grad_accum=2", "train.micro_batch_size=2", "train.save_every=1",
          "train.keep_last=10", "eval.every=3", "eval.at_start=false", "eval.decode=true", "eval.max_questions=2",
          "eval.max_new_tokens=2", "data.val_fraction=0.3", "data.max_items=1", "lora.dropout=0.1",
          "train.precision=fp32", "log.curves=false", "train.epochs=20"]

# where to die: (what is patched, on which call); each sends SIGKILL to its own process
KILL_POINTS = {
    "mid-accumulation": ("poetry.loss.TargetOnlyLoss.forward", 4),  # step 2's second micro-step, the first done
    "mid-epoch": ("train.optimizer_step", 5),  # step 5's gradients accumulated, not applied (~10 steps an epoch)
    "during evaluation": ("poetry.validation.Validator.decode", 2),  # the evaluation of step 6, before its save
    "during a save": ("poetry.checkpoint._mark_complete", 3),  # step 3's save: its files written, no marker yet
}

LAUNCHER = textwrap.dedent("""
    import importlib, os, signal, sys
    sys.path.insert(0, {root!r})
    import train
    target, nth = {target!r}, {nth}
    module_name, _, attribute = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a class attribute: module.Class.method
        module_name, _, class_name = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
    original, calls = getattr(owner, attribute), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attribute, dying)
    sys.exit(train.main(sys.argv[1:]))
""")


def run(run_dir, few_poems, tiny_model_dir, *extra, kill=None) -> subprocess.CompletedProcess:
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={tiny_model_dir}",
            f"data.train={few_poems}", f"log.dir={run_dir}", *COMMON, *extra]
    if kill is None:
        command = [sys.executable, str(ROOT / "train.py"), *argv]
    else:
        target, nth = kill
        command = [sys.executable, "-c", LAUNCHER.format(root=str(ROOT), target=target, nth=nth), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def final_adapter(run_dir) -> dict[str, torch.Tensor]:
    return adapter(run_dir / "checkpoints" / f"step-{STEPS:06d}")


@pytest.fixture(scope="module")
def straight(tiny_model_dir, few_poems, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    done = run(run_dir, few_poems, tiny_model_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_anywhere_resumes_to_the_same_adapter_with_each_step_logged_once(point, straight, tiny_model_dir,
                                                                                      few_poems, tmp_path):
    killed = run(tmp_path, few_poems, tiny_model_dir, kill=KILL_POINTS[point])
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: nothing ran after it
    if point == "during a save":
        assert [p.name for p in checkpoint.torn_dirs(tmp_path / "checkpoints")] == [] and \
            any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    resumed = run(tmp_path, few_poems, tiny_model_dir, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    records = metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6, 8]
    expected = metrics(straight)
    losses, expected_losses = ({r["step"]: r["train/loss"] for r in lines if "train/loss" in r}
                               for lines in (records, expected))
    first_differing = next((step for step in expected_losses if losses[step] != expected_losses[step]), None)
    a, b = final_adapter(straight), final_adapter(tmp_path)
    assert a.keys() == b.keys()
    differing = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert first_differing is None and not differing, \
        f"train/loss first differs at step {first_differing}; the largest difference per adapter tensor: {differing}"
