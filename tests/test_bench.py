"""The benchmarks keep running, and the methods they compare keep agreeing (tiny model, one round each)."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--repeats", "1", *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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


def test_decode_benchmark_gives_identical_answers_in_fp32_and_saves_the_numbers(tiny_model_dir, tmp_path):
    out = run("decode.py", "--model", str(tiny_model_dir), "--count", "2", "--max-new-tokens", "2", "--dtype", "fp32",
              "--threads", "1", "--naive", "--baseline", str(ROOT / "poetry" / "decode.py"),
              "--results-dir", str(tmp_path))
    assert "free: generate + parser" in out and out.count("identical answers: 2 of 2") == 2  # naive and baseline
    [saved] = tmp_path.glob("decode-*.json")
    results = json.loads(saved.read_text(encoding="utf-8"))["results"]
    assert results["constrained"]["quality"] == {"valid": 1.0, "non_empty": 1.0, "positional": 1.0, "letter": 1.0,
                                                 "clean": 1.0}
    assert {name: len(result["seconds"]) for name, result in results.items()} == dict.fromkeys(results, 1)


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


def test_choose_benchmark_scores_every_method_with_an_interval(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "choose.py"), "--model", str(tiny_model_dir),
                             "--questions", "data/sample/eval.json", "--gold", "data/sample/eval_gold.json",
                             "--max-new-tokens", "2", "--dtype", "fp32", "--label", "tiny", "--results-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("choose-*.json")
    rows = json.loads(saved.read_text(encoding="utf-8"))["rows"]
    assert [row["method"] for row in rows] == ["letter", "letter_calibrated", "likelihood", "likelihood_norm"]
    for row in rows:
        assert row["questions"] == 14 and sum(row["letters"].values()) == 14
        assert row["ci95"][0] <= row["accuracy"] == row["right"] / 14 <= row["ci95"][1]


def test_wilson_interval():
    sys.path.insert(0, str(ROOT))
    from bench.choose import wilson

    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 37)[0] == 0.0 and wilson(37, 37)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_choose_benchmark_builds_the_held_out_questions_of_a_config():
    sys.path.insert(0, str(ROOT))
    from bench.choose import held_out
    from poetry.config import load_config
    from poetry.data import load_poems, split_poems, validation_examples

    config = ROOT / "configs" / "tiny.yaml"
    questions, gold = held_out(config, ROOT)
    cfg = load_config(config)
    _, val = split_poems(load_poems(ROOT / cfg.data.train).records, cfg.data.val_fraction, cfg.data.split_seed)
    expected = [e for e in validation_examples(val, cfg.train.seed, cfg.data.max_items) if e.question.choose]
    assert [q.choose for q in questions] == [e.question.choose for e in expected] and len(questions) > 5
    assert [q.qa_words for q in questions] == [e.question.qa_words for e in expected]
    assert gold == [e.answer.choose_id for e in expected]


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
