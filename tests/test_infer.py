"""infer.py in-process: valid submissions from constrained and free decoding, merge equals base + adapter, chat, the
--dtype choice, and one `error:` line with exit code 2 for bad input, a missing model or an unknown subcommand."""
import importlib.util
import json
import re
import shutil

import pytest
import torch

from poetry.config import ModelConfig
from poetry.data import check_submission, load_answers, load_questions
from poetry.model import load_model
from poetry.precision import DTYPES, Choice, choose

from conftest import ROOT, SAMPLE

# Loaded by path: the repo root is not on sys.path
_spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
infer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(infer)

EVAL = SAMPLE / "eval.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.fixture
def few_questions(tmp_path):
    records = json.loads(EVAL.read_text(encoding="utf-8"))[:4]
    path = tmp_path / "few.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_predict_writes_a_valid_submission_in_order(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "submission.json"
    code, printed = run(capsys, "--model", tiny_model_dir, "--input", EVAL, "--output", out, "--max-new-tokens", 3)
    assert code == 0 and printed.err == ""
    questions = load_questions(EVAL).records
    answers = load_answers(out)  # strict: also rejects empty values
    check_submission(questions, answers, str(out))
    assert len(answers) == 14 and [a.idx for a in answers] == [q.idx for q in questions]
    assert "wrote 14 answers" in printed.out and "constrained decoding" in printed.out


def test_the_choice_its_weights_and_the_drafts_reach_the_decoder(tiny_model_dir, few_questions, tmp_path, capsys,
                                                                 monkeypatch):
    letter_pick, decode_constrained, asked = infer.letter_pick, infer.decode_constrained, []
    monkeypatch.setattr(infer, "letter_pick", lambda *args: asked.append(args[3:4] + args[-2:]) or letter_pick(*args))
    monkeypatch.setattr(infer, "decode_constrained",
                        lambda *args: asked.append(args[-1:]) or decode_constrained(*args))
    out = tmp_path / "submission.json"
    code, printed = run(capsys, "--model", tiny_model_dir, "--input", few_questions, "--output", out,
                        "--max-new-tokens", 2, "--choose", "likelihood_pmi_channel", "--choose-prior-weight", 0.5,
                        "--choose-channel-weight", 0.7, "--draft-tokens", 3)
    assert code == 0 and asked == [("likelihood_pmi_channel", 0.5, 0.7), (3,)]
    check_submission(load_questions(few_questions).records, load_answers(out), str(out))
    with pytest.raises(SystemExit):
        infer.main(["--model", str(tiny_model_dir), "--input", str(few_questions), "--output", str(out),
                    "--choose-prior-weight", "3"])
    assert "--choose-prior-weight: must be in [0, 2], got 3.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main(["--model", str(tiny_model_dir), "--input", str(few_questions), "--output", str(out),
                    "--choose-channel-weight", "-1"])
    assert "--choose-channel-weight: must be in [0, 2], got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main(["--model", str(tiny_model_dir), "--input", str(few_questions), "--output", str(out),
                    "--draft-tokens", "-1"])
    assert "--draft-tokens: must be 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantized_base_with_adapter_writes_a_valid_submission(tiny_model_dir, adapter_dir, few_questions, tmp_path,
                                                               capsys, flag):
    out = tmp_path / "quantized.json"
    code, printed = run(capsys, "--model", tiny_model_dir, "--adapter", adapter_dir, flag,
                        "--input", few_questions, "--output", out, "--max-new-tokens", 3)
    assert code == 0, printed.err
    assert f"adapter: kept apart from the base, the base is quantized ({flag[10:]})" in printed.out
    check_submission(load_questions(few_questions).records, load_answers(out), str(out))


def test_free_decoding_writes_a_valid_submission_and_counts_repairs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "free.json"
    code, printed = run(capsys, "predict", "--model", tiny_model_dir, "--input", EVAL, "--output", out,
                        "--decode", "free", "--max-new-tokens", 1, "--batch-size", 14)
    assert code == 0
    check_submission(load_questions(EVAL).records, load_answers(out), str(out))
    assert "14 of 14 answers needed repair" in printed.out  # a random model writes no JSON


def test_merged_model_answers_like_base_plus_adapter(tiny_model_dir, adapter_dir, few_questions, tmp_path, capsys):
    # fp32: on a CPU with native bf16, auto would round the merged weights to bf16, and a random tiny model's
    # near-tied logits then pick other tokens than base + adapter (on 2026-12-01's Intel avx512_bf16 machine).
    # Not likelihood_pmi_channel: a merged model has no base left for its channel term to read
    common = ("--input", few_questions, "--max-new-tokens", 4, "--batch-size", 2, "--dtype", "fp32", "--choose",
              "likelihood_pmi")
    assert run(capsys, "--model", tiny_model_dir, "--output", tmp_path / "base.json", *common)[0] == 0
    assert run(capsys, "--model", tiny_model_dir, "--adapter", adapter_dir, "--output", tmp_path / "lora.json",
               *common)[0] == 0
    code, printed = run(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapter_dir, "--out",
                        tmp_path / "merged", "--dtype", "fp32")
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert run(capsys, "--model", tmp_path / "merged", "--output", tmp_path / "merged.json", *common)[0] == 0
    lora, merged = (load_answers(tmp_path / name) for name in ("lora.json", "merged.json"))
    assert merged == lora and lora != load_answers(tmp_path / "base.json")


def test_an_adapter_is_merged_at_load_unless_no_merge_and_answers_alike(tiny_model_dir, adapter_dir, few_questions,
                                                                          tmp_path, capsys, monkeypatch):
    """predict picks the letters with the adapter apart (the channel score reads the base model), then merges and
    decodes."""
    from peft import PeftModel

    letter_pick, decode_constrained, models = infer.letter_pick, infer.decode_constrained, []
    monkeypatch.setattr(infer, "letter_pick", lambda model, *args: models.append(("pick", model)) or letter_pick(
        model, *args))
    monkeypatch.setattr(infer, "decode_constrained", lambda model, *args: models.append(("decode", model)) or
                        decode_constrained(model, *args))
    common = ("--model", tiny_model_dir, "--adapter", adapter_dir, "--input", few_questions, "--max-new-tokens", 4,
              "--dtype", "fp32")
    code, merged = run(capsys, *common, "--output", tmp_path / "merged.json")
    assert code == 0 and "adapter: merged into the base for inference" in merged.out
    code, apart = run(capsys, *common, "--output", tmp_path / "apart.json", "--no-merge")
    assert code == 0 and "merged into the base" not in apart.out
    assert [(step, isinstance(model, PeftModel)) for step, model in models] == \
        [("pick", True), ("decode", False), ("pick", True), ("decode", True)]
    assert models[1][1].get_input_embeddings().weight.dtype == torch.float32
    code, free = run(capsys, *common, "--output", tmp_path / "free.json", "--decode", "free")
    assert code == 0 and "adapter: merged into the base for inference" in free.out  # no letter to pick first
    assert load_answers(tmp_path / "merged.json") == load_answers(tmp_path / "apart.json")
    printed = [run(capsys, "perplexity", "--model", tiny_model_dir, "--adapter", adapter_dir, "--input", EVAL, "--gold",
                   SAMPLE / "eval_gold.json", "--dtype", "fp32", *flag)[1].out for flag in ((), ("--no-merge",))]
    assert "merged into the base" in printed[0] and "merged into the base" not in printed[1]
    merged_ppl, apart_ppl = (float(re.search(r"perplexity ([\d.]+)", out).group(1)) for out in printed)
    assert merged_ppl == pytest.approx(apart_ppl, rel=1e-4)


def test_chat_prints_a_reply(tiny_model_dir, capsys):
    code, printed = run(capsys, "chat", "--model", tiny_model_dir, "--prompt", "床前明月光的下一句是什么？",
                        "--max-new-tokens", 5)
    assert code == 0 and printed.out.strip()
    code, printed = run(capsys, "chat", "--model", tiny_model_dir, "--prompt", "你好", "--max-new-tokens", 3,
                        "--sample", "--temperature", 0.9, "--top-p", 0.8)
    assert code == 0 and printed.out.strip()


def bad_input_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"idx": 0,', encoding="utf-8")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"idx": 0, "title": "t", "content": "c", "qa_words": [], "qa_sents": ["s"],
                                  "choose": {"A": "a"}}]), encoding="utf-8")
    return {"missing": tmp_path / "missing.json", "broken": broken, "wrong": wrong}


@pytest.mark.parametrize("case", ["missing", "broken", "wrong"])
def test_bad_input_is_one_error_line(case, tiny_model_dir, tmp_path, capsys):
    code, printed = run(capsys, "--model", tiny_model_dir, "--input", bad_input_files(tmp_path)[case], "--output",
                        tmp_path / "out.json")
    assert code == 2 and printed.err.startswith("error: ") and printed.err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("flag, value", [("--model", "no/such/model"), ("--adapter", "no/such/adapter"),
                                         ("--model", "builtin:nope")])
def test_bad_model_or_adapter_is_one_error_line(flag, value, tiny_model_dir, tmp_path, capsys):
    argv = {"--model": str(tiny_model_dir), flag: value}
    code, printed = run(capsys, *[x for pair in argv.items() for x in pair], "--input", EVAL, "--output",
                        tmp_path / "out.json")
    assert code == 2 and printed.err.startswith("error: ") and printed.err.count("\n") == 1, printed.err


def test_adapter_may_be_a_run_directory(adapter_dir, tmp_path):
    from poetry.checkpoint import _mark_complete, resolve_adapter

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(adapter_dir, run / "checkpoints" / f"step-{step:06d}")
        _mark_complete(run / "checkpoints" / f"step-{step:06d}", step)  # as a finished save leaves it
    assert resolve_adapter(adapter_dir) == adapter_dir
    assert resolve_adapter(run) == run / "checkpoints" / "step-000004"  # no best recorded: the latest
    (run / "checkpoints" / "best.json").write_text(json.dumps({"path": "step-000002"}))
    assert resolve_adapter(run) == run / "checkpoints" / "step-000002"
    with pytest.raises(FileNotFoundError, match="neither an adapter directory nor a run directory"):
        resolve_adapter(tmp_path / "empty")


def test_dtype_choices_are_the_precision_modules_plus_auto():
    assert set(infer.DTYPE_CHOICES) == {"auto", *DTYPES}  # spelled out in infer.py so that --help needs no torch


def load_for_chat(tiny_model_dir, *flags):
    return infer._load(infer._parse(["chat", "--model", str(tiny_model_dir), "--prompt", "你好", *flags]))


def test_dtype_auto_is_resolved_for_the_device_and_announced(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(infer, "default_device", lambda: "cpu")
    expected = choose("auto", "cpu", "--dtype")
    model, _ = load_for_chat(tiny_model_dir)
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0] == f"dtype: {expected.value} ({expected.reason})" and printed.err == ""
    assert next(model.parameters()).dtype == DTYPES[expected.value]


def test_dtype_choice_reaches_the_model_and_its_warning_goes_to_stderr(tiny_model_dir, monkeypatch, capsys):
    asked = []

    def slow_choice(requested, device, what):
        asked.append((requested, device, what))
        return Choice("fp16", "as configured", "fp16 is slow here")

    monkeypatch.setattr(infer, "default_device", lambda: "cpu")
    monkeypatch.setattr(infer, "choose", slow_choice)
    model, _ = load_for_chat(tiny_model_dir, "--dtype", "fp16")
    printed = capsys.readouterr()
    assert asked == [("fp16", "cpu", "--dtype")]
    assert printed.out.splitlines()[0] == "dtype: fp16 (as configured)"
    assert printed.err == "warning: fp16 is slow here\n"
    assert next(model.parameters()).dtype == torch.float16


@pytest.mark.parametrize("command, extra", [
    ("predict", ["--input", EVAL, "--output", "out.json"]),
    ("merge", ["--adapter", "adapter", "--out", "merged"]),
    ("chat", ["--prompt", "你好"]),
])
def test_missing_model_directory_is_one_error_line_naming_the_flag(command, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    absent = tmp_path / "no-such-model"
    code, printed = run(capsys, command, "--model", absent, *extra)
    assert code == 2 and printed.out == ""
    assert printed.err == f"error: --model={absent}: no such directory (and HF_HUB_OFFLINE=1, so no hub download)\n"


@pytest.mark.parametrize("argv", [["perplex", "--help"], ["perplex"], ["predcit", "--model", "m"]])
def test_unknown_subcommand_is_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.main(argv)
    printed = capsys.readouterr()
    assert exit_.value.code == 2 and printed.out == ""
    assert printed.err == (f"error: unknown subcommand {argv[0]!r}; choose one of predict, merge, chat, perplexity, "
                           f"serve, write\n")


def test_options_first_still_mean_predict(capsys):
    args = infer._parse(["--model", "m", "--input", "in.json", "--output", "out.json"])
    assert args.command == "predict" and args.batch_size == 8 and args.dtype == "auto"
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--model", "m", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: infer.py predict")


def test_chat_without_a_prompt_converses_streams_and_resets(tiny_model_dir, monkeypatch, capsys):
    from poetry.decode import chat
    from poetry.model import load_tokenizer
    from poetry.prompt import PromptFormat

    first, second = "写一首七言绝句，题为《秋思》。", "再写一首五言的。"
    typed = iter([first, second, "/reset", first, "/bogus", "", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, printed = run(capsys, "chat", "--model", tiny_model_dir, "--max-new-tokens", 6, "--dtype", "fp32")
    assert code == 0 and next(typed) == "never read"

    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    fmt = PromptFormat(load_tokenizer(str(tiny_model_dir)))
    alone = chat(model, fmt, [{"role": "user", "content": first}], 6)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": alone.text},
               {"role": "user", "content": second}]
    followed = chat(model, fmt, history, 6)
    assert followed.text != chat(model, fmt, history[-1:], 6).text  # the history reached the model

    def shown(reply):
        return reply.text + ("\n(cut at --max-new-tokens)\n" if reply.finish_reason == "length" else "\n")

    expected = (shown(alone) + shown(followed) + "(conversation forgotten)\n" + shown(alone)
                + f"unknown command /bogus: {infer.CHAT_HELP}\n")
    assert printed.out.split(infer.CHAT_HELP + "\n", 1)[1] == expected


def test_chat_ends_at_end_of_input(tiny_model_dir, monkeypatch, capsys):
    def typed(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", typed)
    code, printed = run(capsys, "chat", "--model", tiny_model_dir, "--dtype", "fp32")
    assert code == 0 and printed.out.endswith(infer.CHAT_HELP + "\n\n")


def test_perplexity_refuses_gold_that_does_not_answer_the_questions(tiny_model_dir, tmp_path, capsys):
    gold = json.loads((SAMPLE / "eval_gold.json").read_text(encoding="utf-8"))
    short = tmp_path / "gold.json"
    short.write_text(json.dumps(gold[:-1], ensure_ascii=False), encoding="utf-8")
    code, printed = run(capsys, "perplexity", "--model", tiny_model_dir, "--input", EVAL, "--gold", short)
    assert code == 2 and printed.err == f"error: {short}: {len(gold) - 1} answers for {len(gold)} questions\n"
    code, printed = run(capsys, "perplexity", "--model", tiny_model_dir, "--input", EVAL,
                        "--gold", SAMPLE / "eval_gold.json", "--dtype", "fp32", "--batch-size", 4)
    assert code == 0 and re.search(r"perplexity [\d.]+: mean loss [\d.]+ per target token over \d+ target tokens of "
                                   r"14 gold answers", printed.out)


def test_serve_keeps_the_adapter_apart_when_its_choice_reads_the_base_model(tiny_model_dir, adapter_dir, capsys):
    from peft import PeftModel

    common = ["serve", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--dtype", "fp32"]
    model, _ = infer._load(infer._parse(common))  # the default choice, likelihood_pmi_channel
    assert isinstance(model, PeftModel)
    assert "kept apart from the base, likelihood_pmi_channel scores each poem with the base model" in \
        capsys.readouterr().out
    model, _ = infer._load(infer._parse([*common, "--choose", "likelihood_pmi"]))
    assert not isinstance(model, PeftModel) and "merged into the base" in capsys.readouterr().out
