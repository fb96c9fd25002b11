"""In-loop evaluation on the validation poems: loss / perplexity, and task metrics from constrained decoding."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import EvalConfig


class Evaluator:
    def __init__(self, cfg: EvalConfig, data, fmt, collate, accelerator, autocast: Callable):
        self.cfg, self.data, self.fmt, self.collate = cfg, data, fmt, collate
        self.accelerator, self.autocast = accelerator, autocast

    def _shard(self, dataset) -> list[list[int]]:
        """This rank's share of length-sorted batches: validation is summed over ranks, so shards may differ."""
        order = sorted(range(len(dataset)), key=lambda i: dataset[i]["length"])
        batches = [order[i:i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
        return batches[self.accelerator.process_index::self.accelerator.num_processes]

    @torch.no_grad()
    def loss(self, loss_module) -> dict[str, float]:
        dataset, device = self.data.val_dataset, self.accelerator.device
        totals = torch.zeros(2, device=device, dtype=torch.float64)
        for indices in self._shard(dataset):
            batch = {k: v.to(device) for k, v in self.collate(dataset[indices]).items()}
            with self.autocast():
                loss_sum, n_targets = loss_module(**batch)
            totals += torch.stack([loss_sum.double(), n_targets.double()])
        loss_sum, n_targets = self.accelerator.reduce(totals).tolist()
        mean = loss_sum / n_targets
        return {"val/loss": mean, "val/ppl": math.exp(min(mean, 50.0))}

    def run(self, loss_module, model) -> dict[str, float]:
        """Metrics for the current weights; leaves the model in eval mode (the loop switches it back)."""
        metrics: dict[str, float] = {}
        loss_module.eval()
        if self.cfg.loss and self.data.val_dataset is not None and len(self.data.val_dataset):
            metrics.update(self.loss(loss_module))
        return metrics
