"""The benchmarks keep running, and the methods they compare keep agreeing (tiny model, one round each)."""
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
