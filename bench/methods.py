"""Every tuning method side by side: the same model, data, steps and evaluation, one train.py run each.

    python bench/methods.py [--config configs/demo.yaml] [--data DIR] [--model DIR] [--steps 12] [--max-questions 12]
        [--methods lora prompt_tuning p_tuning prefix_tuning ia3 full] [--name methods] [--results-dir DIR]

Each method runs `train.py --config CONFIG peft.method=M` for `--steps` optimizer steps and is evaluated once,
after the last step (validation loss on every held-out example, constrained answers to `--max-questions` of them).
Its learning rate is the one the method is usually trained with (METHOD_LR: prompt embeddings and scalings take far
larger steps than LoRA's matrices, every weight a far smaller one), not a tuned one; prefix tuning runs without
gradient checkpointing, which PEFT refuses for it. The table gives trainable parameters, final val/loss and
val/proxy_total, training seconds (train.py's own count, without loading and evaluation) and the process's peak
resident memory (training and evaluation), with the machine; the JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, console, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "full")
METHOD_LR = {"lora": None, "prompt_tuning": 3e-2, "p_tuning": 1e-2, "prefix_tuning": 1e-2, "ia3": 1e-2,
             "full": 2e-5}  # None: the config's own (configs/demo.yaml's is LoRA's)
METHOD_OVERRIDES = {"prefix_tuning": ["model.gradient_checkpointing=false"]}


def run_method(method: str, args: argparse.Namespace, run_dir: Path) -> dict:
    overrides = [f"peft.method={method}", f"train.max_steps={args.steps}", f"eval.every={args.steps}",
                 "eval.at_start=false", f"eval.max_questions={args.max_questions}", f"log.dir={run_dir}",
                 "log.curves=false", *METHOD_OVERRIDES.get(method, [])]
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.model:
        overrides.append(f"model.path={args.model}")
    if METHOD_LR[method] is not None:
        overrides.append(f"train.lr={METHOD_LR[method]}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", args.config, *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"method": method, "error": (done.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1)}
    printed = done.stdout
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = next(m for m in reversed(final) if "val/loss" in m)
    trainable = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", printed)
    pace = re.search(r"this session: ([\d.]+) steps/s", printed)
    peak = max((m["mem/peak_rss_gb"] for m in final if "mem/peak_rss_gb" in m), default=None)
    return {"method": method, "lr": METHOD_LR[method], "overrides": overrides,
            "trainable": int(trainable.group(1).replace(",", "")), "total": int(trainable.group(2).replace(",", "")),
            "val_loss": evaluated["val/loss"], "proxy_total": evaluated.get("val/proxy_total"),
            "acc": evaluated.get("val/acc"), "bleu_words": evaluated.get("val/bleu_words"),
            "bleu_sents": evaluated.get("val/bleu_sents"),
            "train_s": round(args.steps / float(pace.group(1)), 1) if pace else None,
            "peak_rss_gb": peak, "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--data", help="data.train for every run (default: the config's)")
    parser.add_argument("--model", help="model.path for every run (default: the config's)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-questions", type=int, default=12)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--name", default="methods")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="methods-") as scratch:
        for method in args.methods:
            results.append(run_method(method, args, Path(scratch) / method))
            console.print(f"{method}: {results[-1]}", highlight=False)
    table = Table(title=f"tuning methods, {args.steps} steps each: {Path(args.config).name}"
                        + (f", data {args.data}" if args.data else ""))
    for column in ("method", "lr", "trainable", "val/loss", "proxy_total", "acc", "train s", "peak RSS GB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["method"], "", "", "error: " + r["error"][:60], "", "", "", "")
            continue
        table.add_row(r["method"], f"{r['lr']:g}" if r["lr"] else "config", f"{r['trainable']:,}",
                      f"{r['val_loss']:.4f}", f"{r['proxy_total']:.4f}" if r["proxy_total"] is not None else "n/a",
                      f"{r['acc']:.3f}" if r["acc"] is not None else "n/a",
                      f"{r['train_s']:.0f}" if r["train_s"] else "?",
                      f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] else "?")
    console.print(table)
    path = write_results(args.name, {"config": args.config, "data": args.data, "steps": args.steps,
                                     "max_questions": args.max_questions, "results": results}, Path(args.results_dir))
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
