"""The benchmarks keep running, and the methods they compare keep agreeing (tiny model, one round each)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE

sys.path.insert(0, str(ROOT))
from bench.choose import row_name  # noqa: E402


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--repeats", "1", *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_loss_benchmark_compares_equal_losses_and_saves_the_memory(tiny_model_dir, tmp_path):
    # the full logits' agreement is tests/test_loss.py's; each method here costs a process of its own
    out = run("loss.py", "--config", "configs/tiny.yaml", "--model", str(tiny_model_dir), "--batch-size", "1",
              "--methods", "target", "chunked", "--dtype", "fp32", "--results-dir", str(tmp_path))
    assert "target-only logits" in out and "target-only, chunks of 512 rows" in out and "peak RSS GB" in out
    target, chunked = map(float, re.search(r"loss: target ([\d.]+), chunked ([\d.]+)", out).groups())
    assert abs(chunked - target) <= 1e-5 * target
    [saved] = tmp_path.glob("loss-*.json")
    memory = json.loads(saved.read_text(encoding="utf-8"))["memory"]
    assert memory.keys() == {"target", "chunked"}
    assert 0 < memory["chunked"]["step_gb"] < memory["target"]["step_gb"] < memory["target"]["peak_rss_gb"]


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_decode_benchmark_times_the_adapter_unmerged_and_merged_side_by_side(tiny_model_dir, adapter_dir, tmp_path):
    out = run("decode.py", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--also-merged", "--count",
              "2", "--max-new-tokens", "3", "--dtype", "fp32", "--threads", "1", "--no-free", "--draft-tokens", "0,2",
              "--results-dir", str(tmp_path))
    assert "identical answers: 2 of 2" in out
    [saved] = tmp_path.glob("decode-*.json")
    saved = json.loads(saved.read_text(encoding="utf-8"))
    results = saved["results"]
    assert saved["args"]["also_merged"] and not saved["args"]["merge"]
    assert list(results) == ["constrained", "constrained, 2 draft tokens", "constrained, merged",
                             "constrained, 2 draft tokens, merged"]
    for name in ("constrained, merged", "constrained, 2 draft tokens, merged"):
        assert results[name]["agreement"]["identical"] == 2  # fp32: merging does not change these answers
        assert results[name]["cost"]["value_tokens"] == results["constrained"]["cost"]["value_tokens"]
        # the counters hooked the merged model's own output layer (a separate copy of the base)
        assert results[name]["cost"]["seconds"]["output layer"] > 0


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_decode_benchmark_gives_identical_answers_in_fp32_and_saves_the_numbers(tiny_model_dir, tmp_path):
    out = run("decode.py", "--model", str(tiny_model_dir), "--count", "2", "--max-new-tokens", "3", "--dtype", "fp32",
              "--threads", "1", "--naive", "--baseline", str(ROOT / "poetry" / "decode.py"), "--draft-tokens", "0,2",
              "--options-baseline", str(ROOT / "poetry" / "choice.py"), "--results-dir", str(tmp_path))
    assert "free: generate + parser" in out and out.count("identical answers: 2 of 2") == 3  # naive, baseline, drafts
    [saved] = tmp_path.glob("decode-*.json")
    results = json.loads(saved.read_text(encoding="utf-8"))["results"]
    assert results["constrained"]["quality"] == {"valid": 1.0, "non_empty": 1.0, "positional": 1.0, "letter": 1.0,
                                                 "clean": 1.0}
    assert {name: len(result["seconds"]) for name, result in results.items()} == dict.fromkeys(results, 1)
    options = results["option scoring (likelihood modes)"]
    assert "seconds" in options and "quality" not in options
    assert "seconds" in results["channel scoring (likelihood_pmi_channel)"]
    baseline = f"option scoring (likelihood modes), baseline {ROOT / 'poetry' / 'choice.py'}"
    assert results[baseline]["max_score_difference"] < 1e-4  # the same module: the same scores
    plain, drafted = results["constrained"]["cost"], results["constrained, 2 draft tokens"]["cost"]
    assert plain["value_tokens"] == drafted["value_tokens"] > 0 and plain["mean_accepted"] is None
    assert plain["verifications"] == 0 < drafted["verifications"] and 0 <= drafted["mean_accepted"] <= 2
    assert plain["row_forwards_per_value_token"] > 1  # the prompts' and forced runs' forwards count too
    assert plain["row_forwards"] >= plain["forwards"]
    for cost in (plain, drafted):
        split = cost["seconds"]
        assert 0 < split["output layer"] < split["prefill"] + split["forced runs"] + split["value tokens"]


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_precision_benchmark_times_fp32_against_bf16_and_saves_the_numbers(tiny_model_dir, tmp_path):
    from poetry.precision import choose

    # one short sequence: without native bf16 even the tiny model's bf16 steps take seconds
    out = run("precision.py", "--model", str(tiny_model_dir), "--batch-size", "1", "--results-dir", str(tmp_path))
    assert re.search(r"│ fp32 +│", out) and re.search(r"│ bf16 +│", out)
    auto = choose("auto", "cpu").value
    assert re.search(rf"{re.escape(str(tiny_model_dir))} +│ 1 x \d+ .*│ +[\d.]+x │.*│ +{auto} │", out), out
    fp32_loss, bf16_loss = map(float, re.search(r"loss: fp32 ([\d.]+), bf16 ([\d.]+)", out).groups())
    assert abs(bf16_loss - fp32_loss) <= 1e-2 * fp32_loss
    [saved] = tmp_path.glob("precision-*.json")
    result = json.loads(saved.read_text(encoding="utf-8"))
    assert result["machine"]["cpu"] and result["auto"]["value"] == auto
    assert {dtype: len(seconds) for dtype, seconds in result["results"][0]["seconds"].items()} == {"fp32": 1, "bf16": 1}


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_memory_benchmark_sets_the_estimate_against_a_measured_peak(tiny_model_dir, few_poems, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--configs", "configs/tiny.yaml",
                             "--variant", "checkpointed:model.gradient_checkpointing=true", "--results-dir",
                             str(tmp_path), f"model.path={tiny_model_dir}", f"data.train={few_poems}",
                             "train.precision=fp32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "estimate / peak" in result.stdout
    [saved] = tmp_path.glob("memory-*.json")
    runs = json.loads(saved.read_text(encoding="utf-8"))["runs"]
    assert runs.keys() == {"tiny", "tiny checkpointed"}
    for measured in runs.values():
        assert 0 < measured["process_gb"] < measured["rss_before_step_gb"] < measured["peak_rss_gb"]
        assert measured["estimate_rows"]["process before the weights"] == measured["process_gb"]
        assert measured["estimate_gb"] > measured["process_gb"]


CHOOSE_LABELS = ["letter", "letter_calibrated", "likelihood", "likelihood_norm", "likelihood_pmi λ=0",
                 "likelihood_pmi λ=0.5", "likelihood_pmi λ=1", "likelihood_pmi_channel λ=0 β=0.3",
                 "likelihood_pmi_channel λ=0.5 β=0.3", "likelihood_pmi_channel λ=1 β=0.3"]


def choose(*args: str) -> subprocess.CompletedProcess:
    """bench/choose.py on one torch thread: on a shared 2-core machine two threads ran its tiny decodes ~3x slower."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "choose.py"), "--max-new-tokens", "2", "--dtype",
                           "fp32", *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_row(row: dict, questions: int) -> None:
    """A row's counts add up: accuracy inside its interval, letters, halves and valence table over every question."""
    assert row["questions"] == questions and sum(row["letters"].values()) == questions
    assert row["ci95"][0] <= row["accuracy"] == row["right"] / questions <= row["ci95"][1]
    assert sum(half["questions"] for half in row["halves"].values()) == questions
    assert sum(half["right"] for half in row["halves"].values()) == row["right"]
    assert sum(n for picked in row["valence"].values() for n in picked.values()) == questions


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_choose_benchmark_scores_every_method_with_an_interval(tiny_model_dir, tmp_path):
    result = choose("--model", str(tiny_model_dir), "--questions", "data/sample/eval.json", "--gold",
                    "data/sample/eval_gold.json", "--label", "tiny", "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("choose-*.json")
    rows = json.loads(saved.read_text(encoding="utf-8"))["rows"]
    assert [row_name(row) for row in rows] == CHOOSE_LABELS
    for row in rows:
        assert_row(row, 14)


def test_choose_benchmark_scores_only_the_methods_asked(tiny_model_dir, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import choose as bench_choose

    monkeypatch.setattr("poetry.decode.decode_constrained", lambda *a, **k: pytest.fail("decoded for no letter method"))
    args = bench_choose.parse_args(["--model", str(tiny_model_dir), "--questions", "data/sample/eval.json", "--gold",
                                    "data/sample/eval_gold.json", "--methods", "likelihood_norm,likelihood_pmi",
                                    "--prior-weights", "0.5", "--dtype", "fp32", "--max-new-tokens", "2"])
    monkeypatch.setattr("poetry.choice.option_channel_logliks", lambda *a: pytest.fail("channel scores for no method"))
    rows = bench_choose.run_single(args)["rows"]
    assert [row_name(row) for row in rows] == ["likelihood_norm", "likelihood_pmi λ=0.5"]
    with pytest.raises(SystemExit):
        bench_choose.parse_args(["--questions", "q", "--gold", "g", "--methods", "likelihood,letters"])


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_choose_benchmark_cross_validates_over_folds(tiny_model_dir, few_poems, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import choose as bench_choose
    from poetry.data import load_poems

    def first(path, count: int, name: str) -> str:
        """The first `count` items of a JSON list, as a file of their own."""
        (tmp_path / name).write_text(json.dumps(json.loads(path.read_text(encoding="utf-8"))[:count],
                                                ensure_ascii=False), encoding="utf-8")
        return str(tmp_path / name)

    balanced = ROOT / "data" / "balanced"  # its first two questions: one cheerful, one sorrowful
    also = first(balanced / "eval.json", 2, "also.json"), first(balanced / "eval_gold.json", 2, "also_gold.json")
    data, runs = first(few_poems, 4, "poems.json"), tmp_path / "runs"
    common = ["--folds", "2", "--model", str(tiny_model_dir), "--data", data, "--runs-dir", str(runs),
              "--results-dir", str(tmp_path)]
    one_step = ["--train-overrides", "train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum=1",
                "eval.loss=false", "eval.decode=false", "log.curves=false", "model.gradient_checkpointing=false"]
    result = choose(*common, "--also-questions", also[0], "--also-gold", also[1], *one_step)
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("choose-*.json")
    results = json.loads(saved.read_text(encoding="utf-8"))
    poems = load_poems(data).records
    assert sum(results["held_out_poems"]) == len(poems)
    scored = results["scored"]
    assert sorted(poem["title"] for poem in scored) == sorted(p.title for p in poems if p.emotion)
    assert {poem["fold"] for poem in scored} == {0, 1} and results["poems"] == len(scored)
    assert all(poem["zero-shot"].keys() == poem["fine-tuned"].keys() == set(CHOOSE_LABELS) for poem in scored)
    assert [(row["model"], row_name(row)) for row in results["rows"]] == \
        [(model, label) for model in ("zero-shot", "fine-tuned") for label in CHOOSE_LABELS]
    for row in results["rows"]:
        assert_row(row, len(scored))
    assert [Path(adapter).parent.parent.name for adapter in results["adapters"]] == ["fold-0", "fold-1"]
    balanced_rows = results["also"]
    for row in [*balanced_rows["zero_shot"], *(row for rows in balanced_rows["fine_tuned_per_fold"] for row in rows)]:
        assert_row(row, 2)
        assert {half: part["questions"] for half, part in row["halves"].items()} == {"cheerful": 1, "sorrowful": 1}
    assert [row_name(row) for row in balanced_rows["fine_tuned_mean"]] == CHOOSE_LABELS
    # a fold trained already is not trained again; its run directory answers only to the arguments it was trained by
    monkeypatch.setattr(bench_choose.subprocess, "run", lambda *args, **kwargs: pytest.fail("trained again"))
    assert bench_choose.train_fold(bench_choose.parse_args([*common, *one_step]), 1) == Path(results["adapters"][1])
    monkeypatch.undo()
    again = choose(*common, "--train-overrides", "train.max_steps=2")
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith(f"error: {runs / 'fold-0'} was "
                                                                                     f"trained with other arguments")


def test_choose_benchmark_derives_the_likelihood_picks_as_letter_pick_does(tiny_model_dir, fmt, one_torch_thread):
    sys.path.insert(0, str(ROOT))
    from bench.choose import from_files, likelihood_letters
    from poetry import choice
    from poetry.config import ModelConfig
    from poetry.model import load_model

    questions, _ = from_files(str(SAMPLE / "eval.json"), str(SAMPLE / "eval_gold.json"))
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    logliks = choice.option_logliks(model, fmt, questions)
    priors = choice.option_priors(model, fmt, [text for q in questions for text in q.choose.values()])
    channel = choice.option_channel_logliks(model, fmt, questions)
    derived = {}
    for method, weight, beta in [("likelihood", None, None), ("likelihood_norm", None, None),
                                 ("likelihood_pmi", 0.0, None), ("likelihood_pmi", 0.5, None),
                                 ("likelihood_pmi", 1.0, None), ("likelihood_pmi_channel", 0.5, 0.3),
                                 ("likelihood_pmi_channel", 0.5, 2.0)]:
        pick = choice.letter_pick(model, fmt, questions, method, 2, prior_weight=1 if weight is None else weight,
                                  channel_weight=1 if beta is None else beta)
        derived[method, weight, beta] = likelihood_letters(questions, logliks, priors, method, weight, channel, beta)
        assert derived[method, weight, beta] == [pick(i, {}) for i in range(len(questions))], (method, weight, beta)
    assert len(set(map(tuple, derived.values()))) >= 4  # the methods pick apart, so each comparison tells


def test_choose_benchmark_scores_each_questions_channel_once_across_adapters(tiny_model_dir, adapter_dir,
                                                                           one_torch_thread, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import choose as bench_choose
    from poetry import choice

    files = str(SAMPLE / "eval.json"), str(SAMPLE / "eval_gold.json")
    args = bench_choose.parse_args(["--model", str(tiny_model_dir), "--questions", files[0], "--gold", files[1],
                                    "--methods", "likelihood_pmi_channel", "--channel-weights", "0.3,2",
                                    "--dtype", "fp32"])
    questions, _ = bench_choose.from_files(*files)
    unshared = bench_choose.Scorer(args).picks([questions], adapter_dir)
    scored, score = [], choice.option_channel_logliks

    def counted(model, fmt, asked, batch_size):
        scored.append([q.title for q in asked])
        return score(model, fmt, asked, batch_size)

    monkeypatch.setattr("poetry.choice.option_channel_logliks", counted)
    scorer = bench_choose.Scorer(args)
    scorer.picks([questions[:3], questions])  # zero-shot: the first three poems once, the rest once
    assert scored == [[q.title for q in questions[:3]], [q.title for q in questions[3:]]]
    assert scorer.picks([questions], adapter_dir) == unshared and len(scored) == 2  # the adapter's: none scored again


def hand_made(gold: list[str], picks: list[str]):
    """Questions whose options have a known valence each: A positive, B negative, C calm, D none."""
    sys.path.insert(0, str(ROOT))
    from bench.choose import Scored
    from poetry.data import Question

    options = {"A": "喜悦", "B": "悲伤", "C": "平静", "D": "山水"}
    questions = [Question(i, f"诗{i}", "诗句。", (), (), options) for i in range(len(gold))]
    return Scored(questions, gold, {"likelihood_norm": picks})


def test_valence_confusion_and_halves_of_hand_made_picks():
    from bench.choose import accuracy_row, pooled, rows_of

    first, second = hand_made(["A", "B", "C"], ["B", "B", "A"]), hand_made(["D", "A"], ["B", "A"])
    whole = pooled([first, second])
    assert whole.gold == ["A", "B", "C", "D", "A"] and whole.picks == {"likelihood_norm": ["B", "B", "A", "B", "A"]}
    row = accuracy_row("likelihood_norm", whole.questions, whole.gold, whole.picks["likelihood_norm"])
    assert row["valence"] == {"positive": {"positive": 1, "negative": 1}, "calm": {"positive": 1},
                              "negative": {"negative": 1}, "none": {"negative": 1}}
    assert {half: (part["right"], part["questions"]) for half, part in row["halves"].items()} == \
        {"cheerful": (1, 3), "sorrowful": (1, 1), "none": (0, 1)}
    assert (row["right"], row["questions"], row["letters"]) == (2, 5, {"A": 2, "B": 3})
    assert rows_of(whole) == [row] and row["method"] == "likelihood_norm" and row["prior_weight"] is None


def test_mean_over_folds_averages_each_half():
    from bench.choose import mean_over_folds, rows_of

    folds = [rows_of(hand_made(["A", "B"], picks)) for picks in (["A", "B"], ["A", "A"], ["C", "A"])]
    [mean] = mean_over_folds(folds)
    assert mean["accuracy"] == pytest.approx(0.5)
    assert mean["halves"] == {"cheerful": {"accuracy": pytest.approx(2 / 3)},
                              "sorrowful": {"accuracy": pytest.approx(1 / 3)}}


def test_wilson_interval():
    sys.path.insert(0, str(ROOT))
    from bench.common import wilson

    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 37)[0] == 0.0 and wilson(37, 37)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_choose_benchmark_builds_the_held_out_questions_of_a_config():
    sys.path.insert(0, str(ROOT))
    from bench.choose import held_out
    from poetry.config import load_config
    from poetry.data import load_poems, split_poems, validation_examples

    config = ROOT / "configs" / "tiny.yaml"
    [(questions, gold, poems)] = held_out(config, ROOT, [[]])
    cfg = load_config(config)
    _, val = split_poems(load_poems(ROOT / cfg.data.train).records, cfg.data.val_fraction, cfg.data.split_seed)
    assert poems == len(val)
    expected = [e for e in validation_examples(val, cfg.train.seed, cfg.data.max_items) if e.question.choose]
    assert [q.choose for q in questions] == [e.question.choose for e in expected] and len(questions) > 5
    assert [q.qa_words for q in questions] == [e.question.qa_words for e in expected]
    assert gold == [e.answer.choose_id for e in expected]


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_serve_benchmark_loads_the_real_server_and_counts_the_batches(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--model", str(tiny_model_dir),
                             "--phases", "1:2", "4:8", "--max-batch", "4", "--max-new-tokens", "2", "--dtype", "fp32",
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("serve-*.json")
    single, loaded = json.loads(saved.read_text(encoding="utf-8"))["phases"]
    assert (single["requests"], loaded["requests"]) == (2, 8)
    assert single["errors"] == loaded["errors"] == single["invalid_answers"] == loaded["invalid_answers"] == 0
    assert single["decodes_by_requests"] == {"1": 2}
    assert sum(int(size) * n for size, n in loaded["decodes_by_requests"].items()) == 8
    assert "infer.py serve under load" in result.stdout


@pytest.mark.slow
def test_methods_benchmark_trains_each_method_and_tabulates_them(tiny_model_dir, few_poems, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--config", "configs/tiny.yaml",
                             "--model", str(tiny_model_dir), "--data", str(few_poems), "--steps", "1",
                             "--max-questions", "1", "--methods", "lora", "prefix_tuning", "full",
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("methods-*.json")
    rows = {r["method"]: r for r in json.loads(saved.read_text(encoding="utf-8"))["results"]}
    assert rows.keys() == {"lora", "prefix_tuning", "full"} and not any("error" in r for r in rows.values())
    assert rows["full"]["trainable"] == rows["full"]["total"] > rows["lora"]["trainable"] > 0
    assert "model.gradient_checkpointing=false" in rows["prefix_tuning"]["overrides"]
    assert all(r["val_loss"] > 0 and r["train_s"] > 0 for r in rows.values())


@pytest.mark.slow  # a whole benchmark run: over the CI budget (make test-slow)
def test_writing_benchmark_checks_every_poem_of_each_setting_and_saves_them(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "writing.py"), "--model", str(tiny_model_dir),
                             "--count", "3", "--settings", "free,loose", "--dtype", "fp32", "--label", "tiny",
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "free decoding" in result.stdout and "constrained, tones loose" in result.stdout
    [saved] = tmp_path.glob("writing-tiny-*.json")
    report = json.loads(saved.read_text(encoding="utf-8"))
    assert report["count"] == 3 and 0 <= report["held_out"] <= 3 and report["results"].keys() == {"free", "loose"}
    for setting in report["results"].values():
        assert len(setting["poems"]) == 3 and all("violations" in poem and poem["text"] for poem in setting["poems"])
        low, high = setting["form_interval_95"]
        assert low <= setting["scores"]["form"] <= high
    loose = report["results"]["loose"]
    assert loose["scores"]["form"] == loose["scores"]["rhyme"] == loose["scores"]["regular"] == 1.0  # by construction
    assert all(poem["ok"] for poem in loose["poems"]) and loose["several"] is not None
    assert report["results"]["free"]["several"] is None  # free decoding draws from the whole vocabulary


def test_results_of_capped_kernels_say_so_and_keep_apart_from_the_native_ones(monkeypatch, tmp_path):
    from bench.common import KERNEL_CAP_VARIABLES, write_results
    for name in KERNEL_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    native = write_results("probe", {"rows": []}, tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    capped = write_results("probe", {"rows": []}, tmp_path)
    assert capped != native and capped.name.endswith(f"-capped-avx2-{capped.name[-15:-5]}.json")
    saved = json.loads(capped.read_text(encoding="utf-8"))["machine"]["kernel_caps"]
    assert saved == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert json.loads(native.read_text(encoding="utf-8"))["machine"]["kernel_caps"] == {}
