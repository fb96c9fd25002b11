"""bench/gpu.py is for a GPU no one here has; its CPU smoke run keeps every stage of it alive."""
import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402


def test_cpu_smoke_runs_every_stage_and_saves_them(tmp_path, capsys):
    assert gpu.main(["--cpu-smoke", "--results-dir", str(tmp_path)]) == 0
    [saved] = tmp_path.glob("gpu-smoke-*.json")
    [row] = json.loads(saved.read_text())["rows"]
    assert row["train_step"]["allocated_gb"] > 0 and row["eval_forward"]["allocated_gb"] > 0
    assert row["largest_micro_batch"] == 4  # nothing runs out of memory on CPU: the search stops at --max-batch
    assert 0 < row["estimate_over_peak"] < 10
    assert row["gradient_difference_after_eval"] < 1e-6  # unquantized fp32: the eval forward changes nothing


def test_without_a_gpu_it_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--cpu-smoke" in done.stderr and "Traceback" not in done.stderr
