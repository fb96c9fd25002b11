"""The chunked target-only loss: the same loss and gradients as all target rows at once and as the model's own full
logits, for any chunk size, with Gemma's softcapping, a trained lm_head, autocast, no_grad and no targets at all."""
import functools

import pytest
import torch
import torch.nn.functional as F

import poetry.loss
from poetry.config import ConfigError, LoraConfig, ModelConfig, load_config
from poetry.loss import TargetOnlyLoss, chunked_cross_entropy, full_logits_loss
from poetry.model import add_lora, load_model
from poetry.prompt import IGNORE_INDEX

TARGETS = 25  # in batch(): chunks of 5 divide it, 7 does not, 64 exceeds it
CHUNKS = [1, 5, 7, 64]


def lora_model(path):
    model = add_lora(load_model(ModelConfig(path=str(path), dtype="fp32")), LoraConfig(dropout=0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; random B makes the adapter matter
            param.data.normal_(0, 0.05)
    return model


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def models(tiny_dirs):
    gemma = lora_model(tiny_dirs["gemma3"])
    gemma.config.final_logit_softcapping = 1.0  # Gemma 3's 30 is ~identity on tiny logits; this cap bites
    return {"qwen3": lora_model(tiny_dirs["qwen3"]), "gemma3 softcapped": gemma}


def loss_and_grads(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean target loss and its gradients w.r.t. the trainable parameters and the decoder's output."""
    captured = {}

    def keep_hidden(_module, _inputs, out):
        out.last_hidden_state.retain_grad()
        captured["hidden"] = out.last_hidden_state

    hook = model.get_base_model().get_decoder().register_forward_hook(keep_hidden)
    model.zero_grad(set_to_none=True)
    try:
        loss_sum, count = loss_fn(**batch())
        (loss_sum / count).backward()
    finally:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss_sum.item(), {**grads, "hidden states": captured["hidden"].grad}


def assert_close(actual: dict, expected: dict) -> None:
    """Equal gradients, to fp32 rounding: BLAS sums a matmul of a few rows over the 152k ids in plain sequence, which
    measured 3e-5 of the largest gradient away from fp64 for chunks of 1-7 rows (8e-7 for all 25 rows at once)."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-4 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3 softcapped"])
def test_chunked_loss_and_gradients_equal_unchunked_and_full_logits(models, arch):
    model = models[arch]
    full, full_grads = loss_and_grads(model, functools.partial(full_logits_loss, model))
    whole, whole_grads = loss_and_grads(model, TargetOnlyLoss(model, chunk_rows=0))
    assert TargetOnlyLoss(model)(**batch())[1] == TARGETS
    assert whole == pytest.approx(full, rel=1e-5)
    assert_close(whole_grads, full_grads)
    for chunk_rows in CHUNKS:
        chunked, chunked_grads = loss_and_grads(model, TargetOnlyLoss(model, chunk_rows))
        assert chunked == pytest.approx(whole, rel=1e-5), chunk_rows
        assert_close(chunked_grads, whole_grads)


def test_softcapping_matters_in_the_chunked_loss(models):
    """The softcapped model's test above would pass trivially if the cap changed nothing."""
    loss = TargetOnlyLoss(models["gemma3 softcapped"], chunk_rows=7)
    capped = loss(**batch())[0].item()
    loss.softcap = None
    assert abs(loss(**batch())[0].item() - capped) > 1e-2 * capped


def test_a_trained_lm_head_gets_its_weight_gradient(tiny_dirs):
    model = lora_model(tiny_dirs["qwen3"])
    model.get_output_embeddings().weight.requires_grad_(True)  # full fine-tuning of the (tied) output layer
    whole, whole_grads = loss_and_grads(model, TargetOnlyLoss(model, chunk_rows=0))
    chunked, chunked_grads = loss_and_grads(model, TargetOnlyLoss(model, chunk_rows=7))
    assert any("lm_head" in name or "embed_tokens" in name for name in chunked_grads)
    assert chunked == pytest.approx(whole, rel=1e-5)
    assert_close(chunked_grads, whole_grads)


def reference_cross_entropy(hidden, weight, bias, targets, logit_scale, softcap):
    logits = F.linear(hidden, weight, bias).float() * logit_scale
    return F.cross_entropy(torch.tanh(logits / softcap) * softcap, targets, reduction="sum")


def test_gradients_reach_hidden_weight_and_bias_through_scale_and_softcap():
    torch.manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in [(TARGETS, 16), (300, 16), (300,)])
    targets = torch.randint(0, 300, (TARGETS,))
    grads = {}
    for chunk_rows in [0, *CHUNKS]:  # 0: the reference
        loss = (reference_cross_entropy(hidden, weight, bias, targets, 1.7, 2.0) if chunk_rows == 0 else
                chunked_cross_entropy(hidden, weight, bias, targets, chunk_rows, 1.7, 2.0))
        grads[chunk_rows] = (loss.detach(), *torch.autograd.grad(3 * loss, [hidden, weight, bias]))
    for chunk_rows in CHUNKS:
        for actual, expected in zip(grads[chunk_rows], grads[0], strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_autocast_multiplies_in_its_dtype_as_lm_head_does():
    torch.manual_seed(0)
    hidden, weight = torch.randn(TARGETS, 32), torch.randn(300, 32)
    targets = torch.randint(0, 300, (TARGETS,))
    fp32 = chunked_cross_entropy(hidden, weight, None, targets, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm_head = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        chunked = chunked_cross_entropy(hidden, weight, None, targets, 7)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(lm_head.item(), rel=1e-6)
    assert abs(chunked.item() - fp32.item()) > 1e-4 * fp32.item()  # bf16 rounding shows: autocast was obeyed


def test_no_gradient_work_under_no_grad(models, monkeypatch):
    model = models["qwen3"]
    wanted = []
    chunk_loss = poetry.loss._chunk_loss
    monkeypatch.setattr(poetry.loss, "_chunk_loss", lambda *args, wants_gradient: (
        wanted.append(wants_gradient) or chunk_loss(*args, wants_gradient=wants_gradient)))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        evaluated, _ = TargetOnlyLoss(model, chunk_rows=7)(**batch())
    assert wanted == [False] * 4 and evaluated.grad_fn is None  # 25 targets: 4 chunks, none computed a gradient
    trained, _ = TargetOnlyLoss(model, chunk_rows=7)(**batch())
    assert wanted[4:] == [True] * 4 and trained.item() == evaluated.item()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_no_target_rows_give_a_zero_loss(models, chunk_rows):
    model = models["qwen3"]
    data = batch()
    data["labels"].fill_(IGNORE_INDEX)
    model.zero_grad(set_to_none=True)
    loss_sum, count = TargetOnlyLoss(model, chunk_rows)(**data)
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and count == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_negative_chunk_rows_are_a_config_error():
    with pytest.raises(ConfigError, match="train.loss_chunk_rows"):
        load_config(None, ["train.loss_chunk_rows=-1"], device="cpu")
