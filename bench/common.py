"""What the benchmarks share: a LoRA model from a config-style path, interleaved timing, the side-by-side table."""
from __future__ import annotations

import statistics
import time
from typing import Callable

from rich.console import Console
from rich.table import Table

from poetry.config import LoraConfig, ModelConfig
from poetry.model import add_lora, load_model, load_tokenizer
from poetry.models import resolve_model_path
from poetry.quiet import quiet_libraries


def lora_model(path: str, for_training: bool = True):
    """(tokenizer, fp32 PEFT model with the default LoRA on all linear layers) from a local dir or builtin:NAME."""
    quiet_libraries()
    path = resolve_model_path(path)
    return load_tokenizer(path), add_lora(load_model(ModelConfig(path=path, dtype="fp32"),
                                                     for_training=for_training), LoraConfig())


def interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method, alternating methods within each round so that a machine that gets busier
    or quieter during the run weighs on all of them alike. One untimed warm-up call each."""
    for run in methods.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def side_by_side(title: str, times: dict[str, list[float]], note: str = "") -> None:
    """Median seconds per method, their spread, and the speed-up of each over the first row."""
    table = Table(title=title, caption=note or None)
    for column in ("method", "median s", "min-max s", "speed-up"):
        table.add_column(column, justify="left" if column == "method" else "right")
    baseline = statistics.median(next(iter(times.values())))
    for name, seconds in times.items():
        median = statistics.median(seconds)
        table.add_row(name, f"{median:.3f}", f"{min(seconds):.3f}-{max(seconds):.3f}", f"{baseline / median:.2f}x")
    Console().print(table)
