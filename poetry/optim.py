"""Optimizer and learning-rate schedule, by optimizer step."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .config import TrainConfig

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no decay on biases and norm weights (1-D tensors): decaying them only fights
    the normalisation."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + [{"params": no_decay, "weight_decay": 0.0}] if no_decay else groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW keeps two states in 1 byte each instead of 4 (2 B/param vs 8 B/param); the paged
    variants move state to CPU memory under GPU memory pressure instead of failing."""
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    optimizers = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
                  "paged_adamw": bnb.optim.PagedAdamW}
    return optimizers[cfg.optimizer](groups, **kwargs)


def repage_state(optimizer: torch.optim.Optimizer) -> None:
    """Put a paged optimizer's loaded state back into paged buffers. bitsandbytes' load_state_dict moves `state1`
    and `state2` with `.to(param.device)`, which makes them ordinary GPU tensors: after a resume the state would
    stay in GPU memory, which paging exists to relieve. Each is copied into the buffer the optimizer itself would
    allocate for it (`get_state_buffer`: paged on a GPU from 1e5 elements up, plain on the CPU)."""
    if not getattr(optimizer, "is_paged", False):
        return
    for param_state in optimizer.state.values():
        for key in ("state1", "state2"):
            loaded = param_state.get(key)
            if isinstance(loaded, torch.Tensor) and not getattr(loaded, "is_paged", False):
                param_state[key] = optimizer.get_state_buffer(loaded, dtype=loaded.dtype).copy_(loaded)


def lr_lambda(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine or linear decay to min_ratio at `total` (held there after).

    Not transformers' get_*_schedule_with_warmup: those spend the first optimizer step at lr 0, decay linear to 0
    whatever min_ratio, and raise the cosine again past `total` (tests/test_model.py compares them step by step)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup, total_steps, cfg.scheduler, cfg.min_lr_ratio))
