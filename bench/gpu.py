"""Memory of the CUDA recipes under a 32 GB cap, for whoever has a GPU: one command, about 10 minutes.

    pip install -e '.[dev]' && python bench/gpu.py [--cap-gb 32] [--seq 1024] [--max-batch 64] [--scratch-dir DIR]
    python bench/gpu.py --cpu-smoke          # the same code end to end on CPU with a tiny stand-in, in seconds

For random-init Qwen2.5-7B LoRA (bf16, gradient checkpointing, paged AdamW 8-bit) and Qwen2.5-14B QLoRA (nf4, double
quantization, bf16 compute), under `torch.cuda.set_per_process_memory_fraction` for the cap, it measures:
- peak allocated and reserved memory of a training step (forward, backward, optimizer step) and of an in-loop
  eval forward under no_grad, at micro-batch 1;
- the largest micro-batch of `--seq` tokens that trains without running out of memory (doubling, then bisecting);
- poetry.memory's estimate against the measured peak at that batch;
- that a 4-bit training step right after a no_grad eval forward gives the gradients it gives without one (on CPU
  bitsandbytes 4-bit fails exactly there: see the README's platform notes).
Each base is loaded as train.py loads it, by poetry.model.load_model (bitsandbytes quantization by transformers'
loader, PEFT's kbit preparation, checkpointing) from a random-init checkpoint written to `--scratch-dir` and
deleted once loaded: 15 GB of disk for the 7B, 30 GB for the 14B. The weights are random (no hub here): memory and
gradients do not depend on their values. Each stage's results are saved as soon as it ends. Its authors never ran
it on a GPU; `--cpu-smoke` (tested) runs the same stages on CPU with a 2-layer Qwen2 stand-in in fp32, the QLoRA
stage on an 8-bit base (the only bitsandbytes training that works on CPU), with peaks read from the process RSS,
which only grows.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
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
    quantization: str  # model.quantization: none, 4bit (nf4, double quantization) or 8bit
    optimizer: str


CUDA_SETUPS = (Setup("Qwen2.5-7B LoRA bf16", QWEN25["qwen2.5-7b"], "none", "paged_adamw_8bit"),
               Setup("Qwen2.5-14B QLoRA nf4", QWEN25["qwen2.5-14b"], "4bit", "paged_adamw_8bit"))
# the same stages; the quantized base in 8-bit, as a 4-bit one breaks the training step on CPU after a no_grad forward
SMOKE_SETUPS = (Setup("stand-in LoRA fp32", STAND_IN, "none", "adamw"),
                Setup("stand-in QLoRA int8", STAND_IN, "8bit", "adamw"))


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
        return {"gpu": None, "note": "--cpu-smoke: peaks are process RSS; the QLoRA stage's base is 8-bit"}


def write_random_checkpoint(config, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
    """A random-init model as from_pretrained reads it: config.json and one safetensors shard per decoder layer (and
    one for the rest), each drawn on `device` and written before the next, so a 14B model is never whole in memory.
    Matrices are N(0, 0.02), norm scales 1, biases 0."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config, dtype=dtype).named_parameters()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(f"model-{layer}.safetensors", []).append(name)
    config.save_pretrained(directory)
    for file, names in shards.items():
        save_file({name: random_tensor(name, shapes[name], dtype, device).cpu() for name in names},
                  directory / file, metadata={"format": "pt"})
    weight_map = {name: file for file, names in shards.items() for name in names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if len(shape) == 2:
        return torch.randn(shape, dtype=dtype, device=device) * 0.02
    return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=dtype, device=device)


def check_as_trained(model, quantization: str) -> str:
    """The adapted model is what train.py trains: PEFT's layer class for this base on every LoRA layer, and gradient
    checkpointing on (the estimate assumes it). PEFT wraps a bitsandbytes layer in its own class, and the kbit
    preparation turns checkpointing on, only for a model that transformers' loader flagged quantized
    (is_loaded_in_4bit / is_loaded_in_8bit); a base quantized by hand gets plain lora.Linear and no checkpointing.
    Returns the class name, for the results."""
    from peft.tuners.lora import Linear, LoraLayer
    from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

    expected = {"none": Linear, "8bit": Linear8bitLt, "4bit": Linear4bit}[quantization]
    found = {type(module) for module in model.modules() if isinstance(module, LoraLayer)}
    if found != {expected}:
        raise RuntimeError(f"LoRA layers are {', '.join(sorted(c.__qualname__ for c in found))}, not "
                           f"{expected.__qualname__} as train.py gets them on a model.quantization={quantization} base")
    if not model.get_base_model().is_activation_checkpointing:
        raise RuntimeError("gradient checkpointing is off, though model.gradient_checkpointing is on and the estimate "
                           "counts on it")
    return expected.__name__


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

    def __init__(self, setup: Setup, memory, seq: int, scratch: Path):
        from transformers import Qwen2Config

        from poetry.loss import TargetOnlyLoss
        from poetry.model import add_adapter, load_model
        from poetry.optim import build_optimizer

        self.setup, self.memory, self.seq = setup, memory, seq
        precision = "bf16" if memory.dtype == torch.bfloat16 else "fp32"
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="gpu-bench-") as checkpoint:
            write_random_checkpoint(Qwen2Config(**COMMON, **setup.shape), Path(checkpoint), memory.dtype,
                                    memory.device)
            self.cfg = Config(model=ModelConfig(path=checkpoint, dtype=precision, quantization=setup.quantization,
                                                gradient_checkpointing=True),
                              lora=LoraConfig(dropout=0.0), data=DataConfig(max_len=seq),
                              train=TrainConfig(micro_batch_size=1, optimizer=setup.optimizer, precision=precision))
            # as train.py: the loader quantizes and prepares the base; accelerator.prepare moves an unquantized one
            self.model = add_adapter(load_model(self.cfg.model, memory.device), self.cfg.peft, self.cfg.lora)
        if setup.quantization == "none":
            self.model.to(memory.device)
        self.lora_layer = check_as_trained(self.model, setup.quantization)
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


def measure(setup: Setup, memory, seq: int, max_batch: int, scratch: Path) -> dict:
    bench = Bench(setup, memory, seq, scratch)
    row = {"setup": setup.name, "seq": seq, "quantization": setup.quantization, "optimizer": setup.optimizer,
           "lora_layer": bench.lora_layer, "gradient_difference_after_eval": bench.gradients_after_eval(),
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
    for column in ("setup", "LoRA layer", "train peak alloc/reserved GiB", "eval peak alloc/reserved GiB",
                   "largest batch", "estimate / peak", "grad diff after eval"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for r in rows:
        pair = lambda p: f"{p['allocated_gb']:.2f} / {p['reserved_gb']:.2f}"  # noqa: E731
        ratio = r.get("estimate_over_peak", math.nan)
        table.add_row(r["setup"], r["lora_layer"], pair(r["train_step"]), pair(r["eval_forward"]),
                      str(r["largest_micro_batch"]), f"{ratio:.2f}", f"{r['gradient_difference_after_eval']:.1e}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run every stage on CPU with a tiny stand-in")
    parser.add_argument("--cap-gb", type=float, default=32.0, help="GPU memory cap (default: %(default)s)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: 1024; 64 with --cpu-smoke)")
    parser.add_argument("--max-batch", type=int, help="largest micro-batch tried (default: 64; 4 with --cpu-smoke)")
    parser.add_argument("--results-dir", type=Path, help="default: bench/results")
    parser.add_argument("--scratch-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where each stage's random checkpoint is written, then deleted once loaded: 15 GB for "
                             "the 7B, 30 GB for the 14B (default: %(default)s)")
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
    args.scratch_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for setup in SMOKE_SETUPS if args.cpu_smoke else CUDA_SETUPS:
        rows.append(measure(setup, memory, seq, max_batch, args.scratch_dir))
        # saved after every stage: a later stage that fails or runs out of memory loses none of the earlier rows
        path = write_results("gpu-smoke" if args.cpu_smoke else "gpu", {**memory.facts(), "rows": rows},
                             args.results_dir or RESULTS_DIR)
        print(f"{setup.name}: saved {path}")
    print_rows(rows, f"{'CPU smoke' if args.cpu_smoke else f'CUDA, cap {args.cap_gb:g} GiB'}, seq {seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
