"""Memory planning: an estimate of a run's peak before any weight loads (measured peaks: poetry.profiling).

    python -m poetry.memory --config configs/qwen2.5-7b-lora.yaml [section.key=value ...] [--budget-gb 32]

The estimate reads only config.json and adds up weights (by dtype or quantization), LoRA parameters, their
gradients and optimizer state, activations (with or without checkpointing) for the worst-case micro-batch, and
target-only logits. Activation figures are first-order (the tensors a decoder layer saves for backward), so treat
the total as a planning number and check it with the measured peaks (metrics.jsonl, mem/*).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .config import Config, ConfigError, load_config

GB = 1024**3
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
# bitsandbytes: int8 plus a per-row scale; nf4/fp4 packs two weights a byte plus an fp32 absmax per 64 weights,
# which double quantization stores as int8 with an fp32 constant per 256 blocks
QUANTIZED_BYTES = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 4 / 64, "4bit+dq": 0.5 + 1 / 64 + 4 / (64 * 256)}
OPTIMIZER_BYTES = {"adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_OVERHEAD_GB = 0.8  # CUDA context, cuBLAS workspace, allocator fragmentation: measured 0.5-1 GB typically


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "Shape":
        config = getattr(config, "text_config", config)
        heads = config.num_attention_heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (gated MLP, grouped-query attention)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def estimate(cfg: Config, shape: Shape, device: str = "cuda", shards: int = 1) -> list[tuple[str, float, str]]:
    """Rows of (what, GiB, how it was counted) for one process; `shards` > 1 is FSDP over that many processes.
    `cfg` comes from load_config, for `device`: no `auto` is left in it."""
    m, t = cfg.model, cfg.train
    precision, weight_dtype = t.precision, m.dtype
    base = shape.layers * shape.block_params
    quant = "4bit+dq" if m.quantization == "4bit" and m.double_quant else m.quantization
    per_weight = QUANTIZED_BYTES.get(quant, WEIGHT_BYTES[weight_dtype])
    targets = shape.linears() if cfg.lora.target_modules == ["all-linear"] else \
        {k: v for k, v in shape.linears().items() if k in cfg.lora.target_modules}
    lora = shape.layers * sum(cfg.lora.r * (a + b) for a, b in targets.values())
    act_bytes = 2.0 if precision != "fp32" else 4.0
    tokens = t.micro_batch_size * cfg.data.max_len if not t.max_tokens_per_batch else t.max_tokens_per_batch
    h, i = shape.hidden, shape.intermediate
    kv = 2 * shape.kv_heads * shape.head_dim
    # saved for backward per token and layer: norm outputs, q/k/v, attention output, MLP gate/up/act/product,
    # and the dropout-masked inputs of each LoRA-wrapped linear
    per_layer = act_bytes * (6 * h + kv + 4 * i + len(targets) * h)
    if m.gradient_checkpointing:
        activations = tokens * (shape.layers * act_bytes * h + per_layer)  # layer inputs + one layer recomputed
        how = f"{tokens} tokens; checkpointed: layer inputs + one layer"
    else:
        activations = tokens * shape.layers * per_layer
        how = f"{tokens} tokens x {shape.layers} layers"
    logits = (tokens // 2) * shape.vocab * 12  # fp32 logits, softmax and grad for ~half the tokens (targets)
    what = f"{base / 1e9:.2f}B params, {quant if quant != 'none' else weight_dtype}"
    rows = [("base weights", base * per_weight / GB, what)] if shards == 1 else [
        ("base weights (FSDP shard)", base * per_weight / shards / GB, f"{what} / {shards} processes"),
        # one layer runs while the next is prefetched; the root unit (embeddings, lm_head) stays whole, below
        ("gathered layers (FSDP)", 2 * shape.block_params * per_weight / GB, "2 decoder layers unsharded")]
    lora /= shards  # adapters, their gradients and Adam state are sharded with their layers
    rows += [
        ("embeddings + lm_head", shape.embedding_params * WEIGHT_BYTES[weight_dtype] / GB,
         f"{shape.embedding_params / 1e9:.2f}B params, {weight_dtype} ({'tied' if shape.tied else 'untied'})"),
        ("LoRA weights (fp32)", lora * 4 / GB, f"{lora / 1e6:.1f}M params{' per shard' if shards > 1 else ''}, "
                                               f"r={cfg.lora.r}"),
        ("LoRA gradients (fp32)", lora * 4 / GB, ""),
        ("optimizer state", lora * OPTIMIZER_BYTES[t.optimizer] / GB, t.optimizer),
        ("activations", activations / GB, how),
        ("target-only logits", logits / GB, f"~{tokens // 2} target tokens x {shape.vocab} vocab, fp32"),
    ]
    if device == "cuda":
        rows.append(("CUDA context + allocator", CUDA_OVERHEAD_GB, "typical"))
    return rows


def estimate_table(cfg: Config, model_path: str, budget_gb: float = 32.0, device: str = "cuda", shards: int = 1):
    """The estimate as a table, and its total; `model_path` is cfg.model.path resolved (builtin:NAME built)."""
    from rich.table import Table
    from transformers import AutoConfig

    shape = Shape.from_config(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code))
    rows = estimate(cfg, shape, device, shards)
    total = sum(gb for _, gb, _ in rows)
    per_process = f", per process of {shards} (FSDP)" if shards > 1 else ""
    table = Table(title=f"memory estimate ({device}{per_process}): {model_path}")
    for column, justify in (("what", "left"), ("GiB", "right"), ("counted as", "left")):
        table.add_column(column, justify=justify)
    for what, gb, how in rows:
        table.add_row(what, f"{gb:.2f}", how)
    verdict = "fits" if total <= budget_gb else "DOES NOT FIT"
    table.add_row(f"total ({verdict} in {budget_gb:g} GiB)", f"{total:.2f}", "", style="bold")
    return table, total


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poetry.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--budget-gb", type=float, default=32.0,
                        help="GPU memory to fit in, GiB (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=1,
                        help="with train.fsdp=true: how many processes share the model (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from .builtin import resolve_model_path

    args = _parser().parse_args(argv)
    try:
        # The estimate is of a CUDA run, so `auto` precision is fitted to a GPU even where this machine has none
        cfg = load_config(args.config, args.overrides, device="cuda", processes=args.processes)
        model_path = resolve_model_path(cfg.model.path)  # builds builtin:NAME; one line for a missing path
        table, _ = estimate_table(cfg, model_path, args.budget_gb, shards=args.processes if cfg.train.fsdp else 1)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.processes > 1 and not cfg.train.fsdp:
        print(f"note: --processes {args.processes} without train.fsdp=true: DDP replicates the whole model in "
              f"every process, so the per-process figure is that of one", file=sys.stderr)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
