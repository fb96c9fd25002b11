"""The run report page at the official evaluation's size: how large it is and how fast headless Chromium opens it.

There is no official evaluation file with gold answers here, so the 14 sample questions (data/sample/eval.json and
eval_gold.json) are repeated to the official 327 items, in the official shapes, and two submissions are made by
varying the gold answers (a seeded share of characters replaced, answers cut, other options picked). evaluate.py
(the real CLI) writes the page with a 300-step metrics.jsonl, then Chromium opens it --repeats times (a fresh
navigation each: load event and the next painted frame) and sorts its rows once. The raw numbers are kept as JSON
under bench/results/.

    python bench/report.py [--items 327] [--repeats 5] [--out DIR] [--results-dir bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, console, write_results  # noqa: E402
from poetry.report.chromium import Chromium, find_chromium  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
OFFICIAL_ITEMS = 327
FILLER = "的了在是其这那之而"


def _vary(text: str, rng: random.Random, replaced: float) -> str:
    """`text` with a share of its characters replaced, sometimes cut short: an answer that partly matches gold."""
    chars = [rng.choice(FILLER) if rng.random() < replaced else char for char in text]
    if rng.random() < 0.3:
        chars = chars[: max(1, len(chars) // 2)]
    return "".join(chars)


def synthetic_run(directory: Path, items: int, seed: int = 0) -> dict[str, Path]:
    """questions.json, gold.json, two submissions and a metrics.jsonl of `items` items, in the official shapes."""
    rng = random.Random(seed)
    questions = json.loads((SAMPLE / "eval.json").read_text(encoding="utf-8"))
    gold = json.loads((SAMPLE / "eval_gold.json").read_text(encoding="utf-8"))
    picked = [i % len(questions) for i in range(items)]
    files = {"questions": [dict(questions[i], idx=n) for n, i in enumerate(picked)],
             "gold": [dict(gold[i], idx=n) for n, i in enumerate(picked)]}
    for name, replaced, right in (("zero_shot", 0.6, 0.3), ("finetuned", 0.3, 0.45)):
        files[name] = [{"idx": answer["idx"],
                        "ans_qa_words": {k: _vary(v, rng, replaced) for k, v in answer["ans_qa_words"].items()},
                        "ans_qa_sents": {k: _vary(v, rng, replaced) for k, v in answer["ans_qa_sents"].items()},
                        "choose_id": answer["choose_id"] if rng.random() < right else rng.choice("ABCD")}
                       for answer in files["gold"]]
    paths = {}
    for name, records in files.items():
        paths[name] = directory / f"{name}.json"
        paths[name].write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    steps = [{"step": step, "train/loss": 2.5 * math.exp(-step / 80) + 0.6 + 0.05 * rng.random(),
              "train/lr": 2e-4 * min(1.0, step / 10) * (1 - step / 330)} for step in range(1, 301)]
    evaluations = [{"step": step, "val/loss": 2.4 - step / 300, "val/acc": 0.3 + step / 1000,
                    "val/bleu_words": 0.02 + step / 3000, "val/bleu_sents": 0.03 + step / 4000,
                    "val/proxy_total": 0.17 + step / 1600} for step in range(0, 301, 30)]
    paths["metrics"] = directory / "metrics.jsonl"
    paths["metrics"].write_text("".join(json.dumps(r) + "\n" for r in sorted(steps + evaluations,
                                                                             key=lambda r: r["step"])))
    return paths


def write_page(paths: dict[str, Path], page: Path) -> float:
    """evaluate.py --html on the synthetic files; its seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--gold", str(paths["gold"]),
                    "--pred", str(paths["zero_shot"]), "--label", "zero-shot", "--pred", str(paths["finetuned"]),
                    "--label", "fine-tuned", "--questions", str(paths["questions"]), "--metrics", str(paths["metrics"]),
                    "--html", str(page)], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


SORT = """new Promise(done => {
  const sort = document.getElementById("sort"), started = performance.now();
  sort.value = "change asc";
  sort.dispatchEvent(new Event("change"));
  requestAnimationFrame(() => setTimeout(() => done(performance.now() - started)));
})"""


def measure(page: Path, repeats: int) -> dict:
    with Chromium(width=1400, height=1000) as browser:
        opens = [browser.open(page) for _ in range(repeats)]
        rows = browser.evaluate("document.querySelectorAll('article.q').length")
        load_event = browser.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        sort_ms = browser.evaluate(SORT)
        version = browser.call("Browser.getVersion")["product"]
    return {"chromium": version, "rows": rows, "open_s": opens, "open_median_s": statistics.median(opens),
            "open_max_s": max(opens), "last_load_event_ms": load_event, "sort_ms": sort_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=OFFICIAL_ITEMS, help="questions (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="page opens timed (default: %(default)s)")
    parser.add_argument("--out", help="keep the synthetic files and the page in this directory")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("error: no Chromium found: apt-get install -y chromium (Debian)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        directory = Path(args.out or scratch)
        directory.mkdir(parents=True, exist_ok=True)
        paths = synthetic_run(directory, args.items)
        page = directory / "report.html"
        render_s = write_page(paths, page)
        results = {"items": args.items, "submissions": 2, "page_bytes": page.stat().st_size,
                   "evaluate_html_s": render_s, **measure(page, args.repeats)}
    saved = write_results("report", results, Path(args.results_dir))
    console.print(f"{args.items} questions, 2 submissions: page {results['page_bytes'] / 1e6:.2f} MB "
                  f"(evaluate.py --html {render_s:.1f} s); Chromium opens it in {results['open_median_s']:.2f} s "
                  f"(median of {args.repeats}, max {results['open_max_s']:.2f} s), sorts it in "
                  f"{results['sort_ms']:.0f} ms; {results['chromium']}", highlight=False)
    console.print(f"results: {saved}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
