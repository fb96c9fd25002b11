"""Measured memory while training: peaks per phase (forward, backward, optimizer, eval) and the CUDA allocator's
history for --profile-memory. The estimate made before a run is poetry.memory's."""
from __future__ import annotations

import re
import resource
from contextlib import contextmanager
from pathlib import Path

import torch

GB = 1024**3


def proc_status_gb(field: str) -> float:
    """A memory field of /proc/self/status in GiB (Linux): VmRSS now, VmHWM the peak since start or clear_refs."""
    kib = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)
    return int(kib) * 1024 / GB


class MemoryMonitor:
    """Peak memory per phase (forward, backward, optimizer, eval): allocated and reserved on CUDA, process RSS on
    CPU (RSS peaks cannot be reset, so CPU reports one running peak)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.cuda:
            for kind, value in (("alloc", torch.cuda.max_memory_allocated(self.device)),
                                ("reserved", torch.cuda.max_memory_reserved(self.device))):
                key = f"mem/{name}_{kind}_gb"
                self.peaks[key] = max(self.peaks.get(key, 0.0), value / GB)

    def summary(self) -> dict[str, float]:
        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB
        return {**{k: round(v, 3) for k, v in self.peaks.items()}, "mem/peak_rss_gb": round(rss_gb, 3)}


class CudaSnapshot:
    """Records the CUDA allocator's history while entered, or until stop(), and dumps it for
    https://pytorch.org/memory_viz: one file per rank, since the ranks share the run directory and each dump is a
    plain open-and-pickle. Leaving the block dumps whatever ended it, an out-of-memory error included."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.path = Path(run_dir) / f"memory_snapshot.rank{rank}.pickle"
        self.active = enabled and torch.cuda.is_available()

    def __enter__(self) -> CudaSnapshot:
        if self.active:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            torch.cuda.memory._dump_snapshot(str(self.path))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
