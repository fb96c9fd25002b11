"""Every tuning method (peft.method) through the whole product: the target-only loss against the model's own loss,
constrained decoding and option likelihoods against PEFT's own forward (virtual tokens shift positions, prefix
tuning supplies keys and values), the memory estimate's parameter counts against PEFT's, bitwise resume and the
checkpoints of each method, infer.py on them, full tuning's memory refusal, and the config rules."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from poetry.choice import option_logliks
from poetry.config import ConfigError, LoraConfig, ModelConfig, PeftConfig, load_config
from poetry.data import Example, check_submission, load_answers, load_questions
from poetry.decode import decode_constrained, decode_naive
from poetry.feed import Collator
from poetry.loss import TargetOnlyLoss
from poetry.memory import METHOD_NAMES, Shape, trainable_count
from poetry.model import VirtualTokens, add_adapter, load_model, trainable_parameters
from poetry.prompt import PromptFormat

from conftest import ROOT, SAMPLE

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

METHODS = ["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "full"]
VIRTUAL = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerator")


def trained(path, method: str, for_training: bool = False, checkpointing: bool = False):
    """The tiny model with `method`'s trained part drawn at random, so that it changes what the model computes."""
    torch.manual_seed(0)
    model = add_adapter(load_model(ModelConfig(path=str(path), dtype="fp32", gradient_checkpointing=checkpointing),
                                   for_training=for_training),
                        PeftConfig(method=method, num_virtual_tokens=VIRTUAL), LoraConfig(r=4, alpha=8, dropout=0.0))
    if method != "full":
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_A" not in name:
                param.data.normal_(1.0 if method == "ia3" else 0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def questions():
    return load_questions(SAMPLE / "eval.json").records[:4]


@pytest.fixture(scope="module")
def batch(tokenizer, questions):
    fmt = PromptFormat(tokenizer)
    gold = load_answers(SAMPLE / "eval_gold.json")[:len(questions)]
    rows = [fmt.encode(Example(q, a)) for q, a in zip(questions, gold, strict=True)]
    return Collator(tokenizer.pad_token_id)({"input_ids": [r["input_ids"] for r in rows],
                                              "labels": [r["labels"] for r in rows]})


# with gradient checkpointing too, but not prefix tuning: PEFT refuses the pair (a config error, tested below)
CHECKPOINTED = [pytest.param(m, True, marks=[pytest.mark.slow] if m in ("p_tuning", "ia3", "full") else [])
                for m in METHODS if m != "prefix_tuning"]


@pytest.mark.parametrize("method, checkpointing", [(m, False) for m in METHODS] + CHECKPOINTED)
def test_target_only_loss_and_gradients_equal_the_models_own(tiny_model_dir, batch, method, checkpointing):
    """PEFT's forward prepends the virtual tokens (and their -100 labels) or passes the prefix itself: the
    reference for how TargetOnlyLoss feeds the decoder directly."""
    model = trained(tiny_model_dir, method, for_training=True, checkpointing=checkpointing)
    model.train()
    loss_sum, n_targets = TargetOnlyLoss(model, chunk_rows=64)(**batch)
    loss_sum.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss
    (reference * n_targets).backward()
    assert float(loss_sum.detach() / n_targets) == pytest.approx(float(reference.detach()), rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert float((ours[name] - param.grad).norm()) <= 1e-4 * float(param.grad.norm()) + 1e-8, name


@pytest.mark.parametrize("method", METHODS[1:])
def test_constrained_decoding_and_option_likelihoods_equal_pefts_own_forward(tiny_model_dir, tokenizer, questions,
                                                                           method, monkeypatch):
    """decode_naive runs the model's own forward on the whole sequence (PEFT adds the virtual tokens); the batched
    decoder starts each row from their keys and values, and so does the speculative one, which also rolls them back
    past rejected drafts. Option likelihoods likewise."""
    from test_decode import assert_same, oracle_drafts, record_states

    fmt = PromptFormat(tokenizer)
    model = trained(tiny_model_dir, method)
    states = record_states(monkeypatch)
    batched = decode_constrained(model, fmt, questions, batch_size=3, max_new_tokens=4)
    assert_same(batched, decode_naive(model, fmt, questions, max_new_tokens=4))
    accepted = oracle_drafts(monkeypatch, fmt, questions, states[:len(questions)])
    assert_same(decode_constrained(model, fmt, questions, batch_size=3, max_new_tokens=4, draft_tokens=2), batched)
    assert {n for n, _ in accepted} == {0, 1, 2}
    monkeypatch.undo()
    all_scores = option_logliks(model, fmt, questions, batch_size=2)  # rows of several lengths in one forward
    with torch.no_grad():
        for question, scores in zip(questions, all_scores, strict=True):
            prompt = fmt.emotion_prompt_ids(question)
            for letter, text in question.choose.items():
                option = fmt.text_ids(text)
                logprobs = model(input_ids=torch.tensor([prompt + option])).logits[0].float().log_softmax(-1)
                shift = logprobs.shape[0] - len(prompt) - len(option)  # the virtual tokens' rows come first
                expected = sum(float(logprobs[shift + len(prompt) - 1 + i, token]) for i, token in enumerate(option))
                assert scores[letter] == pytest.approx(expected, abs=1e-4)
    if method != "full":  # the trained part is in the answer: the base model alone scores otherwise
        plain = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
        base = decode_constrained(plain, fmt, questions[:1], max_new_tokens=4)[0].option_logprobs
        assert max(abs(base[k] - batched[0].option_logprobs[k]) for k in base) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_the_memory_estimate_counts_the_parameters_peft_trains(tiny_dirs, method):
    from transformers import AutoConfig

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"peft.method={method}", "lora.target_modules=[all-linear]",
                                                       f"peft.num_virtual_tokens={VIRTUAL}"], device="cpu")
    for arch, path in tiny_dirs.items():
        counted = trainable_count(cfg, Shape.from_config(AutoConfig.from_pretrained(path)))
        model = add_adapter(load_model(ModelConfig(path=str(path), dtype="fp32"), for_training=False), cfg.peft,
                            cfg.lora)
        actual = trainable_parameters(model)[0]
        assert counted == actual, arch  # full: biases and per-head norms included


def run_config(tiny_model_dir, few_poems, run_dir, method, *overrides):
    family = {"lora": "tiny", "ia3": "tiny-ia3", "full": "tiny-full"}.get(method, "tiny-prompt")
    return load_config(ROOT / "configs" / f"{family}.yaml", [
        f"model.path={tiny_model_dir}", f"data.train={few_poems}", f"log.dir={run_dir}", f"peft.method={method}",
        f"peft.num_virtual_tokens={VIRTUAL}", "train.precision=fp32", "data.max_items=1", "train.micro_batch_size=2",
        "log.curves=false", "eval.every=0", "eval.at_start=false", "data.val_fraction=0", "lora.dropout=0.1",
        *overrides])


@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.slow] if m in ("prompt_tuning", "prefix_tuning",
                                                                                     "ia3") else [])
                                    for m in METHODS[1:]])  # p_tuning and full in make test: the most distinct
def test_each_method_resumes_bitwise_and_saves_what_infer_loads(tiny_model_dir, few_poems, tmp_path, method, capsys):
    """4 steps straight vs 2, a fresh process state, then 2 more: identical trained weights. The checkpoint is an
    adapter (a whole model with its tokenizer for full), and infer.py answers with it."""
    common = ("train.max_steps=4", "train.save_every=2", "train.keep_last=3")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_script.train(run_config(tiny_model_dir, few_poems, straight, method, *common))
    saved = "model" if method == "full" else "adapter"
    assert f"{saved} in {straight / 'checkpoints' / 'step-000004'}" in capsys.readouterr().out
    (interrupted / "checkpoints").mkdir(parents=True)
    os.rename(straight / "checkpoints" / "step-000002", interrupted / "checkpoints" / "step-000002")
    torch.manual_seed(1234)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_script.train(run_config(tiny_model_dir, few_poems, interrupted, method, *common, "train.resume=auto"))
    final = straight / "checkpoints" / "step-000004"
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    files = [weights] + (["prompt_encoder.safetensors"] if method in ("prompt_tuning", "p_tuning", "prefix_tuning")
                         else [])
    for name in files:  # the prompt encoder is the whole trained module, P-tuning's MLP included
        a, b = load_file(final / name), load_file(interrupted / "checkpoints" / "step-000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if method == "full":
        assert {"config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
        assert not (final / "adapter_config.json").exists()
        model_args = ["--model", str(final)]
    else:
        peft_type = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING",
                     "ia3": "IA3"}[method]
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == peft_type
        model_args = ["--model", str(tiny_model_dir), "--adapter", str(final)]
    infer = _infer()
    out = tmp_path / "submission.json"
    assert infer.main([*model_args, "--input", str(SAMPLE / "eval.json"), "--output", str(out), "--dtype", "fp32",
                       "--max-new-tokens", "2", "--batch-size", "4"]) == 0
    check_submission(load_questions(SAMPLE / "eval.json").records, load_answers(out), str(out))


def _infer():
    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_tuning_refuses_a_model_beyond_the_devices_memory(tiny_model_dir, few_poems, tmp_path, monkeypatch,
                                                              capsys):
    from poetry import memory

    monkeypatch.setattr(memory, "device_memory_gb", lambda device: 0.01)
    cfg = run_config(tiny_model_dir, few_poems, tmp_path, "full", "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"peft\.method=full: the estimate above needs [\d.]+ GiB and this cpu has "
                                          r"0\.0 GiB, [\d.]+ GiB short; train an adapter instead"):
        train_script.train(cfg)
    assert "weights (fp32, trained)" in capsys.readouterr().out  # the estimate it refers to was printed


def test_a_whole_model_run_is_no_adapter_for_infer(tiny_model_dir, few_poems, tmp_path, capsys):
    train_script.train(run_config(tiny_model_dir, few_poems, tmp_path, "full", "train.max_steps=1"))
    infer = _infer()
    code = infer.main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--input",
                       str(SAMPLE / "eval.json"), "--output", str(tmp_path / "s.json")])
    assert code == 2 and "checkpoints are whole models (peft.method=full), not adapters; pass one as --model" in \
        capsys.readouterr().err


def test_a_prompt_learning_adapter_cannot_be_merged(tiny_model_dir, tmp_path, capsys):
    model = trained(tiny_model_dir, "prompt_tuning")
    model.save_pretrained(tmp_path / "adapter")
    code = _infer().main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--out",
                          str(tmp_path / "merged")])
    assert code == 2 and "prompt_tuning adapter has no weights to merge" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    code = _infer().main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens",
                          "1", "--input", str(SAMPLE / "eval.json"), "--output", str(tmp_path / "answers.json")])
    assert code == 0 and "kept apart from the base, its virtual tokens come before every prompt" in \
        capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=prefix_tuning", "model.gradient_checkpointing=true"], "PEFT refuses it with gradient checkpointing"),
    (["peft.method=full", "model.quantization=8bit", "model.dtype=bf16"], "quantized weights cannot be trained"),
    (["peft.method=full", "model.dtype=bf16"], "must be fp32"),
    (["peft.method=ia3", "lora.use_dora=true"], "LoRA switches, but peft.method=ia3"),
    (["peft.method=p_tuning", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens: must be at least 1"),
    (["peft.method=adapter"], "peft.method: 'adapter' is not valid; choose one of lora, prompt_tuning"),
])
def test_method_rules_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", overrides, device="cpu")


def test_full_tuning_keeps_fp32_master_weights_whatever_auto_would_pick():
    cfg = load_config(ROOT / "configs" / "tiny-full.yaml", ["train.precision=bf16"], device="cpu")
    assert cfg.model.dtype == "fp32" and cfg.train.precision == "bf16"


@pytest.mark.parametrize("config", ["tiny-prompt", "tiny-ia3", "tiny-full"])
def test_the_memory_cli_plans_each_shipped_method_config(config, capsys):
    from poetry.memory import main

    assert main(["--config", str(ROOT / "configs" / f"{config}.yaml")]) == 0
    printed = capsys.readouterr().out
    method = load_config(ROOT / "configs" / f"{config}.yaml", device="cpu").peft.method
    assert ("weights (fp32, trained)" if method == "full" else f"{METHOD_NAMES[method]} weights (fp32)") in printed


def test_virtual_tokens_are_none_for_methods_without_them(tiny_model_dir):
    for method in ("lora", "ia3", "full"):
        assert VirtualTokens.of(trained(tiny_model_dir, method)) is None
    virtual = VirtualTokens.of(trained(tiny_model_dir, "prefix_tuning"))
    assert virtual.length == VIRTUAL and virtual.prefix and len(virtual.kv()) == 2


@pytest.mark.parametrize("method", METHODS[:-1])
def test_the_channel_score_reads_the_base_model_and_leaves_the_adapter_on(tiny_model_dir, tokenizer, questions,
                                                                          method):
    """likelihood_pmi_channel's channel term is the base model's whatever the adapter (switched off, or the base
    under virtual tokens), and the adapter answers again right after."""
    from poetry.choice import option_channel_logliks

    fmt = PromptFormat(tokenizer)
    model = trained(tiny_model_dir, method)
    plain = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    before = option_logliks(model, fmt, questions[:2])
    channel = option_channel_logliks(model, fmt, questions[:2])
    for got, expected in zip(channel, option_channel_logliks(plain, fmt, questions[:2]), strict=True):
        assert got == pytest.approx(expected, abs=1e-4)
    assert option_logliks(model, fmt, questions[:2]) == before
    base = option_logliks(plain, fmt, questions[:2])
    assert max(abs(base[0][k] - before[0][k]) for k in base[0]) > 1e-3  # the adapter changes what it scores
