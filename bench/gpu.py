"""Memory of the CUDA recipes under a 32 GB cap, for whoever has a GPU: one command, about 10 minutes.

    pip install -e '.[dev]' && python bench/gpu.py [--cap-gb 32] [--seq 1024] [--max-batch 64]
    python bench/gpu.py --cpu-smoke          # the same code end to end on CPU with a tiny stand-in, in seconds

For random-init Qwen2.5-7B LoRA (bf16, gradient checkpointing, paged AdamW 8-bit) and Qwen2.5-14B QLoRA (nf4, double
quantization, bf16 compute), under `torch.cuda.set_per_process_memory_fraction` for the cap, it measures:
- peak allocated and reserved memory of a training step (forward, backward, optimizer step) and of an in-loop
  eval forward under no_grad, at micro-batch 1;
- the largest micro-batch of `--seq` tokens that trains without running out of memory (doubling, then bisecting);
- poetry.memory's estimate against the measured peak at that batch;
- that a 4-bit training step right after a no_grad eval forward gives the gradients it gives without one (on CPU
  bitsandbytes 4-bit fails exactly there: see the README's platform notes).
The weights are random (no hub here): memory and gradients do not depend on their values. Its authors never ran it
on a GPU; `--cpu-smoke` (tested) runs every stage on CPU with a 2-layer Qwen2 stand-in, fp32 and unquantized, with
peaks read from the process RSS, which only grows.
"""
from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from poetry.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: E402

GB = 1024**3
# Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-14B-Instruct config.json (architecture Qwen2ForCausalLM)
QWEN25 = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
COMMON = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu", use_cache=False)
STAND_IN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False)


@dataclass(frozen=True)
class Setup:
    name: str
    shape: dict
    quantized: bool
    optimizer: str


CUDA_SETUPS = (Setup("Qwen2.5-7B LoRA bf16", QWEN25["qwen2.5-7b"], False, "paged_adamw_8bit"),
               Setup("Qwen2.5-14B QLoRA nf4", QWEN25["qwen2.5-14b"], True, "paged_adamw_8bit"))
SMOKE_SETUPS = (Setup("stand-in LoRA fp32", STAND_IN, False, "adamw"),)


class CudaMemory:
    """Peaks from the CUDA allocator, reset per phase; an out-of-memory is CUDA's own error."""

    device, dtype = torch.device("cuda"), torch.bfloat16
    out_of_memory = torch.cuda.OutOfMemoryError

    def __init__(self, cap_gb: float):
        total = torch.cuda.get_device_properties(0).total_memory
        if total < cap_gb * GB:
            raise SystemExit(f"error: the GPU has {total / GB:.1f} GiB, less than the cap of {cap_gb:g} GiB; "
                             f"lower --cap-gb")
        torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total)

    def reset(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict[str, float]:
        return {"allocated_gb": torch.cuda.max_memory_allocated() / GB,
                "reserved_gb": torch.cuda.max_memory_reserved() / GB}

    def facts(self) -> dict:
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "gpu_memory_gb": props.total_memory / GB, "cuda": torch.version.cuda}


class CpuMemory:
    """The stand-in's peaks from RSS, which never goes down: each figure is the process's high-water mark so far.
    Nothing here raises out-of-memory, so the batch search stops at --max-batch."""

    device, dtype = torch.device("cpu"), torch.float32
    out_of_memory = torch.cuda.OutOfMemoryError  # never raised on CPU

    def reset(self) -> None:
        gc.collect()

    def peak(self) -> dict[str, float]:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB
        return {"allocated_gb": rss, "reserved_gb": rss}

    def facts(self) -> dict:
        return {"gpu": None, "note": "--cpu-smoke: peaks are process RSS; no 4-bit on CPU"}


def random_model(setup: Setup, memory, checkpointing: bool):
    """A random-init Qwen2 in the probe's dtype on its device, 4-bit where the setup says, then the loop's own
    preparation for training (poetry.model.load_model's)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**COMMON, **setup.shape)
    target = torch.device("meta") if setup.quantized else memory.device
    with target:  # straight on the device: a 7B model never exists in fp32 anywhere
        model = AutoModelForCausalLM.from_config(config, dtype=memory.dtype)
    if setup.quantized:
        quantize_on_cuda(model, memory.dtype)
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if setup.quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model


def quantize_on_cuda(model, compute_dtype: torch.dtype) -> None:
    """Meta-device model -> CUDA, each decoder linear as an nf4 bitsandbytes layer quantized from random bf16 weights
    one at a time (Params4bit quantizes when moved to CUDA), so peak memory stays near the 4-bit size; the rest
    (embeddings, norms, lm_head) is materialised in bf16 and randomly initialised."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                weight = torch.randn(linear.out_features, linear.in_features, dtype=compute_dtype) * 0.02
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4", module=quantized)
                if linear.bias is not None:
                    quantized.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=compute_dtype),
                                                        requires_grad=False)
                setattr(parent, name, quantized.cuda())
    model.to_empty(device="cuda")  # only the unquantized parameters are still on meta
    # to_empty leaves buffers uninitialised: RoPE's inverse frequencies are computed again
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config, device="cuda")
    for name, param in model.named_parameters():
        if param.dtype == compute_dtype and "weight" in name and param.ndim == 2 and "proj" not in name:
            torch.nn.init.normal_(param, std=0.02)
        elif param.dtype == compute_dtype and param.ndim == 1:
            torch.nn.init.ones_(param)


def training_batch(batch_size: int, seq: int, vocab: int, device) -> dict[str, torch.Tensor]:
    """Random tokens; the second half of each sequence is the target, as an answer after its prompt."""
    generator = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": labels}.items()}


class Bench:
    """One setup: the PEFT model, the loop's loss module and optimizer, and the measurements."""

    def __init__(self, setup: Setup, memory, seq: int, checkpointing: bool):
        from poetry.loss import TargetOnlyLoss
        from poetry.model import add_lora
        from poetry.optim import build_optimizer

        self.setup, self.memory, self.seq = setup, memory, seq
        self.cfg = Config(model=ModelConfig(path=setup.name, dtype="bf16" if memory.dtype == torch.bfloat16 else
                                            "fp32", quantization="4bit" if setup.quantized else "none",
                                            gradient_checkpointing=checkpointing),
                          lora=LoraConfig(dropout=0.0), data=DataConfig(max_len=seq),
                          train=TrainConfig(micro_batch_size=1, optimizer=setup.optimizer,
                                            precision="bf16" if memory.dtype == torch.bfloat16 else "fp32"))
        torch.manual_seed(0)
        self.model = add_lora(random_model(setup, memory, checkpointing), self.cfg.lora)
        self.loss = TargetOnlyLoss(self.model, self.cfg.train.loss_chunk_rows)
        self.optimizer = build_optimizer(self.model, self.cfg.train)

    def autocast(self):
        return torch.autocast(self.memory.device.type, dtype=torch.bfloat16,
                              enabled=self.memory.dtype == torch.bfloat16)

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        return training_batch(size, self.seq, self.setup.shape["vocab_size"], self.memory.device)

    def backward(self, batch) -> None:
        self.loss.train()
        with self.autocast():
            loss_sum, targets = self.loss(**batch)
        (loss_sum / targets).backward()

    def train_step(self, batch) -> None:
        self.backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_forward(self, batch) -> None:
        self.loss.eval()
        with torch.no_grad(), self.autocast():
            self.loss(**batch)

    def measured(self, run, *args) -> dict[str, float]:
        self.memory.reset()
        run(*args)
        return self.memory.peak()

    def fits(self, size: int) -> bool:
        try:
            self.train_step(self.batch(size))
            return True
        except self.memory.out_of_memory:
            self.optimizer.zero_grad(set_to_none=True)
            self.memory.reset()
            return False

    def largest_batch(self, limit: int) -> int:
        """Doubling while it fits, then bisecting between the last fit and the first failure."""
        good, size = 0, 1
        while size <= limit and self.fits(size):
            good, size = size, size * 2
        bad = min(size, limit + 1)
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self.fits(middle) else (good, middle)
        return good

    def estimate_gb(self, size: int) -> float:
        from transformers import Qwen2Config

        from poetry.memory import Shape, estimate

        cfg = Config(model=self.cfg.model, lora=self.cfg.lora, data=self.cfg.data,
                     train=TrainConfig(**{**vars(self.cfg.train), "micro_batch_size": size}))
        rows = estimate(cfg, Shape.from_config(Qwen2Config(**COMMON, **self.setup.shape)), self.memory.device.type)
        return sum(gb for _, gb, _ in rows)

    def gradients_after_eval(self) -> float:
        """Largest relative difference of a LoRA gradient between the same step taken before and after a no_grad
        eval forward (same weights: no optimizer step between)."""
        batch = self.batch(1)

        def gradients() -> list[torch.Tensor]:
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(batch)
            return [p.grad.detach().float().clone() for p in self.model.parameters() if p.requires_grad]

        before = gradients()
        self.eval_forward(batch)
        after = gradients()
        self.optimizer.zero_grad(set_to_none=True)
        return max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(after, before, strict=True))


def measure(setup: Setup, memory, seq: int, max_batch: int) -> dict:
    bench = Bench(setup, memory, seq, checkpointing=True)
    row = {"setup": setup.name, "seq": seq, "quantized": setup.quantized, "optimizer": setup.optimizer,
           "gradient_difference_after_eval": bench.gradients_after_eval(),
           "train_step": bench.measured(bench.train_step, bench.batch(1)),
           "eval_forward": bench.measured(bench.eval_forward, bench.batch(1))}
    row["largest_micro_batch"] = largest = bench.largest_batch(max_batch)
    if largest:
        peak = bench.measured(bench.train_step, bench.batch(largest))["allocated_gb"]
        row["estimate_gb"], row["peak_at_largest_gb"] = bench.estimate_gb(largest), peak
        row["estimate_over_peak"] = row["estimate_gb"] / peak
    del bench
    memory.reset()
    return row


def print_rows(rows: list[dict], title: str) -> None:
    from rich.table import Table

    from bench.common import console

    table = Table(title=title)
    for column in ("setup", "train peak alloc/reserved GiB", "eval peak alloc/reserved GiB", "largest batch",
                   "estimate / peak", "grad diff after eval"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for r in rows:
        pair = lambda p: f"{p['allocated_gb']:.2f} / {p['reserved_gb']:.2f}"  # noqa: E731
        ratio = r.get("estimate_over_peak", math.nan)
        table.add_row(r["setup"], pair(r["train_step"]), pair(r["eval_forward"]), str(r["largest_micro_batch"]),
                      f"{ratio:.2f}", f"{r['gradient_difference_after_eval']:.1e}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run every stage on CPU with a tiny stand-in")
    parser.add_argument("--cap-gb", type=float, default=32.0, help="GPU memory cap (default: %(default)s)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: 1024; 64 with --cpu-smoke)")
    parser.add_argument("--max-batch", type=int, help="largest micro-batch tried (default: 64; 4 with --cpu-smoke)")
    parser.add_argument("--results-dir", type=Path, help="default: bench/results")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench/gpu.py needs a CUDA GPU; --cpu-smoke runs the same stages on CPU with a tiny stand-in",
              file=sys.stderr)
        return 2
    from bench.common import RESULTS_DIR, write_results
    from poetry.quiet import quiet_libraries

    quiet_libraries()
    memory = CpuMemory() if args.cpu_smoke else CudaMemory(args.cap_gb)
    seq = args.seq or (64 if args.cpu_smoke else 1024)
    max_batch = args.max_batch or (4 if args.cpu_smoke else 64)
    rows = []
    for setup in SMOKE_SETUPS if args.cpu_smoke else CUDA_SETUPS:
        rows.append(measure(setup, memory, seq, max_batch))
    print_rows(rows, f"{'CPU smoke' if args.cpu_smoke else f'CUDA, cap {args.cap_gb:g} GiB'}, seq {seq}")
    path = write_results("gpu-smoke" if args.cpu_smoke else "gpu", {**memory.facts(), "rows": rows},
                         args.results_dir or RESULTS_DIR)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
