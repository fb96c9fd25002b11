"""Our loop against the recipe the field copies, HF `Trainer` + PEFT + `DataCollatorForSeq2Seq`: first that both
compute the same thing, then how fast each does it.

    python bench/trainer.py parity [--steps 20]          # per-step loss and grad norm, then the adapters
    python bench/trainer.py speed [--model builtin:gemma-3-270m --config configs/demo.yaml --data DIR --steps 3]
    python bench/trainer.py padding [--data DIR]         # padding efficiency: our batches vs random batches

Parity runs train.py's own `setup` and `fit`, records every micro-batch the loop collates, and replays the same
examples in the same batches and order through Trainer, from a copy of the same LoRA init (fp32, CPU, no dropout,
constant learning rate: Trainer's schedules differ from ours by design, see poetry.optim.lr_scheduler).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from poetry.config import Config, load_config  # noqa: E402
from poetry.prompt import IGNORE_INDEX  # noqa: E402

import train as train_script  # noqa: E402

PARITY_OVERRIDES = ("train.precision=fp32", "train.micro_batch_size=4", "train.grad_accum=2", "train.lr=3e-3",
                    "train.scheduler=constant", "train.warmup_steps=0", "train.warmup_ratio=0",
                    "train.weight_decay=0.01", "train.optimizer=adamw", "train.max_grad_norm=1.0", "lora.dropout=0",
                    "eval.every=0", "eval.at_start=false", "eval.loss=false", "eval.decode=false",
                    "log.curves=false", "data.val_fraction=0")


@dataclass
class Counted:
    """Collates through `collate` and counts the real tokens and target tokens fed; `keep(examples, batch)`, if
    given, records each batch."""

    collate: Callable
    keep: Callable | None = None
    tokens: int = 0
    targets: int = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        if self.keep:
            self.keep(examples, batch)
        self.tokens += int(batch["attention_mask"].sum())
        self.targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch


def reset_accelerate() -> None:
    """One Accelerator per process: a second run in the same process needs the state reset."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --- parity --------------------------------------------------------------------------------------------------------

@dataclass
class Trace:
    losses: list[float]
    grad_norms: list[float]
    adapter: dict[str, torch.Tensor]


def adapter_of(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


def run_ours(cfg: Config):
    """train.py's setup and fit; returns (trace, the LoRA model as initialised, the recorded batches, epoch
    length in micro-batches)."""
    reset_accelerate()
    run = train_script.setup(cfg)
    initial = copy.deepcopy(run.model)
    recorded = []  # (epoch, the examples' ids and labels, the collated batch)
    run.collate = Counted(run.collate, keep=lambda columns, batch: recorded.append(
        (run.state.epoch, {"input_ids": list(columns["input_ids"]), "labels": list(columns["labels"])}, batch)))
    batches_per_epoch = len(run.sampler)
    train_script.fit(run)
    run.log.close()
    run.accelerator.end_training()
    records = [json.loads(line) for line in (run.log.dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    trace = Trace([r["train/loss"] for r in steps], [r["train/grad_norm"] for r in steps], adapter_of(run.model))
    return trace, initial, recorded, batches_per_epoch


class ReplayBatches(torch.utils.data.Sampler):
    """The recorded batches of epoch e on the e-th pass; `__len__` is the full epoch, as Trainer plans by it."""

    def __init__(self, epochs: list[list[list[int]]], batches_per_epoch: int):
        self.epochs, self.batches_per_epoch, self.passes = epochs, batches_per_epoch, 0

    def __iter__(self):
        batches = self.epochs[self.passes] if self.passes < len(self.epochs) else []
        self.passes += 1
        return iter(batches)

    def __len__(self) -> int:
        return self.batches_per_epoch


def trainer_class():
    from transformers import Trainer

    class ReplayTrainer(Trainer):
        """Trainer fed a given batch sampler: the same batches in the same order as our loop's."""

        def __init__(self, *args, batch_sampler, **kwargs):
            super().__init__(*args, **kwargs)
            self.replay = batch_sampler

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=self.replay,
                                               collate_fn=self.data_collator)

    return ReplayTrainer


def training_arguments(cfg: Config, output_dir: str, steps: int, **extra):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
        max_steps=steps, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
        adam_beta2=t.betas[1], max_grad_norm=t.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=t.seed,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, bf16=t.precision == "bf16", **extra)


def quiet(trainer) -> None:
    """Without tqdm Trainer prints every log line; the table says it better."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def seq2seq_collator(tokenizer, pad_to_multiple_of: int | None = 8):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def run_trainer_replay(cfg: Config, model, tokenizer, recorded, batches_per_epoch: int, steps: int):
    """Trainer on the recorded micro-batches; returns (trace, the batches DataCollatorForSeq2Seq built)."""
    rows, epochs = [], []
    for epoch, columns, _ in recorded:
        while len(epochs) <= epoch:
            epochs.append([])
        start = len(rows)
        rows += [{"input_ids": ids, "labels": labels}
                 for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True)]
        epochs[epoch].append(list(range(start, len(rows))))
    their_batches = []
    collate = Counted(seq2seq_collator(tokenizer), keep=lambda _, batch: their_batches.append(batch))
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trainer_class()(model=model, args=training_arguments(cfg, output_dir, steps), train_dataset=rows,
                                  data_collator=collate,
                                  batch_sampler=ReplayBatches(epochs, batches_per_epoch))
        quiet(trainer)
        trainer.train()
    steps_logged = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    trace = Trace([e["loss"] for e in steps_logged], [e["grad_norm"] for e in steps_logged], adapter_of(model))
    return trace, their_batches


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def adapter_difference(ours: dict, theirs: dict) -> float:
    """Largest relative difference of any adapter tensor, as the norm of the difference over the norm."""
    if ours.keys() != theirs.keys():
        raise ValueError(f"adapters differ in tensors: {sorted(ours.keys() ^ theirs.keys())[:4]}")
    return max(float((ours[k] - theirs[k]).norm() / ours[k].norm().clamp(min=1e-12)) for k in ours)


def parity(model_path: str, data: str, steps: int, run_dir: Path) -> dict:
    """Both loops from the same init on the same batches; per-step figures and the adapters compared."""
    from poetry.builtin import resolve_model_path
    from poetry.model import load_tokenizer

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"model.path={model_path}", f"data.train={data}", f"log.dir={run_dir}",
                       f"train.max_steps={steps}", f"train.save_every={steps}", *PARITY_OVERRIDES], device="cpu")
    ours, initial, recorded, batches_per_epoch = run_ours(cfg)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    theirs, their_batches = run_trainer_replay(cfg, initial, tokenizer, recorded, batches_per_epoch, steps)
    same_batches = len(their_batches) >= 1 and all(
        all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))
        for (_, _, a), b in zip(recorded, their_batches, strict=False))
    rows = [{"step": i + 1, "loss_ours": lo, "loss_trainer": lt, "loss_rel": relative(lo, lt),
             "grad_norm_ours": go, "grad_norm_trainer": gt, "grad_norm_rel": relative(go, gt)}
            for i, (lo, lt, go, gt) in enumerate(zip(ours.losses, theirs.losses, ours.grad_norms, theirs.grad_norms,
                                                     strict=True))]
    return {"steps": rows, "micro_batches": len(recorded), "identical_batches": same_batches,
            "max_loss_rel": max(r["loss_rel"] for r in rows),
            "max_grad_norm_rel": max(r["grad_norm_rel"] for r in rows),
            "adapter_rel": adapter_difference(ours.adapter, theirs.adapter)}


# --- speed ---------------------------------------------------------------------------------------------------------

class FullLogitsLoss(nn.Module):
    """The ablation of target-only logits: the loss from the model's full (batch, length, vocab) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        from poetry.loss import full_logits_loss

        return full_logits_loss(self.model, input_ids, attention_mask, labels)


def timed_ours(cfg: Config, full_logits: bool = False) -> dict:
    """train.py's setup, then `fit` timed; the tokens the loop collated."""
    reset_accelerate()
    run = train_script.setup(cfg)
    if full_logits:
        run.loss_model = FullLogitsLoss(run.model)
    run.collate = counted = Counted(run.collate)
    started = time.perf_counter()
    train_script.fit(run)
    seconds = time.perf_counter() - started
    run.log.close()
    run.accelerator.end_training()
    return {"seconds": seconds, "tokens": counted.tokens, "targets": counted.targets, "steps": run.state.step}


def timed_trainer(cfg: Config, steps: int, group_by_length: bool) -> dict:
    """Trainer + PEFT + DataCollatorForSeq2Seq as the LoRA blog posts set them up, on the first epoch's questions,
    the same model, LoRA, effective batch, precision and steps."""
    import dataclasses

    from poetry.builtin import resolve_model_path
    from poetry.feed import TaskData
    from poetry.model import add_lora, load_model, load_tokenizer
    from poetry.prompt import PromptFormat

    path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(path)
    examples = TaskData(cfg.data, PromptFormat(tokenizer, cfg.data.system_prompt), cfg.train.seed).train_epoch(0)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(examples["input_ids"], examples["labels"],
                                                                         strict=True)]
    torch.manual_seed(cfg.train.seed)
    model = add_lora(load_model(dataclasses.replace(cfg.model, path=path)), cfg.lora)
    collate = Counted(seq2seq_collator(tokenizer, pad_to_multiple_of=None))
    from transformers import Trainer

    with tempfile.TemporaryDirectory() as output_dir:
        # transformers 5 renamed group_by_length=True to train_sampling_strategy="group_by_length"
        args = training_arguments(cfg, output_dir, steps,
                                  train_sampling_strategy="group_by_length" if group_by_length else "random")
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        quiet(trainer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": collate.tokens, "targets": collate.targets,
            "steps": trainer.state.global_step}


def speed(config: Path, overrides: list[str], steps: int, run_dir: Path, ablations: bool, rounds: int) -> list[dict]:
    """Rows of (method, seconds, tokens, targets, tokens/s, target tokens/s), our loop first. Every method runs once
    untimed for one step (imports, thread pools and allocator warm up on whichever runs first), then `rounds`
    times in turn; a row keeps its fastest round."""
    base = [*overrides, f"train.save_every={steps}", "eval.every=0", "eval.at_start=false", "eval.loss=false",
            "eval.decode=false", "log.curves=false", "train.keep_last=1"]
    cfg = load_config(config, [*base, f"log.dir={run_dir}"], device="cpu")

    def ours(*extra: str, full_logits: bool = False):
        return lambda n, name: timed_ours(load_config(config, [*base, f"train.max_steps={n}", *extra,
                                                               f"log.dir={run_dir / name}"], device="cpu"),
                                          full_logits)

    methods = {"our loop": ours(),
               "Trainer + DataCollatorForSeq2Seq": lambda n, _: timed_trainer(cfg, n, group_by_length=False),
               "Trainer + group_by_length": lambda n, _: timed_trainer(cfg, n, group_by_length=True)}
    if ablations:
        budget = cfg.train.micro_batch_size * cfg.data.max_len // 2
        other_optimizer = "paged_adamw_8bit" if cfg.train.optimizer == "adamw" else "adamw"
        methods |= {"our loop - bucketing (random batches)": ours("train.bucket_multiplier=1"),
                    "our loop, full logits (no target-only, no chunks)": ours(full_logits=True),
                    "our loop - chunked loss": ours("train.loss_chunk_rows=0"),
                    f"our loop + token budget {budget}": ours(f"train.max_tokens_per_batch={budget}"),
                    f"our loop, {other_optimizer}": ours(f"train.optimizer={other_optimizer}")}
    best: dict[str, dict] = {}
    for round_ in range(-1, rounds):  # round -1: the untimed warm-up
        for i, (name, run) in enumerate(methods.items()):
            print(f"round {round_ + 1} of {rounds}: {name}", file=sys.stderr)
            with contextlib.redirect_stdout(io.StringIO()):
                result = run(1 if round_ < 0 else steps, f"{round_}-{i}")
            if round_ >= 0 and (name not in best or result["seconds"] < best[name]["seconds"]):
                best[name] = {"method": name, **result}
    rows = list(best.values())
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["targets_per_s"] = row["targets"] / row["seconds"]
    return rows


# --- padding -------------------------------------------------------------------------------------------------------

def efficiency(lengths: list[int], batches: list[list[int]], multiple: int = 1) -> float:
    """Real tokens over padded tokens, each batch's width rounded up to `multiple` (the collator uses 8)."""
    return sum(lengths) / sum(len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple for b in batches)


def padding(config: Path, tokenizer_path: str, overrides: list[str]) -> dict:
    """Padding efficiency of one epoch: our length-bucketed batches, random batches, and the bound of sorting the
    whole epoch, at the config's micro-batch size and data settings, tokenised by `tokenizer_path`."""
    import random

    from poetry.builtin import resolve_model_path
    from poetry.feed import LengthBucketBatchSampler, TaskData
    from poetry.model import load_tokenizer
    from poetry.prompt import PromptFormat

    cfg = load_config(config, overrides, device="cuda")  # the shipped GPU configs validate for a GPU only
    tokenizer = load_tokenizer(resolve_model_path(tokenizer_path))
    lengths = list(TaskData(cfg.data, PromptFormat(tokenizer, cfg.data.system_prompt), 0).train_epoch(0)["length"])
    size = cfg.train.micro_batch_size
    ours = LengthBucketBatchSampler(lengths, size, cfg.train.seed, cfg.train.bucket_multiplier,
                                    cfg.train.max_tokens_per_batch).global_batches()
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = lambda order: [order[i:i + size] for i in range(0, len(order), size)]  # noqa: E731
    return {"config": str(config), "examples": len(lengths), "micro_batch_size": size,
            "ours": efficiency(lengths, ours), "ours_width_multiple_of_8": efficiency(lengths, ours, 8),
            "random": efficiency(lengths, chunks(shuffled)),
            "sorted_bound": efficiency(lengths, chunks(by_length))}


# --- the command ---------------------------------------------------------------------------------------------------

def print_parity(result: dict) -> None:
    from rich.table import Table

    from bench.common import console

    table = Table(title=f"our loop vs Trainer + PEFT, {len(result['steps'])} optimizer steps, "
                        f"{result['micro_batches']} micro-batches (identical: {result['identical_batches']})",
                  caption=f"adapters after the run: relative difference {result['adapter_rel']:.1e}")
    for column in ("step", "loss ours", "loss Trainer", "rel", "grad norm ours", "grad norm Trainer", "rel"):
        table.add_column(column, justify="right")
    for r in result["steps"]:
        table.add_row(str(r["step"]), f"{r['loss_ours']:.7f}", f"{r['loss_trainer']:.7f}", f"{r['loss_rel']:.1e}",
                      f"{r['grad_norm_ours']:.7f}", f"{r['grad_norm_trainer']:.7f}", f"{r['grad_norm_rel']:.1e}")
    console.print(table)


def print_speed(title: str, rows: list[dict]) -> None:
    from rich.table import Table

    from bench.common import console

    table = Table(title=title)
    for column in ("method", "steps", "s", "tokens/s", "target tokens/s", "ours / this (targets/s)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    ours = rows[0]["targets_per_s"]
    for r in rows:
        table.add_row(r["method"], str(r["steps"]), f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['targets_per_s']:.0f}", f"{ours / r['targets_per_s']:.2f}x")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("parity", help="per-step loss, grad norm and adapters against Trainer")
    check.add_argument("--model", default="builtin:tiny-qwen3")
    check.add_argument("--data", default="data/sample/train-data")
    check.add_argument("--steps", type=int, default=20)
    fast = sub.add_parser("speed", help="tokens/s against Trainer, and one feature ablated at a time")
    fast.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    fast.add_argument("--steps", type=int, default=10)
    fast.add_argument("--rounds", type=int, default=2, help="timed runs of each method; the fastest is kept")
    fast.add_argument("--no-ablations", action="store_true", help="only our loop and the two Trainer set-ups")
    fast.add_argument("overrides", nargs="*", help="section.key=value for the config, e.g. data.train=DIR")
    pad = sub.add_parser("padding", help="padding efficiency of our batches against random ones")
    pad.add_argument("--config", type=Path, action="append", help="default: every shipped config")
    pad.add_argument("--tokenizer", default="builtin:tiny-qwen3", help="default: the real Qwen3 tokenizer")
    pad.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.train=DIR")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    from bench.common import machine, write_results
    from poetry.quiet import quiet_libraries

    quiet_libraries()
    # the comparison runs the 8-bit optimizer on CPU, where bitsandbytes has no paged memory: said in bench/README.md
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    with tempfile.TemporaryDirectory() as run_dir:
        if args.command == "parity":
            result = parity(args.model, args.data, args.steps, Path(run_dir))
            print_parity(result)
            name = "trainer-parity"
        elif args.command == "speed":
            rows = speed(args.config, args.overrides, args.steps, Path(run_dir), not args.no_ablations, args.rounds)
            print_speed(f"{args.config.name} {' '.join(args.overrides)}: {args.steps} optimizer steps, fastest of "
                        f"{args.rounds}, {machine()['cpu']}, {torch.get_num_threads()} threads", rows)
            result = {"config": str(args.config), "overrides": args.overrides, "rows": rows}
            name = f"trainer-speed-{args.config.stem}"
        else:
            configs = args.config or sorted((ROOT / "configs").glob("*.yaml"))
            result = {"tokenizer": args.tokenizer,
                      "configs": [padding(config, args.tokenizer, args.overrides) for config in configs]}
            print(json.dumps(result, indent=2))
            name = "padding"
    print(f"saved {write_results(name, result)}")


if __name__ == "__main__":
    main()
