"""Memory planning: an estimate of a run's peak before any weight loads (measured peaks: poetry.profiling).

    python -m poetry.memory --config configs/qwen2.5-7b-lora.yaml [section.key=value ...] [--budget-gb 32]

    python -m poetry.memory --config configs/demo.yaml --device cpu

The estimate reads only config.json and adds up weights (by dtype or quantization; a quantized base's other
parameters in the fp32 that PEFT's kbit preparation casts them to), the trained parameters of
`peft.method` (LoRA, prompt/P/prefix tuning, IA3, or every weight in fp32 for `full`), their gradients and
optimizer state, activations (with or without checkpointing) for the worst-case micro-batch, and the
output layer (the target rows, and one chunk's logits at a time). Activations are the tensors autograd keeps per
token in one decoder layer, counted tensor by tensor (tests/test_memory.py holds the count to what autograd saves on
each model family). On a CPU the process itself is a measured constant: the resident memory of Python, torch,
transformers, PEFT, the tokenizer and the tokenised data, read from this process once they are loaded and before
any weight is.
bench/memory.py compares the total with the measured peak of a training step.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import PROMPT_LEARNING, Config, ConfigError, ModelConfig, load_config

GB = 1024**3
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
OPTIMIZER_BYTES = {"adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_NAMES = {"lora": "LoRA", "prompt_tuning": "prompt tuning", "p_tuning": "P-tuning",
                "prefix_tuning": "prefix tuning", "ia3": "IA3", "full": "full"}
CUDA_OVERHEAD_GB = 0.8  # CUDA context, cuBLAS workspace, allocator fragmentation: measured 0.5-1 GB typically
QK_NORM_MODELS = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text"}  # an RMSNorm on each head's queries and keys
SANDWICH_NORM_MODELS = {"gemma2", "gemma3", "gemma3_text"}  # norms after attention and MLP as well as before


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
    qk_norm: bool = False
    sandwich_norms: bool = False
    softcap: bool = False  # Gemma's cap * tanh(logits / cap): a second logits buffer in the loss
    biased: tuple[str, ...] = ()  # the linear layers that carry a bias

    @classmethod
    def from_config(cls, config) -> "Shape":
        config = getattr(config, "text_config", config)
        heads, model_type = config.num_attention_heads, config.model_type
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qk_norm=model_type in QK_NORM_MODELS, sandwich_norms=model_type in SANDWICH_NORM_MODELS,
                   softcap=bool(getattr(config, "final_logit_softcapping", None)), biased=biased_linears(config))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (gated MLP, grouped-query attention)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + self.unquantized_block_params

    @property
    def unquantized_block_params(self) -> int:
        """Per decoder block: the norms' scales and the biases, which bitsandbytes leaves unquantized."""
        norms = 2 * self.hidden * (2 if self.sandwich_norms else 1) + (2 * self.head_dim if self.qk_norm else 0)
        return norms + sum(self.linears()[name][1] for name in self.biased)

    def block_bytes(self, linear_storage: str, unquantized_bytes: float) -> float:
        """One decoder block's frozen weights: the linear layers as `linear_storage` holds them, the rest at
        `unquantized_bytes` each."""
        return (sum(linear_weight_bytes(rows, cols, linear_storage) for cols, rows in self.linears().values())
                + self.unquantized_block_params * unquantized_bytes)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def saved_per_token(self, lora_targets: list[str], r: int, dropout: bool, seq_len: int) -> int:
        """Elements autograd keeps for backward per token in one LoRA-wrapped decoder layer (sdpa attention, padded
        batches): exact to 2% with adapters on every linear layer, an overestimate of up to 25% with fewer."""
        h, i, heads, kv_heads = self.hidden, self.intermediate, self.heads, self.kv_heads
        q, k = heads * self.head_dim, kv_heads * self.head_dim
        # the residual stream and the norms' outputs (4h) and 1/rms (2), the rotated queries, the keys and values
        # repeated to every query head and the attention output (4q), its log-sum-exp (heads), the MLP's gate, up,
        # activation and product (4i), each adapter's r-wide bottleneck, and the attention mask's row
        saved = 4 * h + 2 + 4 * q + heads + 4 * i + r * len(lora_targets) + seq_len
        if self.qk_norm:
            saved += q + k + heads + kv_heads  # the heads' inputs to their norms, and the norms' 1/rms
        if self.sandwich_norms:
            saved += 2 * h + 2
        if dropout:
            saved += self.dropout_saved(lora_targets)
        return saved

    def dropout_saved(self, lora_targets: list[str]) -> int:
        """What LoRA dropout adds per token, as autograd's saved-tensor hooks count it: n adapters reading one input
        of width d keep (2n - 1) d more, and an adapter on o_proj one more copy of its input."""
        linears, widths = self.linears(), {}
        for name in lora_targets:  # adapters reading one input: q/k/v the attention norm's, gate/up the MLP norm's
            group = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name, name)
            widths.setdefault(group, []).append(linears[name][0])
        extra = sum((2 * len(group) - 1) * group[0] for group in widths.values())
        return extra + (self.heads * self.head_dim if "o_proj" in lora_targets else 0)


def estimate(cfg: Config, shape: Shape, device: str = "cuda", shards: int = 1, *, batch: tuple[int, int] | None = None,
             targets: int | None = None, process_gb: float | None = None) -> list[tuple[str, float, str]]:
    """Rows of (what, GiB, how it was counted) for one process; `shards` > 1 is FSDP over that many processes.
    `cfg` comes from load_config, for `device`: no `auto` is left in it. `batch` (sequences, padded length) and its
    `targets` default to the config's worst case: full micro-batches of data.max_len, half of it answer tokens.
    On a CPU, `process_gb` is the measured resident memory of the process before the weights (process_rss_gb)."""
    m, t, method = cfg.model, cfg.train, cfg.peft.method
    quantized = m.quantization != "none"
    # prepare_model_for_kbit_training casts every 16-bit parameter it leaves unquantized (embeddings, lm_head,
    # norms, biases) to fp32; the fp32 embeddings and norms then carry the residual stream in fp32 as well
    kept_dtype = "fp32" if quantized else m.dtype
    act_bytes = WEIGHT_BYTES[t.precision]
    stream_bytes = WEIGHT_BYTES["fp32"] if quantized else act_bytes
    names = lora_targets(cfg) if method == "lora" else []
    trained = trainable_count(cfg, shape)
    sequences, seq_len = batch or (t.micro_batch_size, cfg.data.max_len)
    tokens = sequences * seq_len if batch or not t.max_tokens_per_batch else t.max_tokens_per_batch
    targets = tokens // 2 if targets is None else targets
    if method in PROMPT_LEARNING:  # the virtual tokens run through every layer with each sequence
        seq_len += cfg.peft.num_virtual_tokens
        tokens += sequences * cfg.peft.num_virtual_tokens
    # an upper bound for a kbit-prepared base, whose layers keep some of these in the autocast dtype (a 4-bit Qwen2
    # keeps 0.89 of it: tests/test_memory.py)
    per_layer = stream_bytes * shape.saved_per_token(names, cfg.lora.r, method == "lora" and cfg.lora.dropout > 0,
                                                     seq_len)
    if m.gradient_checkpointing:
        activations = tokens * (shape.layers * stream_bytes * shape.hidden + per_layer)  # layer inputs + one layer
        how = f"{tokens} tokens; checkpointed: layer inputs + one layer recomputed"
    else:
        activations = tokens * shape.layers * per_layer
        how = f"{tokens} tokens x {shape.layers} layers x {per_layer / 1024:.0f} KiB"
    if quantized:
        how += "; fp32 (kbit preparation)"
    output_layer, output_how = output_layer_bytes(shape, targets, t.loss_chunk_rows, act_bytes, stream_bytes,
                                                  WEIGHT_BYTES[kept_dtype])
    trained /= shards  # adapters, their gradients and Adam state are sharded with their layers
    if method == "full":  # the weights themselves are trained: no separate frozen copy
        rows = [("weights (fp32, trained)", trained * 4 / GB,
                 f"{trained / 1e9:.2f}B params: decoder, embeddings and lm_head "
                 f"({'tied' if shape.tied else 'untied'})")]
    else:
        rows = frozen_rows(shape, linear_storage(m), kept_dtype, shards) + [
            (f"{METHOD_NAMES[method]} weights (fp32)", trained * 4 / GB,
             f"{trained / 1e6:.3f}M params{' per shard' if shards > 1 else ''}"
             + (f", r={cfg.lora.r}" if method == "lora" else ""))]
    rows += [
        (f"{METHOD_NAMES[method]} gradients (fp32)", trained * 4 / GB, ""),
        ("optimizer state", trained * OPTIMIZER_BYTES[t.optimizer] / GB, t.optimizer),
        ("activations", activations / GB, how),
        ("output layer", output_layer / GB, output_how),
    ]
    if device == "cuda":
        rows.append(("CUDA context + allocator", CUDA_OVERHEAD_GB, "typical"))
    elif process_gb is not None:
        rows.append(("process before the weights", process_gb, "measured: Python, torch, transformers, PEFT, "
                                                               "tokenizer, tokenised data"))
    return rows


def linear_storage(m: ModelConfig) -> str:
    """How the decoder's linear weights are held: model.dtype, or a bitsandbytes format (4bit+dq: double
    quantization)."""
    if m.quantization == "4bit" and m.double_quant:
        return "4bit+dq"
    return m.dtype if m.quantization == "none" else m.quantization


def frozen_rows(shape: Shape, storage: str, kept_dtype: str, shards: int) -> list[tuple[str, float, str]]:
    """The frozen base: decoder blocks with their linear layers in `storage` (a dtype or a quantization), the
    rest of the model in `kept_dtype`."""
    kept_bytes = WEIGHT_BYTES[kept_dtype]
    params = shape.layers * shape.block_params + shape.hidden  # the final norm too
    decoder = shape.layers * shape.block_bytes(storage, kept_bytes) + shape.hidden * kept_bytes
    what = f"{params / 1e9:.2f}B params, {storage}"
    if storage != kept_dtype:
        what += f"; norms and biases {kept_dtype} (kbit preparation)"
    rows = [("base weights", decoder / GB, what)] if shards == 1 else [
        ("base weights (FSDP shard)", decoder / shards / GB, f"{what} / {shards} processes"),
        # one layer runs while the next is prefetched; the root unit (embeddings, lm_head) stays whole, below
        ("gathered layers (FSDP)", 2 * shape.block_bytes(storage, kept_bytes) / GB, "2 decoder layers unsharded")]
    cast = " (kbit preparation)" if storage != kept_dtype else ""
    return rows + [("embeddings + lm_head", shape.embedding_params * kept_bytes / GB,
                    f"{shape.embedding_params / 1e9:.2f}B params, {kept_dtype}{cast} "
                    f"({'tied' if shape.tied else 'untied'})")]


def linear_weight_bytes(rows: int, cols: int, storage: str) -> float:
    """One frozen linear weight of `rows` output features as stored: `storage` is a dtype of WEIGHT_BYTES or a
    bitsandbytes quantization, whose statistics count too."""
    weights = rows * cols
    if storage == "8bit":  # int8, and an fp32 scale per output row
        return weights + 4 * rows
    blocks = math.ceil(weights / 64)  # 4-bit: 64 weights share an absmax
    if storage == "4bit":  # two weights a byte, an fp32 absmax per block, the 16 fp32 values of nf4/fp4
        return weights / 2 + 4 * blocks + 4 * 16
    if storage == "4bit+dq":  # the absmaxes as int8 with an fp32 absmax per 256, and their 256-entry table and offset
        return weights / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)
    return weights * WEIGHT_BYTES[storage]


def biased_linears(config) -> tuple[str, ...]:
    """The linear layers of a decoder block that carry a bias: Qwen2's queries, keys and values always do."""
    if config.model_type == "qwen2":
        return "q_proj", "k_proj", "v_proj"
    attention = ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(config, "attention_bias", False) else ()
    return attention + (("gate_proj", "up_proj", "down_proj") if getattr(config, "mlp_bias", False) else ())


def lora_targets(cfg: Config) -> list[str]:
    return list(LINEAR_NAMES) if cfg.lora.target_modules == ["all-linear"] else \
        [name for name in LINEAR_NAMES if name in cfg.lora.target_modules]


def trainable_count(cfg: Config, shape: Shape) -> int:
    """Parameters `peft.method` trains, as PEFT builds them (tests/test_memory.py holds each to PEFT's own count)."""
    p, layers, hidden, linears = cfg.peft, shape.layers, shape.hidden, shape.linears()
    if p.method == "lora":
        return layers * sum(cfg.lora.r * sum(linears[name]) for name in lora_targets(cfg))
    if p.method == "prompt_tuning":  # one embedding per virtual token
        return p.num_virtual_tokens * hidden
    if p.method == "p_tuning":  # the embeddings and an MLP hidden -> E -> E -> hidden that re-encodes them
        width = p.encoder_hidden_size or hidden
        return p.num_virtual_tokens * hidden + 2 * hidden * width + width * width + 2 * width + hidden
    if p.method == "prefix_tuning":  # a key and a value per virtual token, layer and key-value head
        return p.num_virtual_tokens * layers * 2 * shape.kv_heads * shape.head_dim
    if p.method == "ia3":  # a scale per output feature, per input feature for the feedforward modules
        return layers * sum(linears[name][0] if name in p.ia3_feedforward_modules else linears[name][1]
                            for name in p.ia3_target_modules if name in linears)
    return layers * shape.block_params + shape.embedding_params + hidden  # full: every weight, the final norm too


def device_memory_gb(device: str) -> float | None:
    """What a run on `device` may use: a GPU's total memory, a CPU machine's available memory; None if unknown."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    meminfo = Path("/proc/meminfo")
    if device == "cpu" and meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024 / GB
    return None


def output_layer_bytes(shape: Shape, targets: int, chunk_rows: int, act_bytes: float, stream_bytes: float,
                       lm_head_bytes: float) -> tuple[float, str]:
    """(bytes, how) of poetry.loss: the gathered target rows (`stream_bytes` each) and their gradient, the fp32
    logits of one chunk (a second buffer under Gemma's softcap, and the matmul's own output when it runs in
    bf16/fp16) or, unchunked, the logits, log-softmax and gradient of all target rows. An lm_head stored wider than
    the matmul's `act_bytes` (fp32 after kbit preparation, under bf16 autocast) is cast whole for the loss."""
    held = 2 * targets * shape.hidden * stream_bytes
    cast = lm_head_bytes > act_bytes
    held += shape.vocab * shape.hidden * act_bytes if cast else 0  # the cast copy of lm_head: vocab x hidden
    cast_how = f"; lm_head cast to {act_bytes * 8:.0f}-bit for the matmul" if cast else ""
    if not chunk_rows:
        return (held + targets * shape.vocab * 12,
                f"{targets} target rows x {shape.vocab} ids, fp32, unchunked{cast_how}")
    buffers = 4 * (2 if shape.softcap else 1) + (act_bytes if act_bytes != 4 else 0)
    chunk = min(chunk_rows, targets)
    return held + chunk * shape.vocab * buffers, f"{targets} target rows; logits of {chunk} at a time{cast_how}"


def process_rss_gb() -> float:
    """This process's resident memory once the training stack is imported: what a run holds before any weight."""
    import peft  # noqa: F401  (imported by every run; counted here too)
    import transformers  # noqa: F401

    from .profiling import proc_status_gb  # imports torch

    if Path("/proc/self/status").exists():
        return proc_status_gb("VmRSS")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB  # macOS reports bytes (and the peak)


def estimate_table(cfg: Config, model_path: str, budget_gb: float = 32.0, device: str = "cuda", shards: int = 1,
                   process_gb: float | None = None):
    """The estimate as a table, and its total; `model_path` is cfg.model.path resolved (builtin:NAME built)."""
    from rich.table import Table
    from transformers import AutoConfig

    shape = Shape.from_config(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code))
    rows = estimate(cfg, shape, device, shards, process_gb=process_gb)
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
                        help="memory to fit in, GiB (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the run to plan; cpu also measures this process with the tokenizer and the "
                             "tokenised data loaded, as train.py does (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=1,
                        help="with train.fsdp=true: how many processes share the model (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from .builtin import resolve_model_path
    from .data import DataError
    from .feed import TaskData
    from .model import load_tokenizer
    from .prompt import PromptFormat

    args = _parser().parse_args(argv)
    try:
        # `auto` precision is fitted to the planned device: a GPU's even where this machine has none
        cfg = load_config(args.config, args.overrides, device=args.device, processes=args.processes)
        model_path = resolve_model_path(cfg.model.path)  # builds builtin:NAME; one line for a missing path
        process_gb = None
        if args.device == "cpu":  # tokenizer and tokenised data held, as train.py holds them when it measures
            tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
            data = TaskData(cfg.data, PromptFormat(tokenizer, cfg.data.system_prompt), cfg.train.seed)
            data.train_epoch(0), data.val_dataset
            process_gb = process_rss_gb()
        table, _ = estimate_table(cfg, model_path, args.budget_gb, args.device,
                                  args.processes if cfg.train.fsdp else 1, process_gb)
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.processes > 1 and not cfg.train.fsdp:
        print(f"note: --processes {args.processes} without train.fsdp=true: DDP replicates the whole model in "
              f"every process, so the per-process figure is that of one", file=sys.stderr)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
