"""poetry.memory's estimate against the measured peak of a training step on CPU, for each training config given.

    python bench/memory.py [--configs configs/tiny.yaml configs/demo.yaml] [--variant name:key=value,...]
        [--results-dir bench/results] [section.key=value ...]

Each config runs in a process of its own, built by train.py's own `setup` (model, adapters, optimizer, data), with
the estimate's process constant read where train.py reads it. The step is one optimizer step of grad_accum
micro-batches, each the longest batch of epoch 0 (the one that sets a run's peak), run twice so the optimizer state
exists; the peak is the process's resident high-water mark (VmHWM), loading included. The estimate is made for that
same batch (sequences x padded length, its target tokens). `--variant` adds runs with overrides, e.g.
`--variant checkpointed:model.gradient_checkpointing=true`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS_DIR, console, write_results  # noqa: E402
from bench.loss import longest_of  # noqa: E402
from poetry.profiling import proc_status_gb  # noqa: E402

DEFAULT_CONFIGS = ["configs/tiny.yaml", "configs/demo.yaml"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:section.key=value[,section.key=value]: one more run of every config")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # a child: measure one config
    parser.add_argument("overrides", nargs="*", help="section.key=value, for every run")
    return parser.parse_args()


def measure(config: str, overrides: list[str]) -> dict:
    """A child's work: the estimate and the measured peak of one config's worst training step."""
    from poetry import memory
    from poetry.config import load_config
    from poetry.feed import target_tokens

    import train

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(config, [*overrides, f"log.dir={run_dir}", "eval.at_start=false"], device="cpu")
        run = train.setup(cfg)
        batch = longest_of(run.data.train_epoch(0), run.collate, cfg.train.micro_batch_size)
        before_step_gb = proc_status_gb("VmRSS")
        seconds = [optimizer_step(run, batch) for _ in range(2)]
        run.log.close()
    shape = memory.Shape.from_config(run.model.config)
    rows = memory.estimate(cfg, shape, "cpu", batch=tuple(batch["input_ids"].shape), targets=target_tokens(batch),
                           process_gb=run.process_gb)
    return {"config": config, "overrides": overrides, "precision": cfg.train.precision,
            "batch": list(batch["input_ids"].shape), "targets": target_tokens(batch),
            "estimate_gb": round(sum(gb for _, gb, _ in rows), 3),
            "estimate_rows": {what: round(gb, 3) for what, gb, _ in rows},
            "process_gb": round(run.process_gb, 3), "rss_before_step_gb": round(before_step_gb, 3),
            "peak_rss_gb": round(proc_status_gb("VmHWM"), 3), "step_seconds": [round(s, 2) for s in seconds]}


def optimizer_step(run, batch: dict[str, torch.Tensor]) -> float:
    """grad_accum forward/backward passes of `batch` and the optimizer step, as train.fit runs them; seconds."""
    import train

    started = time.time()
    run.loss_model.train()
    for _ in range(run.cfg.train.grad_accum):
        with train.autocast(run.cfg.train.precision, "cpu"):
            loss_sum, n_targets = run.loss_model(**batch)
        (loss_sum / n_targets).backward()
    train.optimizer_step(run)
    return time.time() - started


def runs(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(label, config, overrides) of every run: each config as it ships, then under each variant."""
    variants = [("", [])] + [(v.split(":", 1)[0], v.split(":", 1)[1].split(",")) for v in args.variant]
    return [(f"{Path(config).stem}{' ' + name if name else ''}", config, [*args.overrides, *extra])
            for config in args.configs for name, extra in variants]


def main() -> None:
    args = parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.overrides)))
        return
    results = {}
    for label, config, overrides in runs(args):
        child = subprocess.run([sys.executable, __file__, "--only", config, *overrides], capture_output=True,
                               text=True, cwd=ROOT)
        if child.returncode:
            sys.exit(f"{label}: the measuring process failed:\n{child.stderr[-3000:]}")
        results[label] = json.loads(child.stdout.strip().splitlines()[-1])
    table = Table(title=f"poetry.memory's estimate against the measured peak RSS of a training step "
                        f"({torch.get_num_threads()} threads)")
    for column in ("run", "precision", "batch", "targets", "estimate GiB", "peak GiB", "estimate / peak",
                   "step s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, r in results.items():
        estimate, peak = r["estimate_gb"], r["peak_rss_gb"]
        table.add_row(label, r["precision"], "x".join(map(str, r["batch"])), str(r["targets"]), f"{estimate:.2f}",
                      f"{peak:.2f}", f"{estimate / peak:.2f}", f"{r['step_seconds'][-1]:.1f}")
    console.print(table)
    path = write_results("memory", {"args": {"configs": args.configs, "variants": args.variant,
                                             "overrides": args.overrides}, "runs": results}, args.results_dir)
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
