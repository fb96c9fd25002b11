"""What the benchmarks share: a LoRA model from a config-style path, the `--dtype` option, a training batch from the
sample data, interleaved timing, the side-by-side table, and the machine a result was measured on."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from poetry.builtin import resolve_model_path
from poetry.config import DataConfig, LoraConfig, ModelConfig
from poetry.feed import Collator, TaskData
from poetry.model import add_lora, load_model, load_tokenizer, with_saved_adapter
from poetry.precision import Choice, choose, cpu_flags, cpu_native_bf16, cpuinfo_field
from poetry.prompt import PromptFormat
from poetry.quiet import quiet_libraries

Z95 = 1.959964  # the standard normal quantile of a two-sided 95% interval
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# the flags that decide which float formats are fast on an x86 CPU
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# the variables that cap the kernels' instruction set below the CPU's (an AVX-512 machine timing AVX2 kernels)
KERNEL_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# rich wraps to 80 columns when stdout is a file or pipe, which cuts the model names off in saved benchmark output
console = Console(width=None if sys.stdout.isatty() else 160)


def inference_model(path: str, dtype: str, adapter: str | Path | None = None, merge: bool = False):
    """The model as infer.py and the loop's evaluation run it, in eval mode: the base (a local directory) with its
    weights in the autocast dtype `dtype`, and `adapter` unmerged, or merged with `merge`. Weights in fp32 under a
    bf16 autocast would be cast again at every forward once an adapter has frozen them (autocast caches its casts
    of trainable weights only): fine-tuned decoding ran 2.5x slower so (Intel with avx512_bf16, 2026-12-04)."""
    model = load_model(ModelConfig(path=path, dtype=dtype), for_training=False)
    if adapter:
        model = with_saved_adapter(model, adapter)
        if merge:
            model = model.merge_and_unload()
    return model.eval()


def lora_model(path: str, for_training: bool = True, dtype: str = "fp32"):
    """(tokenizer, PEFT model with the default LoRA on all linear layers, its base weights in `dtype`) from a local
    dir or builtin:NAME."""
    quiet_libraries()
    path = resolve_model_path(path)
    return load_tokenizer(path), add_lora(load_model(ModelConfig(path=path, dtype=dtype),
                                                     for_training=for_training), LoraConfig())


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="autocast dtype; auto: bf16 only where this CPU has native bf16 instructions")


def autocast_dtype(requested: str) -> Choice:
    """--dtype resolved for the CPU; a choice that runs far slower here than the other one is warned about at once."""
    choice = choose(requested, "cpu", "--dtype")
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr)
    return choice


def training_batch(tokenizer, data: str, batch_size: int, length_quantile: float) -> dict[str, torch.Tensor]:
    """`batch_size` training examples of `data` (epoch 0), collated: the shortest of those at or above the
    `length_quantile` of lengths, so a batch is typical of the data and barely padded."""
    examples = TaskData(DataConfig(train=data, val_fraction=0.0), PromptFormat(tokenizer), seed=0).train_epoch(0)
    by_length = sorted(range(len(examples)), key=lambda i: examples[i]["length"])
    start = int(len(examples) * length_quantile)
    return Collator(tokenizer.pad_token_id)(examples[by_length[start:start + batch_size]])


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
    console.print(table)


def cpu_model_name() -> str:
    return cpuinfo_field(("model name",)) or platform.processor() or platform.machine() or "unknown cpu"


def machine() -> dict:
    """What a benchmark's numbers depend on; call it after setting the thread count."""
    native, detail = cpu_native_bf16()
    flags = cpu_flags()
    return {"cpu": cpu_model_name(), "cpu_flags": [flag for flag in REPORTED_CPU_FLAGS if flag in flags],
            "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "native_bf16": native, "native_bf16_detail": detail,
            "kernel_caps": {name: os.environ[name] for name in KERNEL_CAP_VARIABLES if os.environ.get(name)},
            # other jobs on the cores skew the timings, multi-threaded ones most: 1, 5 and 15 minute averages
            "load_average": [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": version("transformers"), "peft": version("peft")},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_results(name: str, results: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """`results` with machine() as `results_dir`/NAME-CPU-DATE.json (CPU slugged from its model name, and any
    kernel caps after it); a later run on the same CPU, caps and day replaces the earlier one."""
    host = machine()
    caps = dict.fromkeys(cap.lower() for cap in host["kernel_caps"].values())
    cpu = " ".join([host["cpu"], "capped", *caps]) if caps else host["cpu"]
    cpu_slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    path = Path(results_dir) / f"{name}-{cpu_slug}-{host['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": host, **results}, indent=2) + "\n", encoding="utf-8")
    return path


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: unlike p ± z·se, it stays in [0, 1] and is not empty
    at 0 or n successes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
