"""Fine-tune a causal LM with LoRA on classical-poetry understanding: an explicit HF Accelerate loop, no Trainer.

    accelerate launch train.py --config configs/tiny.yaml [section.key=value ...] [--resume auto|PATH]
    python train.py --config configs/tiny.yaml

Read it top to bottom: `setup(cfg)` builds a `Run` by concern (processes and run directory, model, data,
optimization, resumed state), `fit(run)` is the loop, and `optimizer_step`, `evaluate` and `save` are the plain
functions the loop calls. Everything the loop counts lives in one `TrainState`, saved and restored whole.
Mixed precision is owned here, not by Accelerate: `torch.autocast` plus `GradScaler(enabled=fp16)` is one code
path for fp32/bf16/fp16 on CPU and CUDA (Accelerate's own fp16 silently runs fp32 on CPU).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", help="'auto' (the newest complete checkpoint of log.dir, or of the newest run "
                                         "under runs/) or a checkpoint directory; sets train.resume "
                                         "(default: the config's train.resume, a fresh run unless set)")
    parser.add_argument("--profile-memory", action="store_true",
                        help="record a CUDA memory snapshot of the first steps; sets train.profile_memory "
                             "(default: off)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-4 (before or after flags)")
    return parser


if __name__ == "__main__":
    build_parser().parse_intermixed_args()  # --help and usage errors answer here, before torch loads (~2 s)

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list, gather_object, set_seed  # noqa: E402

from poetry import checkpoint, feed, memory, optim, profiling, runlog  # noqa: E402
from poetry.builtin import resolve_model_path  # noqa: E402
from poetry.config import Config, ConfigError, check_inputs, load_config  # noqa: E402
from poetry.data import DataError  # noqa: E402
from poetry.loss import TargetOnlyLoss  # noqa: E402
from poetry.model import (  # noqa: E402
    add_adapter,
    load_model,
    load_tokenizer,
    skip_adapter_input_casts,
    trainable_parameters,
)
from poetry.parallel import Parallel, collective_failed, lost_peer_message  # noqa: E402
from poetry.precision import DTYPES  # noqa: E402
from poetry.prompt import PromptFormat  # noqa: E402
from poetry.quiet import quiet_libraries  # noqa: E402
from poetry.validation import Validator  # noqa: E402

SNAPSHOT_STEPS = 3  # optimizer steps recorded by --profile-memory, counted from this session's first
SAVES_PER_RUN = 10  # train.save_every=0: a checkpoint every ~10% of the run, so a crash loses at most that


def parse_args(argv) -> Config:
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    overrides += ["train.profile_memory=true"] if args.profile_memory else []
    return load_config(args.config, overrides)


@dataclass
class TrainState:
    """What the loop counts. Saved in every checkpoint and restored on resume as a whole: a new field needs no
    other edit."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # forward/backward passes done
    epoch: int = 0  # the epoch the sampler is in
    skipped: int = 0  # optimizer steps skipped for inf/NaN gradients (by the fp16 scaler, or by the check in bf16/fp32)
    nonfinite_streak: int = 0  # of those, how many in a row up to this step (fp16: once the scale is calibrated)
    scale_calibrated: bool = False  # fp16: a step has gone through, so the scale no longer falls from its start

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class Pace:
    """This session's throughput: training time and tokens, with evaluation and saving kept apart."""

    train_s: float = 0.0
    eval_s: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    padded_tokens: float = 0.0


@dataclass
class Run:
    """Everything `fit` and the functions it calls use, built once by `setup`."""

    cfg: Config
    accelerator: Accelerator
    parallel: Parallel  # DDP or FSDP2 behind one interface
    log: runlog.RunLog
    model: torch.nn.Module  # the PEFT model: owns the adapters, saves them, decodes
    loss_model: torch.nn.Module  # TargetOnlyLoss around `model`, wrapped by DDP/FSDP: what the loop calls
    trainable: list[torch.nn.Parameter]  # the adapters (FSDP's shards, once wrapped): what is clipped
    data: feed.TaskData
    sampler: feed.LengthBucketBatchSampler
    collate: feed.Collator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    validator: Validator
    monitor: profiling.MemoryMonitor
    checkpoints: Path
    total_steps: int
    save_every: int
    process_gb: float | None = None  # on CPU, resident memory before the weights: the memory estimate's constant
    state: TrainState = dataclasses.field(default_factory=TrainState)
    pace: Pace = dataclasses.field(default_factory=Pace)
    new_best: tuple[int, str, float] | None = None  # (step, metric, value) that best.json takes once step is saved


def autocast(precision: str, device_type: str):
    """The one mixed-precision switch: a no-op in fp32; fp16 also needs the GradScaler."""
    return torch.autocast(device_type, dtype=DTYPES[precision], enabled=precision != "fp32")


# --- setup, by concern ---------------------------------------------------------------------------------------------

def setup_processes(cfg: Config) -> tuple[Accelerator, runlog.RunLog, Path | None]:
    """The process group, the run directory the ranks agree on, the run log; and the checkpoint to resume, if any."""
    tracker = runlog.tracker_for(cfg.log)
    # the process group first: rank 0's choice of run directory is broadcast
    PartialState(cpu=cfg.train.cpu, timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    chosen = cfg.log.dir or checkpoint.run_dir_to_resume(cfg.train.resume) or runlog.default_run_dir()
    run_dir = Path(broadcast_object_list([str(chosen)])[0])
    accelerator = Accelerator(cpu=cfg.train.cpu, log_with=tracker, project_dir=run_dir)
    if tracker:
        accelerator.init_trackers(runlog.TRACKER_PROJECT, config=runlog.flat_config(cfg),
                                  init_kwargs=runlog.tracker_init_kwargs(cfg.log, run_dir))
    resume = checkpoint.resolve_resume(cfg.train.resume, run_dir / "checkpoints")
    log = runlog.RunLog(cfg, run_dir, accelerator.is_main_process, accelerator if tracker else None,
                        resumed_at=checkpoint.step_of(resume) if resume else None)
    sharing = "FSDP" if cfg.train.fsdp else "DDP" if accelerator.num_processes > 1 else "one process"
    log.print(f"run directory: {run_dir}   processes: {accelerator.num_processes} ({sharing})   "
              f"device: {accelerator.device}")
    log.print_config()
    for note in cfg.notes:  # what `auto` chose and why, and warnings of a slow explicit choice
        log.print(note)
    if cfg.train.resume == "auto" and not resume:
        log.print(f"--resume auto: no complete checkpoint in {run_dir / 'checkpoints'}, so this run starts fresh")
    torn = [path.name for path in checkpoint.torn_dirs(run_dir / "checkpoints")] if cfg.train.resume == "auto" else []
    if torn:
        log.print(f"--resume auto: skipped torn checkpoints (a save that did not finish: no valid "
                  f"{checkpoint.COMPLETE_FILE}): {', '.join(torn)}" + (f"; resuming from {resume.name}" if resume
                                                                         else ""))
    changed = checkpoint.config_changes(resume, cfg) if resume else []
    if changed:
        log.print(f"warning: resuming from {resume} with a config that changes the training maths: "
                  + "; ".join(changed))
    return accelerator, log, resume


def setup_tokenizer(cfg: Config, accelerator: Accelerator):
    """(the model's local directory, its tokenizer)."""
    with accelerator.main_process_first():  # a builtin:NAME model is built once, by rank 0
        path = resolve_model_path(cfg.model.path)
    return path, load_tokenizer(path, cfg.model.trust_remote_code)


def setup_model(cfg: Config, path: str, accelerator: Accelerator, log: runlog.RunLog):
    """(model, this process's resident GB before the weights on CPU): a frozen base and fp32 adapters (or, for
    peft.method=full, the whole model in fp32) on this process's device, after the memory estimate."""
    device = accelerator.device.type
    process_gb = memory.process_rss_gb() if device == "cpu" else None  # the estimate's measured constant
    shards = accelerator.num_processes if cfg.train.fsdp else 1
    table, needed = memory.estimate_table(cfg, path, device=device, shards=shards, process_gb=process_gb)
    log.print(table)
    available = memory.device_memory_gb(device)
    if cfg.peft.method == "full" and available is not None and needed > available:
        raise ConfigError(f"peft.method=full: the estimate above needs {needed:.1f} GiB and this {device} has "
                          f"{available:.1f} GiB, {needed - available:.1f} GiB short; train an adapter instead "
                          f"(peft.method=lora)")
    set_seed(cfg.train.seed)  # the same adapter init on every rank
    model = add_adapter(load_model(dataclasses.replace(cfg.model, path=path), accelerator.device), cfg.peft,
                        cfg.lora)
    if cfg.train.precision != "fp32":  # every forward runs under autocast, which casts the adapters' inputs itself
        skip_adapter_input_casts(model)
    trainable, total = trainable_parameters(model)
    log.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model, process_gb


def setup_data(cfg: Config, tokenizer, accelerator: Accelerator, log: runlog.RunLog):
    """(questions re-drawn per epoch, a length-bucketed sampler over this rank's share, a padding collator)."""
    data = feed.TaskData(cfg.data, PromptFormat(tokenizer, cfg.data.system_prompt), cfg.train.seed)
    sampler = feed.LengthBucketBatchSampler(
        data.train_epoch(0)["length"], cfg.train.micro_batch_size, cfg.train.seed, cfg.train.bucket_multiplier,
        cfg.train.max_tokens_per_batch, accelerator.num_processes, accelerator.process_index)
    log.print(f"poems: {len(data.train_poems)} train, {len(data.val_poems)} validation; "
              f"questions per epoch: {len(data.train_epoch(0))}; validation questions: {len(data.val_examples)}; "
              f"longer than data.max_len, left out: {data.dropped_train[0]} train, {data.dropped_val} validation")
    if len(data.mixture.sources) > 1:
        log.print(f"sources (the first gives validation): {data.mixture.describe()}")
    return data, sampler, feed.Collator(tokenizer.pad_token_id, choice=cfg.train.choice_loss_weight > 0)


def setup(cfg: Config) -> Run:
    check_inputs(cfg)  # a wrong path fails now, not after minutes of loading a model
    quiet_libraries()
    accelerator, log, resume = setup_processes(cfg)
    path, tokenizer = setup_tokenizer(cfg, accelerator)
    data, sampler, collate = setup_data(cfg, tokenizer, accelerator, log)  # first: in the estimate's constant
    model, process_gb = setup_model(cfg, path, accelerator, log)
    if resume:
        checkpoint.load_adapter(model, resume)  # before sharding: the saved tensors are whole
    parallel = Parallel(accelerator, cfg)
    loss_model = parallel.wrap(TargetOnlyLoss(model, cfg.train.loss_chunk_rows))

    optimizer = optim.build_optimizer(model, cfg.train)  # over the (sharded) adapters, so after wrap
    steps_per_epoch = math.ceil(len(sampler) / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs  # max_steps overrides epochs
    log.print(f"optimizer steps: {total_steps}, {total_steps / steps_per_epoch:.2g} epochs of {steps_per_epoch}"
              + (" (train.max_steps: train.epochs is unused)" if cfg.train.max_steps else ""))
    device_autocast = functools.partial(autocast, cfg.train.precision, accelerator.device.type)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP swaps in shards
    run = Run(cfg, accelerator, parallel, log, model, loss_model, trainable, data, sampler, collate, optimizer,
              optim.build_scheduler(optimizer, cfg.train, total_steps),
              parallel.grad_scaler(accelerator.device.type, enabled=cfg.train.precision == "fp16"),
              Validator(cfg.eval, data, data.fmt, collate, parallel, device_autocast, log.heartbeat),
              profiling.MemoryMonitor(accelerator.device), checkpoints=log.dir / "checkpoints", total_steps=total_steps,
              save_every=cfg.train.save_every or math.ceil(total_steps / SAVES_PER_RUN), process_gb=process_gb)
    if resume:
        restore(run, resume)
    return run


def restore(run: Run, path: Path) -> None:
    """Optimizer, scheduler, scaler, sampler, RNG and counters exactly where they were (the adapter is loaded)."""
    saved = checkpoint.load_state(path)
    run.parallel.load_optimizer_state_dict(run.loss_model, run.optimizer, saved["optimizer"])
    optim.repage_state(run.optimizer)  # bitsandbytes' loader moves a paged optimizer's state into device memory
    run.scheduler.load_state_dict(saved["scheduler"])
    run.sampler.load_state_dict(saved["sampler"])
    run.state.load_state_dict(saved["train_state"])
    restore_scaler(run, saved["scaler"])
    if not checkpoint.set_rng_state(saved["rng"], run.accelerator.process_index):
        run.log.print(f"note: {path} holds the random generators of fewer processes than this run's "
                      f"{run.accelerator.num_processes}; rank {run.accelerator.process_index} keeps its seeded ones")
    run.log.print(f"resumed from {path} at optimizer step {run.state.step} (epoch {run.state.epoch}, "
                  f"micro-step {run.state.micro_step})")


def restore_scaler(run: Run, saved: dict) -> None:
    """The fp16 loss scaler's state; a checkpoint saved in bf16 or fp32 has none (a disabled scaler saves {}), so a
    resume that turns fp16 on starts the scaler fresh, and says so."""
    if saved or not run.scaler.is_enabled():
        run.scaler.load_state_dict(saved)
        return
    run.state.scale_calibrated = False
    run.log.print(f"note: the checkpoint was saved without fp16's loss scaler (another train.precision); it starts "
                  f"fresh at scale {run.scaler.get_scale():g}")


# --- the loop ------------------------------------------------------------------------------------------------------

def accumulation_windows(run: Run):
    """(dataset, the micro-batches of one optimizer step) from where the state says, across epochs for ever; the
    last window of an epoch may be shorter."""
    while True:
        dataset = run.data.train_epoch(run.state.epoch)
        run.sampler.set_epoch(run.state.epoch, dataset["length"])
        window = []
        for indices in run.sampler:
            window.append(indices)
            if len(window) == run.cfg.train.grad_accum:
                yield dataset, window
                window = []
        if window:
            yield dataset, window
        run.state.epoch += 1


def fit(run: Run) -> None:
    cfg, state = run.cfg, run.state
    first_step = state.step
    run.log.start_progress(run.total_steps, state.step)
    if cfg.eval.at_start and state.step == 0:
        evaluate(run)
    # recorded from the first training step, after the one-off evaluation; dumped however the steps end, so an OOM
    # in the first steps, when a snapshot is wanted most, still leaves one
    with profiling.CudaSnapshot(run.log.dir, run.accelerator.process_index, cfg.train.profile_memory) as snapshot:
        run.log.start_clock()  # the ETA's pace: training steps, not the one-off evaluation before them
        run.loss_model.train()
        windows = accumulation_windows(run)
        while state.step < run.total_steps:
            started = time.time()
            dataset, window = next(windows)
            batches = [{k: v.to(run.accelerator.device) for k, v in run.collate(dataset[indices]).items()}
                       for indices in window]
            # normalise by the target tokens of the whole optimizer step on all ranks: a micro-batch with 3 answer
            # tokens must not weigh as much as one with 300 (a mean of micro-batch means would)
            counts = torch.tensor([[feed.target_tokens(b), int(b["attention_mask"].sum()), b["input_ids"].numel(),
                                    feed.choice_examples(b)] for b in batches], device=run.accelerator.device,
                                  dtype=torch.float64).sum(0)
            step_targets, tokens, padded_tokens, step_choices = run.accelerator.reduce(counts).tolist()
            loss_total, choice_total = torch.zeros(2, device=run.accelerator.device)
            for i, batch in enumerate(batches):
                with run.parallel.gradient_sync(run.loss_model, sync=i == len(batches) - 1):  # once per step
                    with run.monitor.phase("forward"), autocast(cfg.train.precision, run.accelerator.device.type):
                        loss_sum, _, *choice = run.loss_model(**batch)  # the choice loss's sum, if options came
                    # DDP and FSDP average gradients over ranks, so each rank's share is scaled back up
                    objective = loss_sum * run.accelerator.num_processes / step_targets
                    if choice:  # a mean over the step's emotion examples, as the LM loss is over its targets
                        objective = objective + (cfg.train.choice_loss_weight * choice[0]
                                                 * run.accelerator.num_processes / step_choices)
                        choice_total += choice[0].detach()
                    with run.monitor.phase("backward"):
                        run.scaler.scale(objective).backward()
                loss_total += loss_sum.detach()
                state.micro_step += 1
            grad_norm = optimizer_step(run)
            state.step += 1

            elapsed = time.time() - started
            run.pace.train_s, run.pace.steps = run.pace.train_s + elapsed, run.pace.steps + 1
            run.pace.tokens, run.pace.padded_tokens = run.pace.tokens + tokens, run.pace.padded_tokens + padded_tokens
            run.log.record(state.step, {
                "train/loss": (run.accelerator.reduce(loss_total) / step_targets).item(),
                **({"train/choice_loss": (run.accelerator.reduce(choice_total) / step_choices).item()}
                   if step_choices else {}),
                "train/lr": run.scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                "train/loss_scale": run.scaler.get_scale() if run.scaler.is_enabled() else 1.0,
                "train/skipped_steps": state.skipped, "train/epoch": state.epoch, "train/micro_step": state.micro_step,
                "train/tokens_per_s": tokens / elapsed, "train/target_tokens_per_s": step_targets / elapsed,
                "train/padding_efficiency": tokens / padded_tokens, **run.monitor.summary(),
            }, echo=state.step % cfg.log.every == 0 or state.step == 1)
            if state.step == first_step + SNAPSHOT_STEPS:
                snapshot.stop()

            last = state.step == run.total_steps
            is_best = False
            if last or (cfg.eval.every and state.step % cfg.eval.every == 0):
                is_best = evaluate(run)
                run.loss_model.train()
            diverged = state.nonfinite_streak >= cfg.train.max_nonfinite_steps
            if last or is_best or diverged or state.step % run.save_every == 0:
                save(run)
            if diverged:  # saved first: the weights are those of the last finite step
                raise Diverged(divergence(run, window))
    report(run)


def optimizer_step(run: Run) -> torch.Tensor:
    """Unscale, clip, step, schedule; returns the gradient norm before clipping. A step with inf/NaN gradients is
    skipped, its gradients dropped and the weights left as they were: by the scaler in fp16, here otherwise (an
    optimizer would write NaN into every weight). Skipped steps are counted, and so is the streak of them that
    train.max_nonfinite_steps bounds."""
    with run.monitor.phase("optimizer"):
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = run.parallel.clip_grad_norm(run.trainable, run.cfg.train.max_grad_norm or math.inf)
        scale = run.scaler.get_scale()
        if run.scaler.is_enabled():
            run.scaler.step(run.optimizer)
            run.scaler.update()
            skipped = run.scaler.get_scale() < scale
        else:
            skipped = not bool(torch.isfinite(grad_norm))  # the norm of all gradients: one inf/NaN makes it so
            if not skipped:
                run.optimizer.step()
        run.state.skipped += int(skipped)
        run.state.nonfinite_streak = run.state.nonfinite_streak + 1 if skipped and diverging(run, scale) else 0
        run.state.scale_calibrated |= run.scaler.is_enabled() and not skipped
        run.scheduler.step()  # the schedule follows optimizer steps, taken or skipped
        run.optimizer.zero_grad(set_to_none=True)
    if skipped and not run.scaler.is_enabled():
        run.log.print(f"warning: step {run.state.step + 1}: gradient norm {grad_norm.item()}; the step is skipped "
                      f"and the weights are unchanged ({run.state.nonfinite_streak} in a row)")
    return grad_norm


def diverging(run: Run, scale: float) -> bool:
    """Whether a skipped step counts toward train.max_nonfinite_steps. In fp16 the scaler starts at 2^16 and halves
    once per overflow: until a step goes through, overflows calibrate the scale and are no sign of divergence,
    unless the scale (`scale`, before the step) no longer inflates the gradients at all (<= 1), or the run is
    bf16/fp32, where nothing is scaled."""
    return not run.scaler.is_enabled() or run.state.scale_calibrated or scale <= 1


class Diverged(RuntimeError):
    """train.max_nonfinite_steps optimizer steps in a row had inf/NaN gradients."""


def divergence(run: Run, window: list[list[int]]) -> str:
    """What stopped a run after train.max_nonfinite_steps non-finite steps in a row: the steps, where the last
    finite weights are saved, and the data of the last offending batch."""
    state, limit = run.state, run.cfg.train.max_nonfinite_steps
    first = state.step - state.nonfinite_streak + 1
    indices = sorted(i for micro_batch in window for i in micro_batch)
    named = "; ".join(run.data.describe_rows(state.epoch, indices))
    return (f"steps {first}-{state.step}: {state.nonfinite_streak} optimizer steps in a row had inf/NaN gradients "
            f"(train.max_nonfinite_steps={limit}); the weights of step {first - 1}, the last finite one, are saved "
            f"in {run.checkpoints / f'step-{state.step:06d}'}; the last offending batch: epoch {state.epoch}, rows "
            f"{indices}: {named}")


def evaluate(run: Run) -> bool:
    """Log validation metrics; True when they make this step the best so far. Step 0, before any training, is a
    curve's starting point, never a checkpoint. Leaves the model in eval mode."""
    step, started = run.state.step, time.time()
    run.log.print(f"{run.log.where(step)}  evaluating: {run.validator.describe()}")
    with run.monitor.phase("eval"):
        metrics = run.validator.run(run.accelerator.unwrap_model(run.loss_model), run.model)
    run.pace.eval_s += time.time() - started
    if not metrics:
        return False
    run.log.record(step, {**metrics, "val/seconds": time.time() - started})
    run.log.draw_curves()
    best_metric = run.cfg.eval.best_metric
    value = metrics.get(best_metric)
    is_best = False
    if value is not None and step > 0 and run.accelerator.is_main_process:
        is_best = checkpoint.beats_best(run.checkpoints, value, run.cfg.eval.best_mode)
    if is_best:  # best.json moves once the checkpoint is saved whole, never to a directory a crash could tear
        run.new_best = (step, best_metric, value)
        run.log.print(f"new best {best_metric}={value:.4g} at step {step}")
    return bool(broadcast_object_list([is_best])[0])  # rank 0 decides; every rank takes part in the save


def save(run: Run) -> None:
    """An adapter-only checkpoint (a whole model for peft.method=full) with everything a resume needs; the oldest
    beyond train.keep_last are pruned."""
    adapter = run.parallel.adapter_state_dict(run.model)  # collectives under FSDP: every rank takes part
    optimizer_state = run.parallel.optimizer_state_dict(run.loss_model, run.optimizer)
    rng_states = gather_object([checkpoint.rng_state()])  # each rank's own: dropout masks differ by rank
    if run.accelerator.is_main_process:
        whole = run.cfg.peft.method == "full"  # a whole model: with its tokenizer, loadable as infer.py --model
        checkpoint.save_checkpoint(run.checkpoints, run.state.step, run.model, run.cfg, {
            "optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "sampler": run.sampler.state_dict(), "train_state": run.state.state_dict()}, adapter,
            run.data.fmt.tokenizer if whole else None, rng_states)
        if run.new_best and run.new_best[0] == run.state.step:
            checkpoint.record_best(run.checkpoints, *run.new_best)
        checkpoint.prune(run.checkpoints, run.cfg.train.keep_last)
    run.accelerator.wait_for_everyone()


def report(run: Run) -> None:
    state, pace = run.state, run.pace
    saved = "model" if run.cfg.peft.method == "full" else "adapter"  # a full run's checkpoint is a whole model
    run.log.print(f"done: {state.step} optimizer steps, {state.micro_step} micro-steps, {state.skipped} skipped; "
                  f"{saved} in {run.checkpoints / f'step-{state.step:06d}'}")
    if pace.train_s:
        run.log.print(f"this session: {pace.steps / pace.train_s:.2f} steps/s, {pace.tokens / pace.train_s:.0f} "
                      f"tokens/s, padding efficiency {pace.tokens / pace.padded_tokens:.3f}, evaluation "
                      f"{pace.eval_s:.0f} s ({100 * pace.eval_s / pace.train_s:.0f}% of training time), peak "
                      f"{runlog.format_metrics(run.monitor.summary())}")
    for path in run.log.draw_curves():
        run.log.print(f"curve: {path}")


def train(cfg: Config):
    """The whole training; returns (run directory, trained PEFT model)."""
    run = setup(cfg)
    fit(run)
    run.log.close()
    run.accelerator.end_training()
    return run.log.dir, run.model


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError, checkpoint.CheckpointError) as err:
        print(f"error: {err.one_line() if isinstance(err, DataError) else err}", file=sys.stderr)
        return 2
    except Diverged as err:  # the run itself failed, not its input
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not collective_failed(err):
            raise
        print(f"error: {lost_peer_message(err, cfg.train.dist_timeout_s)}", file=sys.stderr)  # cfg: a group existed
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
