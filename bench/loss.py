"""The output layer's loss three ways: the model's full logits, target-only logits (all target rows at once), and
target-only in chunks of rows. One training micro-step (forward + backward through LoRA) on the longest batch of a
training config's data (the step that sets a run's peak): step time interleaved in one process, peak memory in a
process per method, the losses compared, the numbers saved as JSON under bench/results/.

    python bench/loss.py [--config configs/demo.yaml] [--model PATH] [--batch-size N] [--chunk-rows N]
        [--methods full target chunked] [--repeats 3] [--dtype auto|fp32|bf16] [--results-dir bench/results]

Prompts are masked, so the full logits spend most of lm_head (262k rows on Gemma, 152k on Qwen) on positions whose
loss is thrown away; the target-only loss gathers the answer positions first, and chunking keeps only one chunk's
logits at once. Peak RSS never goes down in a process, so each method's peak is measured in a child process of its
own: its RSS before the step, and the high-water mark over two steps after resetting it (/proc/self/clear_refs).
On Gemma-3-270M at the demo's batch the full logits need over 10 GB: `--methods target chunked` there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_dtype_option,
    autocast_dtype,
    console,
    interleaved,
    lora_model,
    side_by_side,
    write_results,
)
from poetry.config import load_config  # noqa: E402
from poetry.feed import Collator, TaskData, target_tokens  # noqa: E402
from poetry.loss import TargetOnlyLoss, full_logits_loss  # noqa: E402
from poetry.profiling import proc_status_gb  # noqa: E402
from poetry.prompt import PromptFormat  # noqa: E402

METHODS = ("full", "target", "chunked")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml",
                        help="training config whose data, micro_batch_size and loss_chunk_rows set the batch")
    parser.add_argument("--model", help="default: the config's model.path")
    parser.add_argument("--batch-size", type=int, help="default: the config's train.micro_batch_size")
    parser.add_argument("--chunk-rows", type=int, help="default: the config's train.loss_chunk_rows")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one untimed warm-up")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # a child: measure one method's memory
    add_dtype_option(parser)
    args = parser.parse_args()
    cfg = load_config(args.config, [], device="cpu")
    args.model = args.model or cfg.model.path
    args.batch_size = args.batch_size or cfg.train.micro_batch_size
    args.chunk_rows = cfg.train.loss_chunk_rows if args.chunk_rows is None else args.chunk_rows
    args.cfg = cfg
    return args


def longest_batch(tokenizer, cfg, batch_size: int) -> dict[str, torch.Tensor]:
    """The `batch_size` longest training examples of epoch 0, collated: the micro-batch of a run's peak memory (the
    length-bucketing sampler puts them together)."""
    examples = TaskData(cfg.data, PromptFormat(tokenizer), cfg.train.seed).train_epoch(0)
    return longest_of(examples, Collator(tokenizer.pad_token_id), batch_size)


def longest_of(examples, collate, batch_size: int) -> dict[str, torch.Tensor]:
    longest = sorted(range(len(examples)), key=lambda i: examples[i]["length"])[-batch_size:]
    return collate(examples[longest])


def labels(chunk_rows: int) -> dict[str, str]:
    return {"full": "full logits", "target": "target-only logits",
            "chunked": f"target-only, chunks of {chunk_rows} rows"}


def micro_steps(args: argparse.Namespace):
    """(a micro-step per method, the batch, the losses they record)."""
    tokenizer, model = lora_model(args.model)
    batch = longest_batch(tokenizer, args.cfg, args.batch_size)
    bf16 = autocast_dtype(args.dtype).value == "bf16"
    loss_fns = {"full": lambda **b: full_logits_loss(model, **b), "target": TargetOnlyLoss(model, chunk_rows=0),
                "chunked": TargetOnlyLoss(model, chunk_rows=args.chunk_rows)}
    losses = {}

    def step(name: str):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss_sum, n_targets = loss_fns[name](**batch)
            (loss_sum / n_targets).backward()
            losses[name] = (loss_sum / n_targets).item()
        return run

    return {name: step(name) for name in args.methods}, batch, losses


def measure_memory(args: argparse.Namespace) -> None:
    """A child's work: two micro-steps of one method; prints its memory as JSON."""
    steps, _, losses = micro_steps(args)
    before = proc_status_gb("VmRSS")  # the model, adapters and batch
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the current RSS
    steps[args.only]()
    steps[args.only]()
    peak = proc_status_gb("VmHWM")
    print(json.dumps({"method": args.only, "rss_before_step_gb": round(before, 3), "peak_rss_gb": round(peak, 3),
                      "step_gb": round(peak - before, 3), "loss": losses[args.only]}))


def memory_in_children(args: argparse.Namespace) -> dict[str, dict]:
    """Each method's memory, measured in a process of its own, one after another."""
    memory = {}
    for name in args.methods:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name],
                               capture_output=True, text=True, check=True)
        memory[name] = json.loads(child.stdout.strip().splitlines()[-1])
    return memory


def memory_table(title: str, memory: dict[str, dict], names: dict[str, str]) -> None:
    table = Table(title=title)
    for column in ("method", "peak RSS GB", "RSS before the step GB", "the step's own GB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, measured in memory.items():
        table.add_row(names[name], f"{measured['peak_rss_gb']:.2f}", f"{measured['rss_before_step_gb']:.2f}",
                      f"{measured['step_gb']:.2f}")
    console.print(table)


def main() -> None:
    args = parse_args()
    if args.only:
        measure_memory(args)
        return
    memory = memory_in_children(args)  # before this process loads a model of its own
    steps, batch, losses = micro_steps(args)
    names = labels(args.chunk_rows)
    times = interleaved({names[name]: run for name, run in steps.items()}, args.repeats)
    sequences, length = batch["input_ids"].shape
    tokens, targets = batch["attention_mask"].sum().item(), target_tokens(batch)
    dtype = autocast_dtype(args.dtype)
    what = (f"one micro-step, {args.model}: {sequences} x {length} ({tokens} tokens, {targets} targets), autocast "
            f"{dtype.value}, {torch.get_num_threads()} threads")
    side_by_side(what, times, note="loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    memory_table(f"peak memory, a process per method: {what}", memory, names)
    path = write_results("loss", {
        "args": {"config": args.config, "model": args.model, "batch_size": args.batch_size,
                 "chunk_rows": args.chunk_rows, "repeats": args.repeats, "dtype": dtype.value},
        "batch": {"sequences": sequences, "padded_length": length, "tokens": tokens, "targets": targets},
        "seconds": {name: times[names[name]] for name in steps},
        "median_seconds": {name: statistics.median(times[names[name]]) for name in steps},
        "memory": memory, "loss": losses}, args.results_dir)
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
