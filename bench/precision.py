"""fp32 against bf16 step time, side by side, for the tiny model and Gemma-3-270M on the machine at hand: one LoRA
training micro-step (forward + backward through the target-only loss) on real prompts, in fp32 and under bf16
autocast, the two losses compared, and the raw numbers kept as JSON under bench/results/.

    python bench/precision.py [--model builtin:tiny-qwen3 --model builtin:gemma-3-270m] [--batch-size 1]
        [--repeats 2] [--length-quantile 0] [--threads N] [--results-dir bench/results]

bf16 pays only on a CPU with native bf16 instructions (AVX512-BF16, AMX-BF16): there it ran ~1.7x faster than fp32.
Without them (AVX2 only) PyTorch falls back to slow bf16 matmuls, mostly on one thread: a step ran 14-80x slower on a
2-core AMD EPYC, longer sequences worse. The defaults are sized for that case: one of the shortest sequences, two
timed rounds after the warm-up; there the default run took 5-9 minutes, nearly all of it Gemma's three bf16 steps. On
a bf16 CPU, raise --batch-size and --length-quantile (0.5 is the median length bench/loss.py uses) for numbers
closer to training.

On a machine other jobs are using, pass --threads 1: two torch threads that each wait for a core busy elsewhere made
the fp32 steps ~20x slower there while the single-threaded bf16 fallback barely changed, so the bf16/fp32 ratio
came out far too low (the JSON records the load average).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, console, interleaved, lora_model, side_by_side, training_batch, write_results  # noqa: E402
from poetry.feed import target_tokens  # noqa: E402
from poetry.loss import TargetOnlyLoss  # noqa: E402
from poetry.model import skip_adapter_input_casts  # noqa: E402
from poetry.precision import choose  # noqa: E402

DEFAULT_MODELS = ("builtin:tiny-qwen3", "builtin:gemma-3-270m")
DTYPES = ("fp32", "bf16")


def measure(model_path: str, args: argparse.Namespace) -> dict:
    """Seconds per micro-step and the loss, in each of DTYPES, for one model; prints their side-by-side table. Each
    precision runs as train.py runs it: the frozen base in that dtype (`model.dtype: auto` follows the precision),
    and under bf16 autocast without PEFT's cast of the adapters' inputs; the same LoRA init in both."""
    models = {}
    for dtype in DTYPES:
        torch.manual_seed(0)
        tokenizer, models[dtype] = lora_model(model_path, dtype=dtype)
    skip_adapter_input_casts(models["bf16"])
    batch = training_batch(tokenizer, args.data, args.batch_size, args.length_quantile)
    losses = {}

    def step(dtype: str):
        model, target_only = models[dtype], TargetOnlyLoss(models[dtype])

        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss_sum, n_targets = target_only(**batch)
            loss = loss_sum / n_targets
            loss.backward()
            losses[dtype] = loss.item()
        return run

    times = interleaved({dtype: step(dtype) for dtype in DTYPES}, args.repeats)
    sequences, length = batch["input_ids"].shape
    tokens = batch["attention_mask"].sum().item()
    relative_difference = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    side_by_side(f"one LoRA micro-step, {model_path}: {sequences} x {length} tokens ({tokens} unpadded), "
                 f"{target_tokens(batch)} targets, {torch.get_num_threads()} threads", times,
                 note=f"loss: fp32 {losses['fp32']:.6f}, bf16 {losses['bf16']:.6f} "
                      f"(relative difference {relative_difference:.1e}); bf16 = bf16 weights under bf16 autocast")
    return {"model": model_path, "sequences": sequences, "padded_length": length, "tokens": tokens,
            "targets": target_tokens(batch), "seconds": times, "loss": losses,
            "median_seconds": {dtype: statistics.median(times[dtype]) for dtype in DTYPES}}


def summary(results: list[dict], auto: str, caption: str) -> None:
    table = Table(title="fp32 against bf16 autocast, one LoRA micro-step", caption=caption)
    columns = ("model", "batch", "fp32 median s", "bf16 median s", "bf16/fp32", "fp32 tokens/s", "bf16 tokens/s",
               "auto picks")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for result in results:
        median = result["median_seconds"]
        table.add_row(result["model"], f"{result['sequences']} x {result['padded_length']}",
                      f"{median['fp32']:.3f}", f"{median['bf16']:.3f}", f"{median['bf16'] / median['fp32']:.1f}x",
                      f"{result['tokens'] / median['fp32']:.0f}", f"{result['tokens'] / median['bf16']:.0f}", auto)
    console.print(table)


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help=f"repeatable; default: {' and '.join(DEFAULT_MODELS)}")
    parser.add_argument("--data", default="data/sample/train-data")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one untimed warm-up")
    parser.add_argument("--length-quantile", type=float, default=0.0,
                        help="where in the sorted training lengths the batch starts: 0 the shortest, 0.5 the median")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's own choice")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    auto = choose("auto", "cpu", "--dtype")
    print(f"--dtype {auto.reason} -> {auto.value}")
    results = []
    for model_path in args.model or DEFAULT_MODELS:
        results.append(measure(model_path, args))
        gc.collect()  # the PEFT model holds reference cycles; free Gemma's ~1 GB fp32 copy before the next model loads
    wall_seconds = time.perf_counter() - started
    took = f"{int(wall_seconds // 60)} min {wall_seconds % 60:.0f} s"
    summary(results, auto.value, caption=f"{auto.reason}; tokens/s counts unpadded tokens; the whole run took {took}")
    path = write_results("precision", {
        "args": {"models": [result["model"] for result in results], "data": args.data, "batch_size": args.batch_size,
                 "repeats": args.repeats, "length_quantile": args.length_quantile},
        "auto": {"value": auto.value, "reason": auto.reason}, "results": results,
        "wall_seconds": round(wall_seconds, 1)}, args.results_dir)
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
