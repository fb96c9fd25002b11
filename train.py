"""Fine-tune a causal LM with LoRA on classical-poetry understanding: an explicit HF Accelerate loop, no Trainer.

    accelerate launch train.py --config configs/tiny.yaml [section.key=value ...] [--resume auto|PATH]
    python train.py --config configs/tiny.yaml

Setup is split by concern (config, model, data, optimization, resume); the loop below it reads top to bottom.
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

import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402

from poetry.batching import Collator, LengthBucketBatchSampler, target_tokens  # noqa: E402
from poetry.checkpoint import config_changes, load_adapter, load_state, prune, resolve_resume, \
    run_dir_to_resume, save_checkpoint, set_rng_state, step_of, update_best  # noqa: E402
from poetry.config import ConfigError, check_inputs, load_config  # noqa: E402
from poetry.data import DataError  # noqa: E402
from poetry.dataset import TaskData  # noqa: E402
from poetry.distributed import Parallel  # noqa: E402
from poetry.evaluation import Evaluator  # noqa: E402
from poetry.logger import TRACKER_PROJECT, RunLog, default_run_dir, flat_config, quiet_libraries, \
    tracker_for  # noqa: E402
from poetry.loss import TargetOnlyLoss  # noqa: E402
from poetry.memory import CudaSnapshot, MemoryMonitor, estimate_table  # noqa: E402
from poetry.model import add_lora, load_model, load_tokenizer, trainable_parameters  # noqa: E402
from poetry.models import resolve_model_path  # noqa: E402
from poetry.optim import build_optimizer, build_scheduler  # noqa: E402
from poetry.precision import DTYPES  # noqa: E402
from poetry.prompt import PromptFormat  # noqa: E402

SNAPSHOT_STEPS = 3  # optimizer steps recorded by --profile-memory
SAVES_PER_RUN = 10  # train.save_every=0: a checkpoint every ~10% of the run, so a crash loses at most that


def parse_args(argv):
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    overrides += ["train.profile_memory=true"] if args.profile_memory else []
    return load_config(args.config, overrides)


def windows(sampler, size: int):
    """Group the epoch's micro-batches into accumulation windows; the last one may be shorter."""
    window = []
    for indices in sampler:
        window.append(indices)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train(cfg):
    """Run the whole training; returns (run directory, trained PeftModel)."""
    check_inputs(cfg)  # a wrong path fails now, not after minutes of loading a model
    quiet_libraries()
    tracker = tracker_for(cfg.log)
    processes = PartialState(cpu=cfg.train.cpu)  # the process group first: the ranks agree on one run directory
    launched, world = int(os.environ.get("WORLD_SIZE", "1")), processes.num_processes
    if launched != world:  # torchrun on CPU without cpu=True: N independent runs that each believe they are rank 0
        raise ConfigError(f"{launched} processes were launched but Accelerate sees {world}; on CPU set train.cpu=true")
    chosen = cfg.log.dir or run_dir_to_resume(cfg.train.resume) or default_run_dir()
    run_dir = Path(broadcast_object_list([str(chosen)])[0])
    cfg.log.dir = str(run_dir)
    accelerator = Accelerator(cpu=cfg.train.cpu, log_with=tracker, project_dir=run_dir)
    device = accelerator.device
    parallel = Parallel(accelerator, cfg)  # DDP, or FSDP2 shards with train.fsdp / an FSDP accelerate config
    if device.type == "cpu" and cfg.model.quantization == "4bit" and cfg.eval.every:
        raise ConfigError("model.quantization=4bit on CPU: bitsandbytes breaks the training step after an in-loop "
                          "no_grad forward (silently wrong LoRA gradients on Llama); use 8bit or none, or eval.every=0")
    if tracker:
        accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(cfg),
                                  init_kwargs={"wandb": {"name": run_dir.name}})
    checkpoints = run_dir / "checkpoints"
    resume = resolve_resume(cfg.train.resume, checkpoints)
    run = RunLog(cfg, run_dir, accelerator.is_main_process, accelerator if tracker else None,
                 resumed_at=step_of(resume) if resume else None)
    set_seed(cfg.train.seed)  # same LoRA init on every rank
    sharing = "FSDP" if parallel.fsdp else "DDP" if world > 1 else "one process"
    run.print(f"run directory: {run_dir}   processes: {world} ({sharing})   device: {device}")
    run.print_config()
    for note in cfg.notes:  # what `auto` chose and why, and warnings of a slow explicit choice
        run.print(note)
    if cfg.train.resume == "auto" and not resume:
        run.print(f"--resume auto: no complete checkpoint in {checkpoints}, so this run starts fresh")
    changed = config_changes(resume, cfg) if resume else []
    if changed:
        run.print(f"warning: resuming from {resume} with a config that changes the training maths: "
                  + "; ".join(changed))

    # --- model: frozen base + fp32 LoRA adapters, replicated (DDP) or sharded (FSDP) over the processes
    with accelerator.main_process_first():  # a builtin:NAME model is built once, by rank 0
        cfg.model.path = resolve_model_path(cfg.model.path)
    run.print(estimate_table(cfg, device=device.type, shards=world if parallel.fsdp else 1)[0])
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = add_lora(load_model(cfg.model, device), cfg.lora)
    trainable, total = trainable_parameters(model)
    run.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if resume:
        load_adapter(model, resume)  # before sharding: the saved tensors are whole
    loss_model = parallel.wrap(TargetOnlyLoss(model))
    trainable_params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP swaps in shards

    # --- data: questions re-drawn per epoch, bucketed by length, padded per batch
    fmt = PromptFormat(tokenizer, cfg.data.system_prompt)
    data = TaskData(cfg.data, fmt, cfg.train.seed)
    sampler = LengthBucketBatchSampler(data.train_epoch(0)["length"], cfg.train.micro_batch_size, cfg.train.seed,
                                       cfg.train.bucket_multiplier, cfg.train.max_tokens_per_batch, world,
                                       accelerator.process_index)
    collate = Collator(tokenizer.pad_token_id)
    run.print(f"poems: {len(data.train_poems)} train, {len(data.val_poems)} validation; "
              f"questions per epoch: {len(data.train_epoch(0))}; validation questions: {len(data.val_examples)}")

    # --- optimization
    optimizer = build_optimizer(model, cfg.train)  # over the (sharded) adapters, so after wrap
    steps_per_epoch = math.ceil(len(sampler) / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)  # max_steps, when set, overrides train.epochs
    save_every = cfg.train.save_every or math.ceil(total_steps / SAVES_PER_RUN)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    precision = cfg.train.precision
    scaler = parallel.grad_scaler(device.type, enabled=precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    evaluator = Evaluator(cfg.eval, data, fmt, collate, parallel, autocast, run.heartbeat)

    # --- resume: optimizer, scheduler, scaler, sampler and RNG exactly where they were (the adapter is loaded)
    step = micro_step = skipped = 0
    epoch = 0
    if resume:
        state = load_state(resume)
        parallel.load_optimizer_state_dict(loss_model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        step, micro_step, skipped, epoch = state["step"], state["micro_step"], state["skipped"], state["epoch"]
        set_rng_state(state["rng"])
        run.print(f"resumed from {resume} at optimizer step {step} (epoch {epoch}, micro-step {micro_step})")

    def save() -> None:
        adapter = parallel.adapter_state_dict(model)  # collectives under FSDP: every rank takes part
        optimizer_state = parallel.optimizer_state_dict(loss_model, optimizer)
        if accelerator.is_main_process:
            save_checkpoint(checkpoints, step, model, cfg, {
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "step": step,
                "micro_step": micro_step, "skipped": skipped, "epoch": epoch}, adapter)
            prune(checkpoints, cfg.train.keep_last)
        accelerator.wait_for_everyone()

    memory = MemoryMonitor(device)
    eval_time = 0.0

    def evaluate() -> bool:
        """Log validation metrics; True when they make this step the best so far (step 0, before any training, is
        a curve's starting point, not a checkpoint)."""
        nonlocal eval_time
        started = time.time()
        run.print(f"{run.where(step)}  evaluating: {evaluator.describe()}")
        with memory.phase("eval"):
            metrics = evaluator.run(accelerator.unwrap_model(loss_model), model)
        eval_time += time.time() - started
        if not metrics:
            return False
        run.log(step, {**metrics, "val/seconds": time.time() - started})
        run.draw_curves()
        value = metrics.get(cfg.eval.best_metric)
        is_best = value is not None and step > 0 and accelerator.is_main_process and \
            update_best(checkpoints, step, cfg.eval.best_metric, value, cfg.eval.best_mode)
        if is_best:
            run.print(f"new best {cfg.eval.best_metric}={value:.4g} at step {step}")
        return bool(broadcast_object_list([is_best])[0])

    # --- the loop
    snapshot = CudaSnapshot(run_dir / "memory_snapshot.pickle", cfg.train.profile_memory)
    snapshot.start()
    run.start_progress(total_steps, step)
    first_step = step
    if cfg.eval.at_start and step == 0:
        evaluate()
        run.start_clock()
    loss_model.train()
    timer, train_time, real_total, padded_total = time.time(), 0.0, 0.0, 0.0
    for epoch in range(epoch, epochs):
        dataset = data.train_epoch(epoch)
        sampler.set_epoch(epoch, dataset["length"])
        for window in windows(sampler, cfg.train.grad_accum):
            batches = [{k: v.to(device) for k, v in collate(dataset[indices]).items()} for indices in window]
            # normalise by the target tokens of the whole optimizer step on all ranks: a micro-batch with 3 answer
            # tokens must not weigh as much as one with 300 (a mean of micro-batch means would)
            counts = torch.tensor([[target_tokens(b), int(b["attention_mask"].sum()), b["input_ids"].numel()]
                                   for b in batches], device=device, dtype=torch.float64).sum(0)
            step_targets, real_tokens, padded_tokens = accelerator.reduce(counts).tolist()
            loss_total = torch.zeros((), device=device)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                with parallel.gradient_sync(loss_model, last):  # reduce gradients once per optimizer step
                    with memory.phase("forward"), autocast():
                        loss_sum, _ = loss_model(**batch)
                    with memory.phase("backward"):
                        # DDP and FSDP average gradients over ranks, so each rank's share is scaled back up by `world`
                        scaler.scale(loss_sum * world / step_targets).backward()
                loss_total += loss_sum.detach()
                micro_step += 1

            with memory.phase("optimizer"):
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                grad_norm = parallel.clip_grad_norm(trainable_params, cfg.train.max_grad_norm or math.inf)
                scale = scaler.get_scale()
                scaler.step(optimizer)  # the scaler skips the update when a gradient is inf/NaN (fp16 overflow)
                scaler.update()
                skipped += int(scaler.is_enabled() and scaler.get_scale() < scale)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed, timer = time.time() - timer, time.time()
            train_time, real_total, padded_total = train_time + elapsed, real_total + real_tokens, \
                padded_total + padded_tokens
            run.log(step, {
                "train/loss": (accelerator.reduce(loss_total) / step_targets).item(),
                "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                "train/loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
                "train/skipped_steps": skipped, "train/epoch": epoch, "train/micro_step": micro_step,
                "train/tokens_per_s": real_tokens / elapsed, "train/target_tokens_per_s": step_targets / elapsed,
                "train/padding_efficiency": real_tokens / padded_tokens, **memory.summary(),
            }, echo=step % cfg.log.every == 0 or step == 1)
            if step == SNAPSHOT_STEPS:
                snapshot.stop()

            is_best = bool(cfg.eval.every) and step % cfg.eval.every == 0 and step < total_steps and evaluate()
            loss_model.train()
            if is_best or step % save_every == 0:
                save()
            timer = time.time()  # evaluation and saving are not training time
            if step >= total_steps:
                break
        if step >= total_steps:
            break

    snapshot.stop()
    evaluate()
    save()
    run.print(f"done: {step} optimizer steps, {micro_step} micro-steps, {skipped} skipped; "
              f"adapter in {checkpoints / f'step-{step:06d}'}")
    steps_done = step - first_step
    if train_time:
        run.print(f"this session: {steps_done / train_time:.2f} steps/s, {real_total / train_time:.0f} tokens/s, "
                  f"padding efficiency {real_total / padded_total:.3f}, evaluation {eval_time:.0f} s "
                  f"({100 * eval_time / train_time:.0f}% of training time), peak memory {memory.summary()}")
    for path in run.draw_curves():
        run.print(f"curve: {path}")
    run.close()
    accelerator.end_training()
    return run_dir, model


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
