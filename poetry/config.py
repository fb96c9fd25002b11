"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted `section.key=value` arguments.

Unknown keys and wrong types fail at start, naming the key and what is valid, so a typo never trains for an hour
with a default. Every field is documented where it is declared; the README's config reference mirrors this file.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .builtin import BUILTIN_PREFIX, check_local_model

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# how choose_id is picked: poetry.choice
ChoiceMethod = Literal["letter", "letter_calibrated", "likelihood", "likelihood_norm", "likelihood_pmi",
                       "likelihood_pmi_channel"]


class ConfigError(ValueError):
    """A config problem, stated as one line that names the key."""


@dataclass
class ModelConfig:
    path: str = ""  # local model directory (or a hub id where the network allows)
    dtype: Precision = "auto"  # dtype of the frozen base weights; auto = the same as train.precision
    quantization: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes base quantization
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (~0.4 bit/param saved)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward: ~30% slower, activations ~1/layers
    checkpointing_reentrant: bool = False  # reentrant variant (needs input grads, enabled for you)
    attn_implementation: str = "sdpa"


PeftMethod = Literal["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "full"]
PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens before the prompt


@dataclass
class PeftConfig:
    # lora (options in `lora`); prompt_tuning, p_tuning (an MLP encodes the virtual tokens) and prefix_tuning
    # (trained keys and values in every layer): num_virtual_tokens before each prompt; ia3: learned scalings of
    # the ia3_* modules' activations; full: every weight, in fp32 (checkpoints are whole models)
    method: PeftMethod = "lora"
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 0  # p_tuning's MLP width; 0 = the model's hidden size
    ia3_target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    ia3_feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])  # scaled on their input


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. [q_proj, v_proj]
    use_dora: bool = False
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


@dataclass
class DataSource:
    path: str = ""  # a train-data tree, JSON list or JSONL of training poems
    # poems drawn from it per epoch, per poem: 1 takes each once, 0.2 a fresh fifth of them each epoch (drawn from
    # train.seed), 2 each twice
    weight: float = 1.0


@dataclass
class DataConfig:
    # a train-data tree, JSON list or JSONL of training poems; or several, as [{path: P, weight: W}, ...]: the first
    # is the primary source, whose held-out poems are the validation set, and the others only train
    train: str | list[DataSource] = "data/sample/train-data"
    val_fraction: float = 0.1  # poems held out for validation, chosen by a stable hash of each poem
    split_seed: int = 0
    # cross-validation (bench/choose.py --folds): the poems dealt into `folds` folds by their stable hash, fold `fold`
    # (0..folds-1) held out; val_fraction is then ignored. 0 = off: the val_fraction split
    folds: int = 0
    fold: int = 0
    max_len: int = 1024  # longer examples are dropped with a counted warning; targets are never cut
    max_items: int = 3  # words / sentences per built question, as in the official eval items
    # also train each poem's right option text after the poem alone: what eval.choose=likelihood* scores. Off: on
    # the official poems it teaches their mostly sorrowful prior (cross-validated: the same official accuracy, a
    # lower cheerful one; README, Choosing the emotion)
    emotion_examples: bool = False
    # also teach writing: each poem of a form poetry.prosody knows (五言/七言 绝句 and 律诗 by their shape, five 词牌
    # by their title) gives "写一首<form>，题为《<title>》。" -> the poem; validation logs val/writing_loss
    writing_examples: bool = False
    on_invalid: Literal["error", "skip"] = "error"
    system_prompt: str = ""  # optional system message for chat templates
    # evaluation files (official eval format), train-data trees or poem files whose poems must not be trained on: a
    # training poem sharing a line (within one character) or its title and author with one of them stops the run,
    # naming both (poetry.data.overlap)
    exclude: list[str] = field(default_factory=list)
    allow_overlap: bool = False  # train on such poems anyway, with a warning counting them

    @property
    def sources(self) -> list[DataSource]:
        """data.train as a list of sources: a single path is one source of weight 1."""
        return [DataSource(self.train)] if isinstance(self.train, str) else list(self.train)


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; overrides epochs when set (0 = run all epochs)
    micro_batch_size: int = 4
    grad_accum: int = 4  # micro-batches per optimizer step
    max_tokens_per_batch: int = 0  # token-budget batches (padded tokens) instead of a fixed size; 0 = off
    bucket_multiplier: int = 32  # length buckets hold this many batches before being sorted
    # autocast dtype; fp16 adds a GradScaler. auto: bf16 on a GPU that has it (else fp16), bf16 on a CPU with native
    # bf16 (avx512_bf16/amx_bf16), else fp32 -- bf16 without it runs ~20x slower than fp32 (see poetry.precision)
    precision: Precision = "auto"
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw"] = "paged_adamw_8bit"
    # target rows whose logits exist at once in the loss (0 = all): less memory, more passes over lm_head's weight,
    # the same maths. 512 on Gemma-3-270M, fp32, 2 CPU cores: the output layer's step memory 0.5 GB instead of
    # 3.8 GB and 10% faster than all rows at once; 256 and 128 re-read the 671 MB weight so often they are slower
    loss_chunk_rows: int = 512
    lr: float = 2e-4
    weight_decay: float = 0.0  # never applied to biases and norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.03  # used when warmup_steps is 0
    min_lr_ratio: float = 0.1  # decay floor, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 = no clipping
    # weight of T-Few's rank-classification loss on emotion examples (poetry.loss.TargetOnlyLoss.choice_loss): the
    # right option must out-score the distractors, which the LM loss alone never asks; 0 = off. Each emotion example
    # then costs four more forwards of its poem
    choice_loss_weight: float = 0.0
    # an inf/NaN gradient skips its step (fp16: the scaler's skip); this many in a row save the last finite state
    # and stop the run, naming the step and the batch
    max_nonfinite_steps: int = 8
    save_every: int = 0  # optimizer steps between checkpoints; 0 = auto, every ~10% of the run (and at the end)
    keep_last: int = 2
    resume: str = ""  # "", "auto" (latest in log.dir) or a checkpoint path
    cpu: bool = False  # force CPU (also for multi-process runs on CPU)
    fsdp: bool = False  # shard the frozen base across processes (FSDP2) instead of replicating it (DDP)
    # seconds a process waits in a collective for the others before the run stops with an error naming it: the
    # bound on a hang when a rank dies or freezes (torch's gloo default is 30 min). Long enough for what rank 0
    # does alone while the others wait: building a builtin model, saving a whole model (peft.method=full)
    dist_timeout_s: int = 600
    profile_memory: bool = False  # record a CUDA memory snapshot of the first steps


@dataclass
class EvalConfig:
    every: int = 50  # optimizer steps between evaluations; 0 = only at the end
    at_start: bool = True  # evaluate before the first step too, so every curve shows where training began
    batch_size: int = 8
    loss: bool = True  # validation loss / perplexity
    decode: bool = True  # constrained decoding on validation questions: accuracy and BLEU curves
    max_questions: int = 64  # the first validation questions scored in the loop (loss and answers); 0 = all
    max_new_tokens: int = 64  # per-value token budget
    # prompt-lookup drafts verified per value token (poetry.decode, speculative): the same greedy answers in fewer
    # forwards, 0 = off. 2 measured best on Gemma-3-270M (Intel, bench/README.md, packed forwards): fine-tuned 1.21x
    # in fp32, 1.08x in bf16, zero-shot 1.35x in bf16; 3 no faster. bf16 rounds a wider forward differently, so an
    # answer may differ from plain decoding's there
    draft_tokens: int = 2
    # how choose_id is picked (poetry.choice): PMI at λ 0.5 plus the base model's channel score at β 0.3, which raised
    # accuracy on the official poems and the balanced set, zero-shot and fine-tuned (README, Choosing the emotion)
    choose: ChoiceMethod = "likelihood_pmi_channel"
    # likelihood_pmi's λ: how much of each option's likelihood after the cue alone (its prior) is taken away
    choose_prior_weight: float = 0.5
    # likelihood_pmi_channel's β: the weight of log P(poem | option) by the base model, added to the PMI score
    choose_channel_weight: float = 0.3
    bertscore_model: str = ""  # local BERT directory; empty = BERTScore off in the loop
    bertscore_layer: int = 8
    best_metric: str = "val/loss"  # which logged metric picks the best checkpoint
    best_mode: Literal["min", "max"] = "min"


@dataclass
class LogConfig:
    dir: str = ""  # run directory; empty = runs/<date-time>
    every: int = 1  # optimizer steps between console lines (metrics.jsonl gets every step)
    tracker: Literal["none", "tensorboard", "wandb", "swanlab"] = "none"
    # wandb and swanlab: offline writes into the run directory, no account or network (sync later); online uploads
    tracker_mode: Literal["offline", "online"] = "offline"
    curves: bool = True  # PNG curves in the run directory


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.notes: list[str] = []  # what load_config decided for the user (auto choices, warnings); not a key

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_label(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    """A value as an error message quotes it: whole when short, cut with ... when long (a 1 MB string or a nested
    list keeps the message to one readable line)."""
    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = 60
    shown.maxlist = shown.maxdict = 6
    return shown.repr(value)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check (and widen int -> float) a YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {_shown(value)} is not valid; choose {_type_label(hint)}")
        return value
    if origin in (list, tuple):
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_label(item_hint)}, got {_shown(value)}")
        return [_coerce(f"{key}[{i}]", item_hint, item) for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(key, option, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if isinstance(value, (list, dict)) else errors[0])  # the shape the user meant
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}, "
                              f"got {_shown(value)}")
        entry = hint()
        _apply(entry, value, f"{key}.")
        return entry
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {_shown(value)}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 as a string (no dot)
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_label(hint)}, got {_shown(value)}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {_shown(value)}")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, hints[name], value))


def parse_override(text: str) -> dict:
    """`train.lr=2e-4` -> {"train": {"lr": 2e-4}}; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = value
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    return nested


def validate(config: Config, device: str = "cpu", processes: int = 1) -> None:
    """Every rule no single type can express, including those of the device (`cpu`/`cuda`) and of the number of
    processes launched: checked once, before any process group, model or data exists."""
    t = config.train
    positive = {"train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum,
                "train.epochs": t.epochs, "train.bucket_multiplier": t.bucket_multiplier, "lora.r": config.lora.r,
                "train.max_nonfinite_steps": t.max_nonfinite_steps, "train.dist_timeout_s": t.dist_timeout_s,
                "data.max_len": config.data.max_len, "data.max_items": config.data.max_items,
                "eval.batch_size": config.eval.batch_size, "eval.max_new_tokens": config.eval.max_new_tokens}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    _validate_sources(config.data.sources)
    if config.eval.draft_tokens < 0:
        raise ConfigError(f"eval.draft_tokens: must be 0 (off) or positive, got {config.eval.draft_tokens}")
    if t.loss_chunk_rows < 0:
        raise ConfigError(f"train.loss_chunk_rows: must be 0 (all target rows at once) or positive, "
                          f"got {t.loss_chunk_rows}")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {config.data.val_fraction}")
    folds, fold = config.data.folds, config.data.fold
    if folds < 0 or folds == 1:
        raise ConfigError(f"data.folds: must be 0 (off) or at least 2, got {folds}")
    if fold and not folds:
        raise ConfigError(f"data.fold={fold}: a held-out fold needs data.folds (at least 2)")
    if folds and not 0 <= fold < folds:
        raise ConfigError(f"data.fold: must be in [0, {folds - 1}] with data.folds={folds}, got {fold}")
    if not 0 <= config.eval.choose_prior_weight <= 2:
        raise ConfigError(f"eval.choose_prior_weight: must be in [0, 2] (0: likelihood_norm; 1: PMI), got "
                          f"{config.eval.choose_prior_weight}")
    if not 0 <= config.eval.choose_channel_weight <= 2:
        raise ConfigError(f"eval.choose_channel_weight: must be in [0, 2] (0: likelihood_pmi), got "
                          f"{config.eval.choose_channel_weight}")
    if t.choice_loss_weight < 0:
        raise ConfigError(f"train.choice_loss_weight: must be 0 (off) or positive, got {t.choice_loss_weight}")
    if t.choice_loss_weight and not config.data.emotion_examples:
        raise ConfigError("train.choice_loss_weight: the choice loss trains on emotion examples; set "
                          "data.emotion_examples=true or train.choice_loss_weight=0")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers, got {t.betas}")
    if config.model.quantization != "none" and config.model.dtype == "fp32" and t.precision != "fp32":
        raise ConfigError("model.dtype: fp32 with a quantized base wastes memory; use bf16 or fp16")
    if t.precision == "fp16" and config.model.dtype == "bf16":
        raise ConfigError("train.precision: fp16 autocast over a bf16 base mixes formats; set model.dtype=fp16 "
                          "or fp32, or use train.precision=bf16")
    if t.fsdp and config.model.quantization != "none":
        raise ConfigError("train.fsdp: a bitsandbytes-quantized base cannot be sharded; use model.quantization=none "
                          "(FSDP spreads a bf16 base over the cards) or one process with the quantized base")
    if t.fsdp and t.optimizer != "adamw":
        raise ConfigError(f"train.fsdp: train.optimizer={t.optimizer} (bitsandbytes) cannot step sharded parameters; "
                          "use train.optimizer=adamw (the adapters' fp32 Adam state is small, and sharded too)")
    if t.fsdp and processes < 2:
        raise ConfigError("train.fsdp: sharding needs at least 2 processes (accelerate launch --num_processes N "
                          "or torchrun --nproc_per_node N; add train.cpu=true on CPU)")
    if processes > 1 and device == "cpu" and not t.cpu:  # Accelerate would see one process: N runs, each rank 0
        raise ConfigError(f"{processes} processes were launched on CPU; set train.cpu=true so that they form one run")
    _validate_method(config)
    evaluates_in_loop = config.eval.every or config.eval.at_start
    if device == "cpu" and config.model.quantization == "4bit" and evaluates_in_loop:
        raise ConfigError("model.quantization=4bit on CPU: bitsandbytes breaks the training step after an in-loop "
                          "no_grad forward (silently wrong LoRA gradients on Llama); use 8bit or none, or "
                          "eval.every=0 and eval.at_start=false")


def _validate_sources(sources: list[DataSource]) -> None:
    if not sources:
        raise ConfigError("data.train: an empty list; give a path, or [{path: P, weight: W}, ...]")
    for i, source in enumerate(sources):
        if not source.path:
            raise ConfigError(f"data.train[{i}].path: missing; each source needs the path of its poems")
        if source.weight <= 0:
            raise ConfigError(f"data.train[{i}].weight: must be positive (poems drawn per poem and epoch), got "
                              f"{source.weight}; leave the source out instead")
    paths = [str(Path(s.path).resolve()) for s in sources]
    if len(set(paths)) < len(paths):
        raise ConfigError("data.train: a source is listed twice; give it once, with the weight wanted")


def _validate_method(config: Config) -> None:
    method, t = config.peft.method, config.train
    if method in PROMPT_LEARNING and config.peft.num_virtual_tokens < 1:
        raise ConfigError(f"peft.num_virtual_tokens: must be at least 1, got {config.peft.num_virtual_tokens}")
    if method != "lora" and (config.lora.use_dora or config.lora.use_rslora):
        raise ConfigError(f"lora.use_dora / lora.use_rslora: LoRA switches, but peft.method={method}")
    if method == "full":
        if config.model.quantization != "none":
            raise ConfigError("peft.method=full: quantized weights cannot be trained; use model.quantization=none")
        if config.model.dtype != "fp32":
            raise ConfigError(f"peft.method=full: the trained weights are the master copy and must be fp32 "
                              f"(model.dtype={config.model.dtype}); autocast still computes in train.precision")
    if method != "lora" and t.fsdp:
        raise ConfigError(f"train.fsdp: only peft.method=lora is sharded here (got {method})")
    if method == "prefix_tuning" and config.model.gradient_checkpointing:
        raise ConfigError("peft.method=prefix_tuning: PEFT refuses it with gradient checkpointing (its trained keys "
                          "and values enter every layer as a cache); set model.gradient_checkpointing=false")


OFFICIAL_DATA_HELP = ("the official CCL25-Eval Task 5 training data is in the organisers' repository "
                      "HITICI-NLPGroup/CCPA-EvalTask on GitHub, folder 'CCPA 2025/': put its train-data/ at "
                      "data/ccpa2025/train-data (README, Data), or train on data/sample/train-data")


def check_inputs(config: Config) -> None:
    """The files a training run reads exist: checked before any process group, model or data load, so a wrong
    path fails in a second instead of after minutes of loading a 7B model."""
    for source in config.data.sources:
        if not Path(source.path).exists():
            raise ConfigError(f"data.train={source.path}: no such file or directory; {OFFICIAL_DATA_HELP}")
    for path in config.data.exclude:
        if not Path(path).exists():
            raise ConfigError(f"data.exclude: {path}: no such file or directory")
    if not config.model.path.startswith(BUILTIN_PREFIX):
        try:
            check_local_model(config.model.path)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    if config.train.resume and config.train.resume != "auto" and not Path(config.train.resume).is_dir():
        raise ConfigError(f"train.resume={config.train.resume}: no such checkpoint directory")


def fit_to_device(config: Config, device: str) -> None:
    """Replace `auto` in train.precision and model.dtype by what suits `device` ('cpu' or 'cuda'); config.notes
    says what was chosen and why, and warns of an explicit choice that runs far slower than another one would."""
    from .precision import choose

    precision = choose(config.train.precision, device, "train.precision")
    config.train.precision = precision.value
    config.notes.append(f"train.precision={precision.value} ({precision.reason})")
    warnings = [precision.warning]
    if config.model.dtype == "auto" and config.peft.method == "full":
        config.model.dtype = "fp32"
        config.notes.append("model.dtype=fp32 (auto, peft.method=full: the trained weights are the master copy)")
    elif config.model.dtype == "auto":
        config.model.dtype = precision.value
        config.notes.append(f"model.dtype={precision.value} (auto: as train.precision)")
    else:
        warnings.append(choose(config.model.dtype, device, "model.dtype").warning)
    config.notes += [f"warning: {warning}" for warning in dict.fromkeys(warnings) if warning]


def load_config(path: str | Path | None = None, overrides: list[str] = (), device: str | None = None,
                processes: int | None = None) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` override, then `auto` fitted to the device (by
    default CUDA when present and train.cpu is off, else CPU) and the launch (an FSDP accelerate config; `processes`
    defaults to the launcher's WORLD_SIZE), then validation. Nothing changes the config after this."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                              f"re-save the file as UTF-8") from None
        except yaml.YAMLError as err:
            first = " ".join(str(err).split())  # PyYAML's messages span lines
            raise ConfigError(f"{path}: invalid YAML: {first}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
        try:
            _apply(config, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        _apply(config, parse_override(text))
    if device is None:
        from .precision import default_device

        device = default_device(config.train.cpu)
    fit_to_device(config, device)
    if device == "cuda" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        config.train.fsdp = True  # accelerate launch --config_file configs/accelerate/fsdp.yaml (GPU only)
    validate(config, device, processes or int(os.environ.get("WORLD_SIZE", "1")))
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
