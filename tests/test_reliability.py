"""Promises a long run on a shared machine relies on: a non-finite step never reaches the weights, a run that keeps
diverging stops with its last finite state saved, a save that dies between files leaves the previous checkpoint
(and best.json) intact, torn checkpoints are never resumed from, nothing unpickles code or runs a model's own code
unasked, evaluate.py reads only the files it is given, and infer.py answers odd but valid questions in full."""
import hashlib
import json
import pickle
import sys

import pytest
import torch

from poetry import checkpoint
from poetry.config import ConfigError, load_config
from poetry.data import check_submission, load_answers, load_questions

from conftest import ROOT, SAMPLE, adapter

sys.path.insert(0, str(ROOT))
from test_infer import infer  # noqa: E402
from test_train import config, metrics  # noqa: E402

import train as train_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerator")


def poison_gradients(monkeypatch, poisoned) -> None:
    """Make the gradients of the micro-steps `poisoned(call)` says NaN, through a hook on the first trained tensor."""
    calls = []
    original = train_script.add_adapter

    def add_adapter(model, peft, lora):
        model = original(model, peft, lora)
        param = next(p for p in model.parameters() if p.requires_grad)
        param.register_hook(lambda grad: grad * float("nan") if poisoned(len(calls)) else grad)
        param.register_hook(lambda grad: calls.append(1) or grad)
        return model

    monkeypatch.setattr(train_script, "add_adapter", add_adapter)


def test_a_nonfinite_step_in_fp32_is_skipped_counted_and_leaves_the_weights(tiny_model_dir, few_poems, tmp_path,
                                                                            monkeypatch, capsys):
    poison_gradients(monkeypatch, lambda call: call == 2)  # the third step's only micro-step
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=4", "train.grad_accum=1",
                 "train.micro_batch_size=1", "eval.every=0", "data.val_fraction=0", "train.save_every=1",
                 "train.keep_last=5")
    train_script.train(cfg)
    steps = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert [m["train/skipped_steps"] for m in steps] == [0, 0, 1, 1]
    assert "warning: step 3: gradient norm nan; the step is skipped and the weights are unchanged (1 in a row)" in \
        capsys.readouterr().out
    saved = {step: adapter(tmp_path / "checkpoints" / f"step-{step:06d}") for step in (2, 3, 4)}
    assert all(torch.equal(saved[2][k], saved[3][k]) for k in saved[2])  # step 3 changed nothing
    assert not all(torch.equal(saved[3][k], saved[4][k]) for k in saved[3])  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in saved[4].values())


def test_consecutive_nonfinite_steps_save_the_last_finite_state_and_stop(tiny_model_dir, few_poems, tmp_path,
                                                                         monkeypatch, capsys):
    poison_gradients(monkeypatch, lambda call: call >= 1)  # from the second step on
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=10", "train.grad_accum=1",
                 "train.micro_batch_size=1", "eval.every=0", "data.val_fraction=0", "train.save_every=1",
                 "train.keep_last=10", "train.max_nonfinite_steps=3")
    with pytest.raises(train_script.Diverged) as stopped:
        train_script.train(cfg)
    message = str(stopped.value)
    assert message.startswith("steps 2-4: 3 optimizer steps in a row had inf/NaN gradients "
                              "(train.max_nonfinite_steps=3); the weights of step 1, the last finite one, are saved")
    assert "the last offending batch: epoch 0, rows [" in message and "《" in message  # the poem is named
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(checkpoints)][-1] == "step-000004"
    first, last = adapter(checkpoints / "step-000001"), adapter(checkpoints / "step-000004")
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert [m["step"] for m in metrics(tmp_path) if "train/loss" in m] == [1, 2, 3, 4]


def test_a_diverged_run_is_one_error_line_and_exit_code_1(tiny_model_dir, few_poems, tmp_path, monkeypatch,
                                                          capsys):
    poison_gradients(monkeypatch, lambda call: True)
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={tiny_model_dir}",
            f"data.train={few_poems}", f"log.dir={tmp_path}", "train.max_steps=5", "train.max_nonfinite_steps=2",
            "eval.every=0", "eval.at_start=false", "data.val_fraction=0", "train.precision=fp32"]
    assert train_script.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: steps 1-2: 2 optimizer steps in a row") and err.count("\n") == 1


# ---- torn saves ------------------------------------------------------------------------------------------------

def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def trained_run(tiny_model_dir, few_poems, tmp_path):
    """A run of 2 steps with a checkpoint at each and best.json at step 2; its model and config, for more saves."""
    cfg = config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=2", "train.save_every=1", "eval.every=1",
                 "data.val_fraction=0.3", "train.keep_last=5")
    run_dir, model = train_script.train(cfg)
    return run_dir / "checkpoints", model, cfg


class Crash(Exception):
    pass


def file_boundaries(monkeypatch, model):
    """Each place a save writes a file, as (name, a function that makes that write crash)."""
    def crash(*args, **kwargs):
        raise Crash

    return [("adapter", lambda: monkeypatch.setattr(type(model), "save_pretrained", crash)),
            ("trainer state", lambda: monkeypatch.setattr(checkpoint.torch, "save", crash)),
            ("config", lambda: monkeypatch.setattr(checkpoint, "save_config", crash)),
            ("completion marker", lambda: monkeypatch.setattr(checkpoint, "_mark_complete", crash)),
            ("rename", lambda: monkeypatch.setattr(checkpoint.atomic_dir.__globals__["os"], "replace", crash))]


def test_a_save_that_crashes_at_any_file_leaves_the_previous_checkpoint_and_best(trained_run, monkeypatch):
    root, model, cfg = trained_run
    before = {p.name: digest(p) for p in checkpoint.checkpoint_dirs(root)}
    best = (root / "best.json").read_text()
    assert json.loads(best)["path"] == "step-000002" and set(before) == {"step-000001", "step-000002"}
    for name in ("adapter", "trainer state", "config", "completion marker", "rename"):
        with monkeypatch.context() as patch:
            dict(file_boundaries(patch, model))[name]()
            with pytest.raises(Crash):
                checkpoint.save_checkpoint(root, 3, model, cfg, {"step": 3})
        assert {p.name: digest(p) for p in checkpoint.checkpoint_dirs(root)} == before, name
        assert sorted(p.name for p in root.iterdir()) == ["best.json", "step-000001", "step-000002"], name
        assert checkpoint.resolve_resume("auto", root).name == "step-000002"
    with pytest.raises(checkpoint.CheckpointError, match="best.json keeps pointing at the previous best"):
        checkpoint.record_best(root, 3, "val/loss", 0.0)
    assert (root / "best.json").read_text() == best


def test_torn_checkpoints_are_skipped_by_resume_auto_and_named(tiny_model_dir, few_poems, tmp_path, capsys):
    common = ("train.max_steps=2", "train.save_every=1", "eval.every=0", "data.val_fraction=0", "train.keep_last=5")
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common))
    root = tmp_path / "checkpoints"
    (root / "step-000002" / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # a partial copy
    (root / "step-000003").mkdir()  # a directory under a final name with no marker
    (root / "step-000003" / "trainer_state.pt").write_bytes(b"")
    (root / ".step-000004.tmp").mkdir()  # what a save killed mid-way leaves
    (root / ".step-000004.tmp" / "adapter_model.safetensors").write_bytes(b"\0")
    assert [p.name for p in checkpoint.torn_dirs(root)] == ["step-000002", "step-000003"]
    assert checkpoint.resolve_resume("auto", root).name == "step-000001"
    with pytest.raises(FileNotFoundError, match="a torn checkpoint"):
        checkpoint.resolve_resume(str(root / "step-000003"), root)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, *common, "train.resume=auto"))
    printed = capsys.readouterr().out
    assert "--resume auto: skipped torn checkpoints (a save that did not finish: no valid complete.json): " \
           "step-000002, step-000003; resuming from step-000001" in printed
    assert "resumed from" in printed and "at optimizer step 1" in printed


def test_a_resume_refuses_a_pickled_payload(trained_run, capsys):
    root, _, _ = trained_run

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = root / "step-000002"
    torch.save({"optimizer": Payload()}, path / checkpoint.STATE_FILE)
    with pytest.raises(checkpoint.CheckpointError, match="never unpickled here"):
        checkpoint.load_state(path)
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError):  # what torch itself says without weights_only
        torch.load(path / checkpoint.STATE_FILE, weights_only=True)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    file = tmp_path / "evil.yaml"
    file.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(file, device="cpu")


def test_a_model_that_ships_its_own_code_stops_unless_trusted(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "remote")
    config_file = model / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {
        "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    code = infer.main(["--model", str(model), "--input", str(SAMPLE / "eval.json"), "--output",
                       str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and "the model's own code ships in its directory (auto_map: AutoModelForCausalLM)" in err
    assert train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model}",
                              f"log.dir={tmp_path / 'run'}", "train.max_steps=1"]) == 2
    assert "model.trust_remote_code=true (train.py) if you trust it" in capsys.readouterr().err


def test_evaluate_reads_only_the_files_it_is_given(tmp_path, monkeypatch, capsys):
    """Answers that look like paths are text to score, never files to open."""
    import builtins

    from test_evaluate import evaluate as evaluate_script

    secret = tmp_path / "secret.json"
    secret.write_text("[]")
    gold = json.loads((SAMPLE / "eval_gold.json").read_text(encoding="utf-8"))
    pred = [dict(item, ans_qa_words={word: str(secret) for word in item["ans_qa_words"]}) for item in gold]
    gold_file, pred_file = tmp_path / "gold.json", tmp_path / "pred.json"
    gold_file.write_text(json.dumps(gold, ensure_ascii=False), encoding="utf-8")
    pred_file.write_text(json.dumps(pred, ensure_ascii=False), encoding="utf-8")
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    assert evaluate_script.main(["--gold", str(gold_file), "--pred", str(pred_file)]) == 0
    assert str(secret) not in opened


ODD = [
    {"idx": 5, "title": "无题", "author": "", "content": "相见时难别亦难，东风无力百花残。",
     "qa_words": ["不在诗中的词", 'a "quoted" word', "back\\slash", "全角，标点！", "half-width,punct."],
     "qa_sents": ["这句不在诗里。"], "choose": {"A": "思念", "B": "喜悦", "C": "愤怒", "D": "闲适"}},
    {"idx": 2, "title": "长诗", "author": None, "content": "春江潮水连海平，" * 375,
     "qa_words": ["春江"], "qa_sents": ["春江潮水连海平，"], "choose": {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}},
    {"idx": 9, "title": "十二问", "author": "佚名", "content": "一二三四五六七八九十百千万。",
     "qa_words": [f"词{i}" for i in range(12)], "qa_sents": [f"句子{i}。" for i in range(12)],
     "choose": {"A": "A", "B": "B", "C": "C", "D": "D"}},
]


def test_infer_answers_odd_but_valid_questions_in_full(tiny_model_dir, tmp_path, capsys):
    """Words absent from the poem, quotes, backslashes, both widths of punctuation, a 3,000-character poem, 12
    words and sentences: one answer per item, in order, every string non-empty, choose_id a letter."""
    questions = tmp_path / "odd.json"
    questions.write_text(json.dumps(ODD, ensure_ascii=False), encoding="utf-8")
    assert len(ODD[1]["content"]) == 3000
    out = tmp_path / "submission.json"
    for decode in ("constrained", "free"):
        assert infer.main(["--model", str(tiny_model_dir), "--input", str(questions), "--output", str(out),
                           "--decode", decode, "--max-new-tokens", "3", "--batch-size", "3", "--dtype", "fp32"]) == 0
        answers = load_answers(out)  # strict: empty values are refused
        check_submission(load_questions(questions).records, answers, str(out))
        assert [a.idx for a in answers] == [5, 2, 9]
        assert all(text.strip() for a in answers for text in (*a.ans_qa_words.values(), *a.ans_qa_sents.values()))
        assert list(answers[0].ans_qa_words) == ODD[0]["qa_words"]


def stub_run(scaler_enabled: bool, max_grad_norm: float = 1.0):
    """What optimizer_step reads of a Run, around one trained weight."""
    from types import SimpleNamespace

    from poetry.parallel import Parallel
    from poetry.profiling import MemoryMonitor

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1e-3)
    return SimpleNamespace(
        weight=weight, optimizer=optimizer, trainable=[weight], state=train_script.TrainState(), printed=[],
        scaler=torch.amp.GradScaler("cpu", enabled=scaler_enabled), monitor=MemoryMonitor(torch.device("cpu")),
        parallel=SimpleNamespace(clip_grad_norm=Parallel.clip_grad_norm),
        cfg=SimpleNamespace(train=SimpleNamespace(max_grad_norm=max_grad_norm)),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        log=SimpleNamespace(print=lambda line: None))


def fp16_step(run, gradient: float) -> None:
    """One micro-step whose fp16 backward carries `gradient` x the loss scale: inf once that passes fp16's 65504."""
    loss = (run.weight.half() * gradient).float().sum()
    run.scaler.scale(loss).backward()
    train_script.optimizer_step(run)


def test_fp16_scale_calibration_does_not_count_toward_divergence():
    """GradScaler starts at 2^16 and halves once per overflow: a gradient of 2^8 overflows until the scale is 2^7,
    nine skipped steps, which the old count took for divergence at train.max_nonfinite_steps=8."""
    run = stub_run(scaler_enabled=True)
    streaks, scales = [], []
    for _ in range(12):
        scales.append(run.scaler.get_scale())
        fp16_step(run, 2.0**8)
        streaks.append(run.state.nonfinite_streak)
    assert scales[:10] == [2.0**k for k in range(16, 6, -1)] and run.state.skipped == 9
    assert streaks == [0] * 12 and run.state.scale_calibrated
    fp16_step(run, float("inf"))  # once calibrated, an overflow counts
    assert run.state.nonfinite_streak == 1


def test_fp16_gradients_that_no_scale_fixes_still_count_once_the_scale_reaches_1():
    run = stub_run(scaler_enabled=True)
    streaks = []
    for _ in range(24):
        fp16_step(run, float("nan"))
        streaks.append(run.state.nonfinite_streak)
    assert streaks == [0] * 16 + list(range(1, 9))  # 2^16 .. 2^1 calibrate; from scale 1 on, 8 in a row diverge
    assert not run.state.scale_calibrated


def test_a_bf16_or_fp32_checkpoint_resumes_under_fp16_with_a_fresh_scaler(tiny_model_dir, few_poems, tmp_path,
                                                                          capsys):
    """A disabled scaler saves {}; GradScaler.load_state_dict({}) raised 'The source state dict is empty'."""
    common = ("train.save_every=2", "eval.every=0", "data.val_fraction=0", "train.keep_last=5")
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=2", *common))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_script.train(config(tiny_model_dir, few_poems, tmp_path, "train.max_steps=3", *common,
                              "train.resume=auto", "train.precision=fp16", "model.dtype=fp32"))
    printed = capsys.readouterr().out
    assert "note: the checkpoint was saved without fp16's loss scaler (another train.precision); it starts fresh " \
           "at scale 65536" in printed
    assert [m["train/loss_scale"] for m in metrics(tmp_path) if "train/loss" in m][-1] in (65536.0, 32768.0)
