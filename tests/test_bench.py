"""The benchmarks keep running, and the methods they compare keep agreeing (tiny model, one round each)."""
import json
import re
import subprocess
import sys

from conftest import ROOT


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--repeats", "1", *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_loss_benchmark_compares_equal_losses(tiny_model_dir):
    out = run("loss.py", "--model", str(tiny_model_dir), "--batch-size", "2", "--dtype", "fp32")
    assert "full logits" in out and "target-only logits" in out
    full, target = re.search(r"loss: full ([\d.]+), target-only ([\d.]+)", out).groups()
    assert full == target


def test_decode_benchmark_gives_identical_answers_in_fp32(tiny_model_dir):
    out = run("decode.py", "--model", str(tiny_model_dir), "--count", "2", "--max-new-tokens", "2", "--dtype", "fp32")
    assert "naive (no cache)" in out and "identical answers: 2 of 2" in out


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
