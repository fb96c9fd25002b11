"""Several processes: data parallel (DDP, the default) or fully sharded (FSDP2), behind one small interface.

DDP keeps the whole frozen base on every device and all-reduces the LoRA gradients once per optimizer step. FSDP
shards the base as well, so a model too big for one card trains on several: every decoder layer is its own
all-gather unit and the loss module is the root that owns the embeddings, the final norm and lm_head (tied weights
stay in one unit). Accelerate's FSDP plugin is not used: it prepares model and optimizer together and saves whole
models, while a LoRA run wants fp32 adapters on a bf16/fp16 frozen base, an optimizer over the adapters only and
adapter-only checkpoints. Under FSDP every forward is a collective, so all ranks evaluate the same batches.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .config import Config, ConfigError


class Parallel:
    """`cfg.train.fsdp` says which: load_config sets it for an FSDP accelerate config, and has checked the rest."""

    def __init__(self, accelerator, cfg: Config):
        self.accelerator = accelerator
        self.fsdp = cfg.train.fsdp

    def wrap(self, loss_module: nn.Module) -> nn.Module:
        """DDP around the loss module, or FSDP2 shards: one unit per decoder layer, the loss module the root."""
        if not self.fsdp:
            return self.accelerator.prepare(loss_module)  # DDP wraps the loss module, so LoRA grads sync
        layers = getattr(loss_module.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"train.fsdp: {type(loss_module.decoder).__name__} keeps no decoder layers in "
                              "`.layers`, the units FSDP shards by; train this model with DDP")
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(loss_module)
        # FSDP takes as root the first unit to run forward. Decoding calls the layers without the loss module, so
        # an evaluation before any loss forward would make each layer its own root and the next loss forward raise
        # "already been lazily initialized". torch has no public call for this.
        loss_module._get_fsdp_state()._lazy_init()
        return loss_module

    def gradient_sync(self, module: nn.Module, sync: bool):
        """Context for one micro-step: reduce gradients across ranks only when `sync` (the last micro-step)."""
        if sync:
            return nullcontext()
        return self._fsdp_no_sync(module) if self.fsdp else self.accelerator.no_sync(module)

    @staticmethod
    @contextmanager
    def _fsdp_no_sync(module):
        module.set_requires_gradient_sync(False)  # unsharded gradients accumulate locally until the last micro-step
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def grad_scaler(self, device_type: str, enabled: bool):
        """The fp16 loss scaler; the sharded one agrees on inf/NaN across ranks, since each sees only its shard."""
        if self.fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device_type, enabled=enabled)
        return torch.amp.GradScaler(device_type, enabled=enabled)

    @staticmethod
    def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip in place; the total norm over all ranks' shards as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def shard(self, items: list) -> list:
        """This rank's share of evaluation work: all of it under FSDP, where every forward is a collective."""
        if self.fsdp:
            return items
        return items[self.accelerator.process_index::self.accelerator.num_processes]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-rank evaluation totals (under FSDP every rank already holds the whole sum)."""
        return values if self.fsdp else self.accelerator.reduce(values)

    def whole_model(self, loss_module: nn.Module):
        """Context in which the PEFT model can be called directly (decoding): the root's shards are gathered, and
        on leaving it every rank has run as many decoder forwards as the others, however many its decoding took."""
        if not self.fsdp:
            return nullcontext()
        return self._unsharded(loss_module)

    @contextmanager
    def _unsharded(self, module):
        module.unshard()  # the layers gather their own weights in their forward hooks
        try:
            with _forwards_in_lockstep(module.decoder, self.accelerator.device):
                yield
        finally:
            module.reshard()

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Whole adapter weights for PEFT's save_pretrained (None = let PEFT read them). A collective under FSDP:
        every rank calls it; only the LoRA parameters are gathered, never the base."""
        if not self.fsdp:
            return None
        return {name: param.full_tensor().cpu() for name, param in model.named_parameters() if param.requires_grad}

    def optimizer_state_dict(self, loss_module: nn.Module, optimizer) -> dict:
        """Optimizer state to save; under FSDP gathered whole on rank 0 (keyed by parameter name), a collective."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(loss_module, optimizer, options=options)

    def load_optimizer_state_dict(self, loss_module: nn.Module, optimizer, state: dict) -> None:
        """Every rank reads the whole state and keeps its shard."""
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(loss_module, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextmanager
def _forwards_in_lockstep(decoder: nn.Module, device: torch.device):
    """Every rank leaves having run as many forwards of `decoder` as the rank that ran most. Under FSDP each forward
    all-gathers every layer, and how many forwards decoding takes is each rank's own: a value ends where the greedy
    token closes its quote, and ranks on other hardware or kernels can pick other tokens. Before each forward the
    ranks count how many of them forward; a rank that is done forwards one token for as long as another is not."""
    def announce(module, args) -> None:
        _ranks_forwarding(1, device)

    handle = decoder.register_forward_pre_hook(announce)
    try:
        yield
    finally:
        handle.remove()
    # not after an error: the other ranks' next collective fails, as when a rank dies
    with torch.no_grad():
        while _ranks_forwarding(0, device):
            decoder(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))


def _ranks_forwarding(forwarding: int, device: torch.device) -> int:
    """How many ranks are about to forward (each says 1 or 0); a collective."""
    count = torch.tensor([forwarding], device=device)
    torch.distributed.all_reduce(count)
    return int(count)


def collective_failed(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process died or stopped answering: gloo says so
    with a RuntimeError from its sources, NCCL with a DistError."""
    return isinstance(err, torch.distributed.DistError) or "/gloo/" in str(err)


def lost_peer_message(err: BaseException, timeout_s: int) -> str:
    """One line for a failed collective (`collective_failed(err)`): this rank, the backend's reason, what to do."""
    cause = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0]).split(". ")[0]  # gloo's source location out
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else os.environ.get("RANK", "?")
    return (f"rank {rank}: a collective failed ({cause}): another process died or stopped answering (each waits "
            f"at most train.dist_timeout_s={timeout_s} s); its own output says why. The checkpoints saved before "
            "are complete: continue with --resume auto")
