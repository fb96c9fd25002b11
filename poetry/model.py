"""Loading a causal LM from a local directory, optional bitsandbytes quantization, PEFT LoRA, checkpointing."""
from __future__ import annotations

import logging

import torch

from .config import LoraConfig, ModelConfig
from .precision import DTYPES, choose

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU builds log a 4-bit kernel warning at import


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

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


def add_lora(model, cfg: LoraConfig):
    """Wrap in a PEFT LoRA model whose adapter weights are fp32 whatever the base dtype: a GradScaler cannot unscale
    fp16 gradients, and bf16 adapters lose small updates."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                                 use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a PeftModel; PEFT counts 4-bit weights by elements, not packed bytes."""
    return model.get_nb_trainable_parameters()
