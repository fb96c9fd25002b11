"""poetry.memory's per-token count of what autograd keeps, against what autograd's saved-tensor hooks see on each
model family, the output layer's rows, and the weights of a quantized base against a loaded one; the estimate against
a measured peak is bench/memory.py's."""
import pytest
import torch

from poetry.builtin.tiny import ARCHITECTURES, tiny_config
from poetry.config import LoraConfig, ModelConfig, load_config
from poetry.loss import TargetOnlyLoss
from poetry.memory import LINEAR_NAMES, Shape, estimate
from poetry.model import add_lora, load_model

SEQUENCES, LENGTH = 3, 40


def odd_shaped(arch: str, layers: int):
    """A config whose widths all differ (hidden, heads x head_dim, kv width, intermediate), so that no term of the
    count can stand in for another."""
    config = tiny_config(arch, 4096, hidden=96, layers=layers, heads=4, kv_heads=2)
    config.intermediate_size = 320
    if arch in ("qwen3", "gemma3"):
        config.head_dim = 32  # queries 128 wide against a hidden size of 96
    if arch == "gemma3":
        config.query_pre_attn_scalar = 32
    config.use_cache = False
    return config


def lora_model(config, targets: list[str], dropout: float):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return add_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                    LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=targets))


def kbit_lora_model(config, directory, quantization: str = "4bit", double_quant: bool = True):
    """A random-init model saved in fp16 and loaded as train.py loads a quantized base (bitsandbytes, then PEFT's
    kbit preparation), with LoRA on every linear layer. fp16 rather than bf16, which is ~20x slower on CPUs
    without native bf16; the kbit preparation treats both alike."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(directory)
    model = load_model(ModelConfig(path=str(directory), dtype="fp16", quantization=quantization,
                                   double_quant=double_quant))
    return add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 4000, (SEQUENCES, LENGTH))
    mask = torch.ones_like(ids)
    mask[1, -7:], mask[2, -15:] = 0, 0  # padding: sdpa gets an explicit mask, as in training
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :LENGTH // 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def saved_bytes(model, autocast: torch.dtype | None = None) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps in one training forward of a padded batch."""
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=autocast is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        TargetOnlyLoss(model)(**padded_batch())
    return sum(kept.values())


def saved_per_token_and_layer(build, autocast: torch.dtype | None = None) -> float:
    """Bytes per token of one decoder layer of `build(layers)`: three layers' saved bytes less one's, so embeddings
    and the output layer cancel."""
    one, three = (saved_bytes(build(layers), autocast) for layers in (1, 3))
    return (three - one) / 2 / (SEQUENCES * LENGTH)


def fp32_elements_per_token_and_layer(arch: str, targets: list[str], dropout: float) -> float:
    return saved_per_token_and_layer(lambda layers: lora_model(odd_shaped(arch, layers), targets, dropout)) / 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_activations_are_what_autograd_keeps_with_adapters_on_every_linear(arch, dropout):
    counted = Shape.from_config(odd_shaped(arch, 1)).saved_per_token(list(LINEAR_NAMES), 8, dropout > 0, LENGTH)
    assert counted == pytest.approx(fp32_elements_per_token_and_layer(arch, ["all-linear"], dropout), rel=0.02)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj"]])
def test_activations_with_fewer_adapters_are_an_upper_bound(targets):
    counted = Shape.from_config(odd_shaped("qwen3", 1)).saved_per_token(targets, 8, True, LENGTH)
    assert 1.0 <= counted / fp32_elements_per_token_and_layer("qwen3", targets, 0.05) <= 1.25


def rows(overrides: list[str], shape: Shape, device: str = "cpu", **kwargs) -> dict[str, float]:
    return {what: gb for what, gb, _ in estimate(load_config(None, overrides, device=device), shape, device,
                                                 **kwargs)}


def test_output_layer_holds_one_chunk_of_logits():
    shape = Shape(vocab=262144, hidden=640, layers=18, intermediate=2048, heads=4, kv_heads=1, head_dim=256,
                  tied=True, qk_norm=True, sandwich_norms=True)
    common = ["train.precision=fp32", "model.dtype=fp32"]
    chunked = rows([*common, "train.loss_chunk_rows=512"], shape, batch=(4, 728), targets=1307)
    whole = rows([*common, "train.loss_chunk_rows=0"], shape, batch=(4, 728), targets=1307)
    logits_gb, rows_gb = 512 * 262144 * 4 / 1024**3, 2 * 1307 * 640 * 4 / 1024**3  # the rows and their gradient
    assert chunked["output layer"] == pytest.approx(rows_gb + logits_gb, rel=1e-6)
    assert whole["output layer"] == pytest.approx(rows_gb + 1307 * 262144 * 12 / 1024**3, rel=1e-6)
    capped = rows([*common, "train.loss_chunk_rows=512"], Shape(**{**shape.__dict__, "softcap": True}),
                  batch=(4, 728), targets=1307)
    assert capped["output layer"] == pytest.approx(rows_gb + 2 * logits_gb, rel=1e-6)  # tanh kept for backward


def test_the_process_constant_is_a_row_of_a_cpu_estimate():
    shape = Shape(vocab=1000, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16, tied=True)
    with_process = rows(["train.precision=fp32"], shape, process_gb=0.7)
    assert with_process["process before the weights"] == 0.7
    assert "process before the weights" not in rows(["train.precision=fp32"], shape)


def untied(config):
    config.tie_word_embeddings = False  # as Qwen2.5-7B and 14B: lm_head its own matrix
    return config


def frozen_bytes(*modules) -> int:
    """Bytes of the distinct frozen parameter storages of `modules`, with bitsandbytes' quantization statistics."""
    tensors = []
    for param in (p for module in modules for p in module.parameters() if not p.requires_grad):
        tensors += [param, getattr(param, "SCB", None)]  # 8-bit: an fp32 scale per output row
        state = getattr(param, "quant_state", None)  # 4-bit: absmax per block, code table, nested statistics
        if state is not None:
            tensors += [state.absmax, state.code, state.offset]
            tensors += [state.state2.absmax, state.state2.code] if state.nested else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


# what a 4-bit (or 8-bit) config is estimated as: a CUDA run, as train.py refuses in-loop evaluation on 4-bit CPU runs
KBIT_RUN = ["model.dtype=fp16", "train.precision=fp16"]


@pytest.mark.parametrize("quantization, double_quant", [("8bit", False), ("4bit", False), ("4bit", True)])
def test_weights_of_a_quantized_base_are_what_the_kbit_preparation_leaves(tmp_path, quantization, double_quant):
    config = untied(odd_shaped("qwen2", 2))
    causal_lm = kbit_lora_model(config, tmp_path, quantization, double_quant).get_base_model()
    counted = rows([*KBIT_RUN, f"model.quantization={quantization}", f"model.double_quant={double_quant}"],
                   Shape.from_config(config), "cuda")
    decoder, outer = causal_lm.model, (causal_lm.model.embed_tokens, causal_lm.lm_head)
    assert counted["base weights"] * 1024**3 == pytest.approx(frozen_bytes(decoder.layers, decoder.norm), rel=1e-6)
    assert counted["embeddings + lm_head"] * 1024**3 == pytest.approx(frozen_bytes(*outer), rel=1e-6)


def test_a_kbit_prepared_base_keeps_activations_within_an_fp32_count(tmp_path):
    """Its fp32 embeddings and norms carry the residual stream in fp32, and a 4-bit layer answers in its input's
    dtype: most of what autograd keeps is fp32 even under 16-bit autocast."""
    measured = saved_per_token_and_layer(
        lambda layers: kbit_lora_model(untied(odd_shaped("qwen2", layers)), tmp_path / str(layers)), torch.float16)
    counted = rows([*KBIT_RUN, "model.quantization=4bit", "model.gradient_checkpointing=false", "lora.dropout=0",
                    "lora.r=8"], Shape.from_config(odd_shaped("qwen2", 1)), "cuda", batch=(SEQUENCES, LENGTH))
    assert 1.0 <= counted["activations"] * 1024**3 / (SEQUENCES * LENGTH) / measured <= 1.2


def test_the_loss_casts_a_kbit_prepared_lm_head_for_its_matmul(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    config = untied(odd_shaped("qwen2", 1))
    # in training mode, as the loss runs: in eval mode, on a CPU with avx512_bf16, bitsandbytes repacks each 4-bit
    # weight for its CPU kernel on the first forward, which fails on these odd shapes
    model = kbit_lora_model(config, tmp_path).train()
    head = model.get_base_model().lm_head.weight

    class Casts(TorchDispatchMode):
        """The bytes of every copy of lm_head's shape made in a different dtype."""

        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.shape == head.shape and out.dtype != head.dtype:
                self.copies.append(out.nbytes)
            return out

    hidden = []
    model.get_base_model().model.norm.register_forward_hook(lambda module, args, out: hidden.append(out.dtype))
    batch = padded_batch()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    with Casts() as casts, torch.autocast("cpu", dtype=torch.float16):
        TargetOnlyLoss(model, chunk_rows=16)(**batch)
    assert len(casts.copies) == 1 and hidden == [torch.float32]
    counted = rows([*KBIT_RUN, "model.quantization=4bit", "train.loss_chunk_rows=16"], Shape.from_config(config),
                   "cuda", batch=(SEQUENCES, LENGTH), targets=targets)
    held = 2 * targets * config.hidden_size * 4 + casts.copies[0]  # the fp32 rows and their gradient, the copy
    logits = 16 * config.vocab_size * (4 + 2)  # a chunk's fp32 logits and the fp16 matmul's output
    assert counted["output layer"] * 1024**3 == pytest.approx(held + logits, rel=1e-6)
