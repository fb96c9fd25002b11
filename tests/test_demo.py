"""`make demo` end to end on the real Gemma-3-270M, cut to a couple of steps (slow: minutes on 2 CPU cores)."""
import json
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_pipeline(tmp_path):
    run = tmp_path / "run"
    flags = "train.max_steps=2 eval.every=1 eval.max_questions=2 eval.max_new_tokens=4"
    result = subprocess.run(["make", "-s", "demo", f"RUN={run}", f"DEMO_FLAGS={flags}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("metrics.jsonl", "loss.png", "val.png", "zero_shot.json", "finetuned.json", "report.json",
                 "report.html", "heldout/questions.json", "heldout/gold.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert set(report) == {"zero-shot", "fine-tuned"}
    for scores in report.values():
        assert scores["total"] is not None and 0 <= scores["acc"] <= 1 and not scores["incomplete"]
    assert "zero-shot" in result.stdout and "fine-tuned" in result.stdout and f"run directory: {run}" in result.stdout
    assert f"run report, opens offline in any browser: {run / 'report.html'}" in result.stdout
