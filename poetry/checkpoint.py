"""Adapter-only checkpoints with everything needed to resume exactly.

A checkpoint directory `checkpoints/step-000050/` holds:
- adapter_config.json + adapter_model.safetensors (PEFT `save_pretrained`: loadable by `PeftModel.from_pretrained`,
  and a LoRA by vLLM) — the frozen base is never copied (Accelerate's save_state would write all of it); with
  peft.method=full, the whole model instead (config.json, model.safetensors, the tokenizer: a model directory);
- prompt_encoder.safetensors, for prompt, P- and prefix tuning: the whole trained module, which resume loads;
- trainer_state.pt: optimizer, scheduler, scaler and sampler states, every rank's RNG states, counters;
- config.yaml: the run's config snapshot.
It is written under a temporary name and renamed when complete, so a crash never leaves a half checkpoint that
`--resume auto` would pick; `complete.json`, written last, lists every file's size, and a directory without it (or
whose files differ from it, as a partial copy would) is torn: never resumed from, never pointed at by best.json.
The last `keep_last` are kept, plus the best by the configured metric.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from .atomic import atomic_dir, atomic_write_text
from .config import Config, save_config
from .model import is_prompt_learning

STATE_FILE = "trainer_state.pt"
# written last into a checkpoint, with every other file's size: without it (or with a size that differs) the
# directory is torn, whatever its name, and never loaded
COMPLETE_FILE = "complete.json"
# A prompt-learning adapter's whole trained module, for resume: PEFT's adapter file keeps only the virtual tokens'
# embeddings it computes (for P-tuning, the MLP that computes them is not in it)
PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"
BEST_FILE = "best.json"
PREFIX = "step-"
# keys that change only bookkeeping or evaluation: a resume may change them freely, any other is worth a warning
BOOKKEEPING_KEYS = {"train.resume", "train.save_every", "train.keep_last", "train.profile_memory",
                    "train.dist_timeout_s", "eval", "log"}


def rng_state() -> dict:
    """This process's generators: Python's, numpy's, torch's CPU one and its CUDA ones."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's tuple is unpacked into tensors and numbers so that weights_only=True can load it
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(states: list[dict] | dict, rank: int) -> bool:
    """Restore rank `rank`'s own generators from a checkpoint's states, one per rank: each rank draws its own dropout
    masks, and rank 0's state on every rank would restart the others' streams. False when the checkpoint holds no
    state for this rank (saved by fewer processes): its generators stay as seeded."""
    states = [states] if isinstance(states, dict) else states  # a checkpoint of before per-rank states: rank 0's
    if rank >= len(states):
        return False
    state = states[rank]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def _named(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def is_complete(path: Path) -> bool:
    """The completion marker is there and every file it lists has the size it records."""
    try:
        listed = json.loads((Path(path) / COMPLETE_FILE).read_text(encoding="utf-8"))["files"]
        return all((Path(path) / name).stat().st_size == size for name, size in listed.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match, torn ones are left out)."""
    return [path for path in _named(root) if is_complete(path)]


def torn_dirs(root: Path) -> list[Path]:
    """Checkpoint directories without a valid completion marker, oldest first: never loaded."""
    return [path for path in _named(root) if not is_complete(path)]


def save_checkpoint(root: Path, step: int, model, config: Config, state: dict,
                    adapter_weights: dict | None = None, tokenizer=None, rng_states: list[dict] | None = None) -> Path:
    """Write atomically; `state` holds optimizer/scheduler/scaler/sampler state dicts and counters;
    `adapter_weights` replaces the model's own (sharded) ones when given; `tokenizer` is saved beside a whole
    model's weights, so that the checkpoint is a model directory; `rng_states` holds every rank's generators, rank
    by rank (default: this process's alone)."""
    final = root / f"{PREFIX}{step:06d}"
    with atomic_dir(final) as temporary:  # `.step-000050.tmp`, which checkpoint_dirs never matches
        model.save_pretrained(temporary, state_dict=adapter_weights)  # PEFT: adapter weights and config only
        if is_prompt_learning(model):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.prompt_encoder.state_dict().items()},
                      temporary / PROMPT_ENCODER_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        torch.save({**state, "rng": rng_states or [rng_state()]}, temporary / STATE_FILE)
        save_config(config, temporary / "config.yaml")
        _mark_complete(temporary, step)
    return final


def _mark_complete(directory: Path, step: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory `step-000050` was saved at."""
    return int(Path(path).name[len(PREFIX):])


def config_changes(path: Path, current: Config) -> list[str]:
    """`key: saved -> current` for each key that changes the training maths between the config a checkpoint was
    saved with and the current one (as torchtune warns on resume); bookkeeping and evaluation keys are ignored."""
    saved_file = Path(path) / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    changes = []
    for section, values in current.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            before = saved.get(section, {}).get(key, value)
            if section not in BOOKKEEPING_KEYS and name not in BOOKKEEPING_KEYS and before != value:
                changes.append(f"{name}: {before!r} -> {value!r}")
    return changes


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, said in one line naming it."""


def load_state(path: Path) -> dict:
    """trainer_state.pt, unpickling tensors and plain values only: a file holding other objects is refused."""
    import pickle

    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path / STATE_FILE}: holds objects other than tensors and plain values, which are "
                              f"never unpickled here (torch.load weights_only=True: {first})") from None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """'' -> None; 'auto' -> the latest complete checkpoint under root (None when there is none); else the path."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})")
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {resume}: a torn checkpoint (no valid {COMPLETE_FILE}: the save did not "
                                f"finish); resume from an earlier one")
    return path


def run_dir_to_resume(resume: str, runs: Path = Path("runs")) -> Path | None:
    """The run directory a resume continues in, when log.dir is not given: the checkpoint's own run for a path,
    the newest run with a checkpoint for 'auto'."""
    if resume and resume != "auto":
        return Path(resume).resolve().parent.parent  # <run>/checkpoints/step-N
    if resume == "auto" and runs.is_dir():
        candidates = [run for run in runs.iterdir() if checkpoint_dirs(run / "checkpoints")]
        return max(candidates, key=lambda run: run.stat().st_mtime) if candidates else None
    return None


def beats_best(root: Path, value: float, mode: str) -> bool:
    """Whether `value` beats the best recorded in best.json (any value does when none is)."""
    best_file = root / BEST_FILE
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    return best is None or (value < best["value"] if mode == "min" else value > best["value"])


def record_best(root: Path, step: int, metric: str, value: float) -> None:
    """Point best.json at the checkpoint of `step`, which must be complete: called after its save."""
    path = root / f"{PREFIX}{step:06d}"
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint; best.json keeps pointing at the previous best")
    atomic_write_text(root / BEST_FILE, json.dumps({"step": step, "metric": metric, "value": value,
                                                    "path": path.name}, indent=1))


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints, sparing the best."""
    best_file = root / BEST_FILE
    best = json.loads(best_file.read_text())["path"] if best_file.is_file() else None
    complete = checkpoint_dirs(root)
    for path in complete[:max(0, len(complete) - keep_last)]:
        if path.name != best:
            shutil.rmtree(path)


def load_adapter(model, path: Path) -> None:
    """Load saved trained weights into the model built for them (exact: the same tensors that were saved): an
    adapter into its PeftModel, a whole model's weights (peft.method=full) into the model."""
    from safetensors.torch import load_file

    if not hasattr(model, "peft_config"):
        _load_whole(model, path)
        return
    if is_prompt_learning(model):
        model.prompt_encoder.load_state_dict(load_file(path / PROMPT_ENCODER_FILE), strict=True)
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter does not match the model ({len(result.unexpected_keys)} unexpected keys, "
                         f"e.g. {result.unexpected_keys[0]}); was it trained with another peft or lora config?")


def _load_whole(model, path: Path) -> None:
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{path}: no model.safetensors; was it saved by a peft.method other than full?")
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    loaded = {id(model.get_parameter(name)) for name, _ in model.named_parameters(remove_duplicate=False)
              if name not in missing}
    untied = [name for name in missing if id(model.get_parameter(name)) not in loaded]  # tied ones are saved once
    if unexpected or untied:
        raise ValueError(f"{path}: the saved weights do not match the model (missing {untied[:3]}, unexpected "
                         f"{unexpected[:3]})")


def resolve_adapter(path: str | Path) -> Path:
    """An adapter directory as given, or for a run directory its best checkpoint (else its latest)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    checkpoints = path / "checkpoints"
    best = checkpoints / BEST_FILE
    best_dir = checkpoints / json.loads(best.read_text())["path"] if best.is_file() else None
    found = checkpoint_dirs(checkpoints)
    if best_dir is not None and is_complete(best_dir):
        chosen = best_dir
    elif found:
        chosen = found[-1]
    else:
        raise FileNotFoundError(f"{path}: neither an adapter directory nor a run directory with checkpoints")
    if not (chosen / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: its checkpoints are whole models (peft.method=full), not adapters; pass "
                                f"one as --model, e.g. --model {chosen}")
    return chosen
