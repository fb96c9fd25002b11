"""Loading a causal LM from a local directory, optional bitsandbytes quantization, the trained part (a PEFT adapter or
every weight), checkpointing, and the virtual tokens of prompt-learning adapters."""
from __future__ import annotations

import json
import logging
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.version import Version

from .config import ConfigError, LoraConfig, ModelConfig, PeftConfig
from .precision import DTYPES, choose
from .quiet import ignore_v4_names

# the keyword a model's forward takes its key/value cache by: transformers 5.24 renamed past_key_values to cache
# and removes the old name in 5.40; setup.cfg allows releases on both sides of the rename
CACHE_KEYWORD = "cache" if Version(version("transformers")) >= Version("5.24") else "past_key_values"

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU builds log a 4-bit kernel warning at import


def refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """A model whose code ships in its directory (`auto_map` in config.json or tokenizer_config.json) stops here
    unless model.trust_remote_code is set: loading it would run that code."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        try:
            declared = json.loads(file.read_text(encoding="utf-8")).get("auto_map") if file.is_file() else None
        except (ValueError, AttributeError):
            continue  # not this check's business: the loader names a broken file itself
        if declared:
            raise ConfigError(f"{file}: the model's own code ships in its directory (auto_map: "
                              f"{', '.join(declared)}), and loading it would run that code; read it, then set "
                              f"model.trust_remote_code=true (train.py) if you trust it")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    refuse_remote_code(path, trust_remote_code)

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                  bnb_4bit_use_double_quant=cfg.double_quant,
                                  bnb_4bit_compute_dtype=dtype)
    return None


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", for_training: bool = True):
    """The frozen base model, ready for adapters: dtype (`auto` fitted to the device), quantization and
    checkpointing from the config."""
    from transformers import AutoModelForCausalLM

    refuse_remote_code(cfg.path, cfg.trust_remote_code)
    dtype = DTYPES[choose(cfg.dtype, torch.device(device).type).value]
    quantization = quantization_config(cfg, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation, quantization_config=quantization,
        # bitsandbytes quantizes while placing weights, so the device must be known at load time
        device_map={"": torch.device(device)} if quantization else None)
    if for_training:
        model.config.use_cache = False  # the KV cache is useless in teacher forcing and conflicts with checkpointing
        checkpointing = {"use_reentrant": cfg.checkpointing_reentrant}
        if quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=checkpointing)
        elif cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
            # frozen embeddings give inputs without grad; reentrant checkpointing then drops the LoRA grads
            model.enable_input_require_grads()
    return model


def with_saved_adapter(model, adapter: str | Path):
    """`model` with the adapter saved in `adapter` (PEFT's `from_pretrained`), quietly: PEFT's check of a v4 name
    warns at each load on transformers 5."""
    from peft import PeftModel

    with warnings.catch_warnings():
        ignore_v4_names()
        return PeftModel.from_pretrained(model, str(adapter))


def add_adapter(model, peft: PeftConfig, lora: LoraConfig):
    """The model made trainable as `peft.method` says: PEFT wraps it for every method but `full`, which trains the
    model's own (fp32) weights. Trained PEFT weights are fp32 whatever the base dtype: a GradScaler cannot unscale
    fp16 gradients, and bf16 parameters lose small updates."""
    if peft.method == "full":
        return model.requires_grad_(True)
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(lora) if peft.method == "lora" else _peft_config(peft, model.config))
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def skip_adapter_input_casts(model) -> int:
    """For a model whose every forward runs under autocast (train.precision bf16 or fp16): stops PEFT casting each
    adapter layer's input up to the adapter's fp32, since autocast casts it straight back down for the matmul, two
    activation copies a layer for nothing. An eval-mode forward is bitwise the same; in training, the adapter's
    dropout then scales its input in the input's own dtype. Measured with `make demo` (Gemma-3-270M, LoRA on all
    linear layers, bf16 on an Intel Xeon with AMX, 2026-12-04): its 22 training steps 191 -> 180 s; its evaluations
    52 s either way (a warm one, repeated on the same weights, 9.7 -> 9.3 s). Returns how many layers it changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def add_lora(model, cfg: LoraConfig):
    """`add_adapter` with LoRA."""
    return add_adapter(model, PeftConfig(method="lora"), cfg)


def lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")


def _peft_config(cfg: PeftConfig, model_config):
    from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    virtual = {"num_virtual_tokens": cfg.num_virtual_tokens, "task_type": "CAUSAL_LM"}
    if cfg.method == "prompt_tuning":  # started from embeddings of random vocabulary tokens: at the vocabulary's scale
        return PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB", **virtual)
    if cfg.method == "p_tuning":
        hidden = getattr(model_config, "text_config", model_config).hidden_size
        return PromptEncoderConfig(encoder_hidden_size=cfg.encoder_hidden_size or hidden, **virtual)
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(**virtual)
    return IA3Config(target_modules=list(cfg.ia3_target_modules),
                     feedforward_modules=list(cfg.ia3_feedforward_modules), task_type="CAUSAL_LM")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; PEFT counts 4-bit weights by elements, not packed bytes."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def is_prompt_learning(model) -> bool:
    """Whether `model` is a PeftModel whose adapter is prompt, P- or prefix tuning (virtual tokens, no weights)."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.is_prompt_learning


class VirtualTokens:
    """The trained tokens a prompt-learning adapter (prompt, P- or prefix tuning) puts before every sequence, fed
    as PEFT's own forward feeds them, for the code that runs the decoder directly (the target-only loss, the
    constrained decoder, option likelihoods). Prompt and P-tuning prepend embeddings; prefix tuning supplies keys
    and values to every layer. Either way the real tokens start at position `length`."""

    def __init__(self, model):
        from peft import PeftType

        self.model = model
        self.length = model.active_peft_config.num_virtual_tokens
        self.prefix = model.active_peft_config.peft_type == PeftType.PREFIX_TUNING

    @classmethod
    def of(cls, model) -> VirtualTokens | None:
        """For a PeftModel with a prompt-learning adapter; None for any other model."""
        return cls(model) if is_prompt_learning(model) else None

    @property
    def base(self):
        """The causal LM under the adapter: what runs once the virtual tokens are in place."""
        return self.model.get_base_model()

    def hidden_states(self, decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states at the real tokens, with the virtual tokens before them."""
        batch = input_ids.shape[0]
        mask = torch.cat([attention_mask.new_ones(batch, self.length), attention_mask], dim=1)
        if self.prefix:
            return decoder(input_ids=input_ids, attention_mask=mask,
                           **{CACHE_KEYWORD: self.model.get_prompt(batch)}).last_hidden_state
        embeds = decoder.get_input_embeddings()(input_ids)
        prompts = self.model.get_prompt(batch).to(embeds.dtype)
        return decoder(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                       attention_mask=mask).last_hidden_state[:, self.length:]

    @torch.no_grad()
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The virtual tokens as one sequence's keys and values per layer, (heads, length, dim): where a decoded
        sequence starts from."""
        from transformers import DynamicCache

        if self.prefix:
            cache = self.model.get_prompt(1)
        else:
            cache = DynamicCache()  # without the config: every layer keeps all its slots
            self.base(inputs_embeds=self.model.get_prompt(1).to(self.base.dtype), **{CACHE_KEYWORD: cache},
                      use_cache=True, logits_to_keep=1)
        dtype = self.base.dtype  # prefix tuning's are computed from fp32 parameters
        return [(layer.keys[0].to(dtype), layer.values[0].to(dtype)) for layer in cache.layers]
