"""Load on `infer.py serve`: latency, throughput and the batches the server forms, at several concurrencies in one
run. The server is the real CLI in a subprocess on 127.0.0.1; clients are asyncio httpx sessions posting
`/v1/answer` requests of the sample questions (cycled), each checked as the official scorer checks a submission.

    python bench/serve.py [--model builtin:gemma-3-270m] [--adapter DIR] [--questions data/sample/eval.json]
        [--phases 1:14 16:64] [--max-batch 8] [--max-new-tokens 32] [--dtype auto] [--name serve]

A phase `C:N` sends N one-question requests from C concurrent clients, each client posting its next request when
the last is answered. Per phase: errors, p50/p95/max latency, questions per second, and the decodes the server ran
with how many requests each (from /health, before and after). The JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, console, write_results  # noqa: E402
from poetry.data import Answer, DataError, check_submission, parse_questions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "infer.py"), "serve", "--model", args.model, "--port", str(port),
               "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-new-tokens", str(args.max_new_tokens),
               "--max-queue", str(args.max_queue)]
    if args.adapter:
        command += ["--adapter", args.adapter]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until_up(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


async def run_phase(url: str, questions: list[dict], clients: int, requests: int) -> dict:
    """`requests` one-question posts from `clients` sessions: latencies, statuses, and wrong answers."""
    bodies = [questions[i % len(questions)] for i in range(requests)]
    latencies, statuses, invalid = [], [], 0
    by_idx = {q.idx: q for q in parse_questions(questions, 'questions')}

    async def client(part: list[dict]) -> None:
        nonlocal invalid
        async with httpx.AsyncClient(base_url=url, timeout=600) as session:
            for body in part:
                started = time.perf_counter()
                response = await session.post("/v1/answer", json=body)
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    try:
                        (answer,) = response.json()
                        check_submission([by_idx[body["idx"]]], [Answer(**answer)], "response")
                    except (DataError, TypeError, ValueError):
                        invalid += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(bodies[i::clients]) for i in range(clients)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": requests, "errors": sum(s != 200 for s in statuses),
            "invalid_answers": invalid, "wall_s": round(wall, 2), "questions_per_s": round(requests / wall, 3),
            "latency_s": {"p50": round(statistics.median(ordered), 3),
                          "p95": round(ordered[max(0, int(round(0.95 * len(ordered))) - 1)], 3),
                          "max": round(ordered[-1], 3)}}


def batches_between(before: dict, after: dict) -> dict[str, int]:
    """Decodes run between two /health readings, by the number of requests they held."""
    old = before["stats"]["batch_requests"]
    return {size: n - old.get(size, 0) for size, n in after["stats"]["batch_requests"].items()
            if n - old.get(size, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--adapter")
    parser.add_argument("--questions", default=str(ROOT / "data" / "sample" / "eval.json"))
    parser.add_argument("--phases", nargs="+", default=["1:14", "16:64"], help="CLIENTS:REQUESTS per phase")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--name", default="serve")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))
    phases = [tuple(int(x) for x in phase.split(":")) for phase in args.phases]

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    with open(log_path, "w") as log:
        server = start_server(args, port, log)
        try:
            wait_until_up(url, server, log_path)
            httpx.post(f"{url}/v1/answer", json=questions[0], timeout=600)  # untimed: the first forwards warm up
            results = []
            for clients, requests in phases:
                before = httpx.get(f"{url}/health").json()
                phase = asyncio.run(run_phase(url, questions, clients, requests))
                phase["decodes_by_requests"] = batches_between(before, httpx.get(f"{url}/health").json())
                results.append(phase)
                console.print(f"phase {clients}:{requests} done in {phase['wall_s']} s")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(60)
    dtype = next((line.split()[1] for line in log_path.read_text().splitlines() if line.startswith("dtype:")), "?")
    table = Table(title=f"infer.py serve under load ({args.model}, dtype {dtype}, --max-batch {args.max_batch})")
    for column in ("clients", "requests", "errors", "p50 s", "p95 s", "max s", "questions/s", "vs 1 client",
                   "decodes by requests each"):
        table.add_column(column, justify="right")
    for phase in results:
        speedup = phase["questions_per_s"] / results[0]["questions_per_s"]
        sizes = ", ".join(f"{n}x{size}" for size, n in sorted(phase["decodes_by_requests"].items(),
                                                                key=lambda item: int(item[0])))
        table.add_row(str(phase["clients"]), str(phase["requests"]), str(phase["errors"] + phase["invalid_answers"]),
                      *(f"{phase['latency_s'][k]:.2f}" for k in ("p50", "p95", "max")),
                      f"{phase['questions_per_s']:.2f}", f"{speedup:.2f}x", sizes)
    console.print(table)
    path = write_results(args.name, {"model": args.model, "adapter": args.adapter, "dtype": dtype,
                                     "max_batch": args.max_batch, "max_new_tokens": args.max_new_tokens,
                                     "questions": args.questions, "phases": results}, Path(args.results_dir))
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
