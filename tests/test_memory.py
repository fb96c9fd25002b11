"""poetry.memory's per-token count of what autograd keeps, against what autograd's saved-tensor hooks see on each
model family, and the output layer's rows; the estimate against a measured peak is bench/memory.py's."""
import pytest
import torch

from poetry.builtin.tiny import ARCHITECTURES, tiny_config
from poetry.config import LoraConfig, load_config
from poetry.loss import TargetOnlyLoss
from poetry.memory import LINEAR_NAMES, Shape, estimate
from poetry.model import add_lora

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


def saved_bytes(config, targets: list[str], dropout: float) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps in one training forward of a padded batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                     LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=targets)).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(0, 4000, (SEQUENCES, LENGTH))
    mask = torch.ones_like(ids)
    mask[1, -7:], mask[2, -15:] = 0, 0  # padding: sdpa gets an explicit mask, as in training
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :LENGTH // 2] = -100
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        TargetOnlyLoss(model)(input_ids=ids, attention_mask=mask, labels=labels)
    return sum(kept.values())


def saved_per_token_and_layer(arch: str, targets: list[str], dropout: float) -> float:
    """Elements per token of one decoder layer: three layers' saved bytes less one's, so embeddings and the output
    layer cancel."""
    one, three = (saved_bytes(odd_shaped(arch, layers), targets, dropout) for layers in (1, 3))
    return (three - one) / 2 / (SEQUENCES * LENGTH) / 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_activations_are_what_autograd_keeps_with_adapters_on_every_linear(arch, dropout):
    counted = Shape.from_config(odd_shaped(arch, 1)).saved_per_token(list(LINEAR_NAMES), 8, dropout > 0, LENGTH)
    assert counted == pytest.approx(saved_per_token_and_layer(arch, ["all-linear"], dropout), rel=0.02)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj"]])
def test_activations_with_fewer_adapters_are_an_upper_bound(targets):
    counted = Shape.from_config(odd_shaped("qwen3", 1)).saved_per_token(targets, 8, True, LENGTH)
    assert 1.0 <= counted / saved_per_token_and_layer("qwen3", targets, 0.05) <= 1.25


def rows(overrides: list[str], shape: Shape, **kwargs) -> dict[str, float]:
    return {what: gb for what, gb, _ in estimate(load_config(None, overrides, device="cpu"), shape, "cpu", **kwargs)}


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
