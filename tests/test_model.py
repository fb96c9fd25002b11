"""Model machinery on tiny models: target-only loss, checkpointing, adapter dtype, optimizer groups, schedule."""
import math
import warnings
from pathlib import Path

import pytest
import torch

from poetry.builtin.tiny import ARCHITECTURES
from poetry.config import LoraConfig, ModelConfig, TrainConfig, load_config
from poetry.loss import TargetOnlyLoss, full_logits_loss
from poetry.memory import Shape, estimate
from poetry.model import add_lora, load_model, skip_adapter_input_casts, trainable_parameters, with_saved_adapter
from poetry.optim import build_optimizer, build_scheduler, lr_lambda, parameter_groups, repage_state
from poetry.prompt import IGNORE_INDEX


def lora_model(path, dropout=0.0, **model_kwargs):
    torch.manual_seed(1)  # LoRA's A starts random too: the same init in every model, whatever test ran before
    model = add_lora(load_model(ModelConfig(path=str(path), dtype="fp32", **model_kwargs)), LoraConfig(dropout=dropout))
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_only_loss_equals_full_logits_loss(tiny_dirs, arch):
    model = lora_model(tiny_dirs[arch])
    fast, n_fast = TargetOnlyLoss(model)(**batch())
    full, n_full = full_logits_loss(model, **batch())
    assert n_fast == n_full == 14 + 8 + 3 - 0  # positions 6.. with a next token inside the mask
    assert abs(fast.item() - full.item()) / full.item() < 1e-5


def test_gemma_softcapping_is_applied(tiny_dirs):
    model = lora_model(tiny_dirs["gemma3"])
    assert model.config.final_logit_softcapping == 30.0  # Gemma 3's real value: ~identity on tiny random logits
    model.config.final_logit_softcapping = 0.01  # so here a cap that bites
    loss = TargetOnlyLoss(model)
    with_cap, full = loss(**batch())[0], full_logits_loss(model, **batch())[0]
    assert abs(with_cap.item() - full.item()) / full.item() < 1e-5
    loss.softcap = None
    assert abs(loss(**batch())[0].item() - with_cap.item()) > 1e-3  # ignoring the quirk would be caught


class CopyCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the dtype conversions (aten._to_copy) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_skipping_the_adapters_input_casts_under_autocast_leaves_eval_logits_bitwise_equal(tiny_dirs, arch):
    """A bf16 base and fp32 LoRA, as train.py runs them under bf16 autocast: PEFT's cast of each LoRA layer's input
    up to fp32 is undone by autocast's cast down, so skipping it changes nothing but the copies."""
    model = add_lora(load_model(ModelConfig(path=str(tiny_dirs[arch]), dtype="bf16")), LoraConfig(dropout=0.1))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = batch()["input_ids"][:, :8]
    outputs = []
    for skip in (False, True):
        if skip:
            assert skip_adapter_input_casts(model) == len([m for m in model.modules() if hasattr(m, "lora_A")]) > 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CopyCount() as count:
            outputs.append((model.eval()(input_ids=ids).logits, count.copies))
    (cast, cast_copies), (skipped, skipped_copies) = outputs
    assert torch.equal(cast, skipped) and skipped_copies < cast_copies


def grads(model, **data):
    model.zero_grad()
    loss, n = TargetOnlyLoss(model)(**data)
    (loss / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs, reentrant):
    plain = grads(lora_model(tiny_dirs["qwen3"]), **batch())
    checkpointed_model = lora_model(tiny_dirs["qwen3"], gradient_checkpointing=True, checkpointing_reentrant=reentrant)
    checkpointed_model.train()
    assert checkpointed_model.base_model.model.is_activation_checkpointing
    checkpointed = grads(checkpointed_model, **batch())
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name
        assert plain[name].abs().sum() > 0


def test_adapters_stay_fp32_over_a_half_precision_base(tiny_dirs):
    model = add_lora(load_model(ModelConfig(path=str(tiny_dirs["qwen3"]), dtype="fp16")), LoraConfig())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    n_trainable, n_total = trainable_parameters(model)
    assert n_trainable == sum(p.numel() for p in trainable) < n_total


def test_a_4bit_base_counts_as_many_parameters_as_a_plain_one(tiny_dirs):
    """bitsandbytes packs two 4-bit weights into each byte of a Params4bit: counts are of weights, not of bytes."""
    plain, four_bit = (add_lora(load_model(ModelConfig(path=str(tiny_dirs["qwen3"]), dtype="bf16", quantization=q)),
                                LoraConfig()) for q in ("none", "4bit"))
    assert trainable_parameters(plain) == (sum(p.numel() for p in plain.parameters() if p.requires_grad),
                                           sum(p.numel() for p in plain.parameters()))
    assert trainable_parameters(four_bit) == trainable_parameters(plain)


def test_lora_targets_all_linear_layers_by_default(tiny_dirs):
    model = lora_model(tiny_dirs["qwen3"])
    wrapped = {name.split(".")[-2] for name, _ in model.named_parameters() if "lora_A" in name}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= {
        n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert "lm_head" not in str(wrapped)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert [p.ndim for p in no_decay["params"]] == [1, 1, 1] and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit", "adamw"])
def test_optimizers_step_on_cpu(name):
    model = torch.nn.Linear(128, 64)
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2))
    before = model.weight.detach().clone()
    model(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def paged_like_gpu(optimizer, monkeypatch) -> None:
    """Make `optimizer` allocate state as on a GPU, where bitsandbytes pages every buffer of 1e5+ elements: on the CPU
    it never pages, so the paged kind is marked as bitsandbytes marks it, `is_paged` on the tensor."""
    def get_state_buffer(p, dtype=torch.float32):
        buffer = torch.zeros_like(p, dtype=dtype)
        buffer.is_paged = p.numel() >= 1e5
        return buffer

    monkeypatch.setattr(optimizer, "get_state_buffer", get_state_buffer)


def paged_kinds(optimizer, key: str) -> list[bool]:
    return [getattr(state[key], "is_paged", False) for state in optimizer.state.values()]


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw"])
def test_a_paged_optimizer_stays_paged_after_a_resume(name, monkeypatch):
    """bitsandbytes' load_state_dict moves state1/state2 with .to(device): on a GPU, ordinary tensors, no longer
    paged (on the CPU .to is a no-op, so the test makes them ordinary as the GPU would)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Linear(256, 8))  # 131k weights: paged; 2k: not
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2))
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    for param, state in optimizer.state.items():  # as the GPU would have allocated them (a paged step needs CUDA)
        state["state1"].is_paged = state["state2"].is_paged = param.numel() >= 1e5
    kinds = {key: paged_kinds(optimizer, key) for key in ("state1", "state2")}
    assert kinds["state1"] == [True, False, False, False]  # the large weight's state only

    resumed = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2))
    paged_like_gpu(resumed, monkeypatch)
    resumed.load_state_dict(optimizer.state_dict())
    for state in resumed.state.values():  # on a GPU the loader's .to(device) returns new, ordinary tensors
        state["state1"], state["state2"] = state["state1"].clone(), state["state2"].clone()
    repage_state(resumed)
    assert {key: paged_kinds(resumed, key) for key in kinds} == kinds
    for before, after in zip(optimizer.state.values(), resumed.state.values(), strict=True):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before
                                                     if isinstance(before[k], torch.Tensor))


def test_repaging_leaves_other_optimizers_alone():
    model = torch.nn.Linear(512, 256)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw_8bit", lr=1e-2))
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    state1 = optimizer.state[model.weight]["state1"]
    repage_state(optimizer)
    assert optimizer.state[model.weight]["state1"] is state1


def test_schedule_warmup_then_decay_to_floor():
    values = [lr_lambda(s, warmup=4, total=20, kind="cosine", min_ratio=0.1) for s in range(25)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert math.isclose(values[20], 0.1) and math.isclose(values[24], 0.1)
    assert math.isclose(lr_lambda(12, 4, 20, "linear", 0.0), 0.5)
    assert lr_lambda(15, 4, 20, "constant", 0.1) == 1.0


def lr_per_step(make_scheduler, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps runs with (lr 1, so the schedule's factor)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, rates = make_scheduler(optimizer), []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_against_transformers(kind):
    """Why build_scheduler keeps its own lambda: transformers' schedules run the first optimizer step at lr 0
    (warmup step/W, ours (step+1)/W), its linear decay ends at 0 whatever min_lr_ratio, and its cosine rises again
    after the last step. Past warmup its cosine and constant are ours exactly."""
    import transformers

    total, warmup, floor = 20, 4, 0.1
    library = {"cosine": lambda opt: transformers.get_cosine_with_min_lr_schedule_with_warmup(
                   opt, warmup, total, min_lr_rate=floor),
               "linear": lambda opt: transformers.get_linear_schedule_with_warmup(opt, warmup, total),
               "constant": lambda opt: transformers.get_constant_schedule_with_warmup(opt, warmup)}[kind]
    cfg = TrainConfig(scheduler=kind, warmup_steps=warmup, min_lr_ratio=floor)
    ours = lr_per_step(lambda opt: build_scheduler(opt, cfg, total), total + 3)
    theirs = lr_per_step(library, total + 3)
    assert theirs[0] == 0.0 and ours[:warmup] == theirs[1:warmup + 1]  # one step ahead, none spent at lr 0
    decay = range(warmup, total + 1)
    if kind == "linear":
        assert all(math.isclose(ours[s], floor + (1 - floor) * theirs[s]) for s in decay)
        assert theirs[total] == 0.0 and math.isclose(ours[total], floor)
    else:
        assert all(math.isclose(ours[s], theirs[s], rel_tol=1e-12) for s in decay)
    assert ours[total:] == [ours[total]] * 3  # held at the floor if a run steps past its total
    if kind == "cosine":
        assert theirs[total + 2] > theirs[total]


def qwen25_7b_shape():
    return Shape(vocab=152064, hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, head_dim=128,
                 tied=False)


def test_memory_estimate_counts_qwen25_7b_parameters():
    shape = qwen25_7b_shape()
    total = shape.layers * shape.block_params + shape.embedding_params
    assert abs(total - 7.615e9) / 7.615e9 < 0.01  # Qwen2.5-7B has 7.61B parameters


def test_memory_estimate_rows_follow_the_config():
    cfg = load_config(None, [], device="cuda")  # auto: bf16, as on any card since Ampere
    bf16 = {what: gb for what, gb, _ in estimate(cfg, qwen25_7b_shape())}
    assert abs(bf16["base weights"] - 6.53e9 * 2 / 1024**3) < 0.2
    cfg4 = load_config(None, ["model.quantization=4bit"], device="cuda")
    four_bit = {what: gb for what, gb, _ in estimate(cfg4, qwen25_7b_shape())}
    assert 0.25 < four_bit["base weights"] / bf16["base weights"] < 0.30
    checkpointed = load_config(None, ["model.gradient_checkpointing=true"], device="cuda")
    assert {w: gb for w, gb, _ in estimate(checkpointed, qwen25_7b_shape())}["activations"] < bf16["activations"] / 5
    sharded = {what: gb for what, gb, _ in estimate(cfg, qwen25_7b_shape(), shards=4)}
    assert sharded["base weights (FSDP shard)"] == pytest.approx(bf16["base weights"] / 4)
    assert sharded["gathered layers (FSDP)"] == pytest.approx(bf16["base weights"] * 2 / 28)
    assert sharded["LoRA weights (fp32)"] == pytest.approx(bf16["LoRA weights (fp32)"] / 4)
    assert sharded["embeddings + lm_head"] == bf16["embeddings + lm_head"]  # the root unit is gathered whole


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_gives_lora_gradients(tiny_dirs, quantization):
    model = add_lora(load_model(ModelConfig(path=str(tiny_dirs["qwen3"]), dtype="bf16", quantization=quantization,
                                            gradient_checkpointing=True)), LoraConfig())
    quantized = type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert quantized == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]
    gradients = grads(model, **batch())
    assert gradients and all(g.abs().sum() > 0 for name, g in gradients.items() if "lora_B" in name)  # A waits on B=0


def test_memory_cli_on_a_config_json(tmp_path, capsys):
    from transformers import Qwen2Config

    from poetry.memory import main

    Qwen2Config(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                num_attention_heads=28, num_key_value_heads=4).save_pretrained(tmp_path)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-7b-lora.yaml"
    assert main(["--config", str(config_file), f"model.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "base weights" in out and "6.53B params" in out and "fits in 32 GiB" in out
    assert main(["--config", str(config_file), "model.path=/nonexistent/dir"]) == 2


def test_a_saved_adapter_loads_without_the_v4_name_warning(tiny_model_dir, adapter_dir):
    """PEFT's check of transformers' v4 `is_gradient_checkpointing` warned in every infer.py run with an adapter."""
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = with_saved_adapter(model, adapter_dir)
    assert [name for name, _ in loaded.named_parameters() if "lora_B" in name]
    assert not [w for w in caught if "removed in v6" in str(w.message)], [str(w.message) for w in caught]
