"""Two CPU processes (gloo) against one: the same steps, each validation question scored once, one writer, and a
bounded, named exit when a rank dies or hangs."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from poetry.parallel import collective_failed, lost_peer_message

from conftest import ROOT, adapter, metrics, torchrun

STEPS = 4
# lr 2e-4, the default, not tiny.yaml's 3e-3: Adam divides each gradient by its own size, so where one cancels to
# about eps (1e-8) the rounding of another summation order moves its update by a fraction of lr (1.8e-5 at 3e-3 on
# one of 512 weights, measured)
COMMON = ["train.cpu=true", "train.precision=fp32", "lora.dropout=0", "train.lr=2e-4", f"train.max_steps={STEPS}",
          "train.grad_accum=2", "train.save_every=2", "train.keep_last=10", "data.val_fraction=0.25", "eval.every=2",
          "eval.at_start=true", "eval.max_questions=0", "eval.max_new_tokens=4", "eval.batch_size=2",
          "log.curves=true", "data.max_items=2",
          "data.emotion_examples=true"]  # 25 questions and emotion examples an epoch: one batch of 4 has a single row

# Runs train.train on every rank of a torchrun, and writes what rank R saw to <out>/rankR.json: the validation
# questions it was given (positions in the validation list) and scored, the loss rows it summed, the empty parts of
# batches it got, its console output, a digest of its adapter, and (ranks > 0) every file it created, changed,
# renamed or removed, from Python's audit hooks
RANK_SCRIPT = textwrap.dedent("""
    import hashlib, io, json, os, sys
    sys.path.insert(0, {root!r})
    from peft import get_peft_model_state_dict
    import train
    from poetry import feed, parallel, validation
    from poetry.config import load_config

    rank, out = int(os.environ["RANK"]), {out!r}
    seen = {{"questions": [], "scored": 0, "loss_rows": [], "writes": [], "empty_parts": 0}}
    score_answers, shard, collate = validation.score_answers, parallel.Parallel.shard, feed.Collator.__call__

    def scoring(golds, *args, **kwargs):
        seen["scored"] += len(golds)
        return score_answers(golds, *args, **kwargs)

    def sharding(self, items):
        mine = shard(self, items)
        if mine and isinstance(mine[0], list):  # the loss's batches of dataset rows
            seen["loss_rows"] += [row for batch in mine for row in batch]
        else:  # the questions to decode
            seen["questions"] += [next(i for i, item in enumerate(items) if item is question) for question in mine]
        return mine

    def audit(event, args):
        if event == "open" and args[1] is not None and any(flag in str(args[1]) for flag in "wax+"):
            seen["writes"].append(str(args[0]))
        elif event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            seen["writes"].append(str(args[0]))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
                       "os.truncate", "os.symlink", "os.link"):
            seen["writes"].append(f"{{event}} {{args[0]}}")

    def collating(self, columns):
        seen["empty_parts"] += not columns["input_ids"]
        return collate(self, columns)

    validation.score_answers, parallel.Parallel.shard, feed.Collator.__call__ = scoring, sharding, collating
    console = sys.stdout = io.StringIO()
    if rank:
        sys.addaudithook(audit)
    _, model = train.train(load_config({config!r}, sys.argv[1:]))
    sys.stdout = sys.__stdout__
    seen["stdout"] = console.getvalue()
    weights = get_peft_model_state_dict(model)
    seen["adapter"] = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    with open(f"{{out}}/rank{{rank}}.json", "w") as f:
        json.dump(seen, f)
""")


def train_args(tiny_model_dir, few_poems, run_dir: Path, micro_batch_size: int) -> list[str]:
    return [f"model.path={tiny_model_dir}", f"data.train={few_poems}", f"log.dir={run_dir}",
            f"train.micro_batch_size={micro_batch_size}", *COMMON]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, few_poems, tmp_path_factory):
    """The same 4 steps as 2 processes of micro-batch 2 and as 1 process of micro-batch 4."""
    root = tmp_path_factory.mktemp("distributed")
    script = root / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT), out=str(root), config=str(ROOT / "configs" / "tiny.yaml")))
    torchrun(str(script), *train_args(tiny_model_dir, few_poems, root / "two", 2))
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                          *train_args(tiny_model_dir, few_poems, root / "one", 4)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                         cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return root, ranks, one


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return adapter(run_dir / "checkpoints" / f"step-{STEPS:06d}")


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_two_processes_of_batch_b_train_what_one_process_of_batch_2b_trains(runs):
    root, ranks, _ = runs
    assert ranks[0]["adapter"] == ranks[1]["adapter"]  # the gradients were reduced: both ranks hold the same weights
    assert [rank["empty_parts"] for rank in ranks] == [0, 1]  # the batch of one row: rank 1 joined with no targets
    one, two = final_adapter(root / "one"), final_adapter(root / "two")
    assert one.keys() == two.keys() and any("lora_B" in k and one[k].abs().max() > 0 for k in one)
    for key in one:  # the same examples per step; the sums run in another order
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    one_lines, two_lines = metrics(root / "one"), metrics(root / "two")
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/acc", "val/bleu_words", "val/bleu_sents"):
        expected = [(m["step"], m[name]) for m in one_lines if name in m]
        got = [(m["step"], m[name]) for m in two_lines if name in m]
        assert expected and [s for s, _ in got] == [s for s, _ in expected], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-6), name


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_a_two_process_checkpoint_resumes_in_one_process_of_the_whole_batch(runs, tiny_model_dir, few_poems,
                                                                           tmp_path):
    """The sampler's position counts global batches, so step 2 of the 2-process run goes on in 1 process."""
    root, _, _ = runs
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                              *train_args(tiny_model_dir, few_poems, tmp_path, 4),
                              f"train.resume={root / 'two' / 'checkpoints' / 'step-000002'}"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "train.micro_batch_size: 2 -> 4" in resumed.stdout
    one, continued = final_adapter(root / "one"), final_adapter(tmp_path)
    for key in one:
        torch.testing.assert_close(continued[key], one[key], rtol=0, atol=1e-5)


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_a_two_process_resume_with_dropout_ends_where_the_straight_run_ends(tiny_model_dir, few_poems, tmp_path):
    """Each rank draws its own dropout masks. Only rank 0's generators used to be saved, and every rank restored
    them, so rank 1's masks after a resume were rank 0's stream and its adapter drifted from the straight run's."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def launch(run_dir: Path, *more: str) -> None:  # after COMMON, whose values these override
        torchrun(str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                 *train_args(tiny_model_dir, few_poems, run_dir, 2), "lora.dropout=0.1", "eval.every=0",
                 "eval.at_start=false", "data.val_fraction=0", *more)

    launch(straight)
    launch(resumed, f"train.resume={straight / 'checkpoints' / 'step-000002'}")
    expected, got = final_adapter(straight), final_adapter(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    saved = torch.load(straight / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_each_validation_question_is_scored_once_across_ranks(runs):
    _, ranks, one = runs
    evaluations = 1 + STEPS // 2  # at the start, at step 2, at step 4
    questions = [position for rank in ranks for position in rank["questions"]]
    rows = [row for rank in ranks for row in rank["loss_rows"]]
    assert all(rank["questions"] and rank["loss_rows"] for rank in ranks)  # both ranks did a share
    assert [rank["scored"] for rank in ranks] == [len(rank["questions"]) for rank in ranks]
    count = len(set(questions))
    assert count > 2 and sorted(questions) == sorted(list(range(count)) * evaluations)
    assert f"decoding {count} questions" in one.stdout  # all of them: the single process decodes as many
    assert sorted(rows) == sorted(list(range(len(set(rows)))) * evaluations)


@pytest.mark.slow  # two processes: over the CI budget (make test-slow)
def test_only_rank_0_writes(runs):
    root, ranks, _ = runs
    run_dir = root / "two"
    assert ranks[1]["stdout"] == ""
    # all it writes: its own report, and torch's compile cache directory (made on import, outside the run)
    assert [w for w in ranks[1]["writes"] if "torchinductor_" not in w] == [str(root / "rank1.json")]
    assert "processes: 2 (DDP)" in ranks[0]["stdout"]
    assert [m["step"] for m in metrics(run_dir) if "train/loss" in m] == list(range(1, STEPS + 1))
    assert (run_dir / "loss.png").exists() and (run_dir / "checkpoints" / f"step-{STEPS:06d}").is_dir()


# Rank `dying` of 2 stops at its `nth` training forward: SIGKILL (a crashed process: the kernel closes its sockets)
# or SIGSTOP (a frozen one: nothing on the wire), after writing the time; launched without torchrun, whose agent
# would stop every rank itself, as separate machines' ranks are
DYING_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import train
    from poetry.loss import TargetOnlyLoss

    forward, calls = TargetOnlyLoss.forward, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if os.environ["RANK"] == "{dying}" and len(calls) == {nth} and self.training:
            with open({stamp!r}, "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.{signal})
        return forward(self, *args, **kwargs)

    TargetOnlyLoss.forward = dying
    sys.exit(train.main(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_the_survivor_of_a_dead_or_frozen_rank_exits_in_bounded_time_with_one_line(how, tiny_model_dir, few_poems,
                                                                                  tmp_path):
    timeout_s = 10
    stamp = tmp_path / "stopped_at"
    script = tmp_path / "rank.py"
    script.write_text(DYING_SCRIPT.format(root=str(ROOT), dying=1, nth=3, stamp=str(stamp), signal=how))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    args = [sys.executable, str(script), "--config", str(ROOT / "configs" / "tiny.yaml"),
            *train_args(tiny_model_dir, few_poems, tmp_path / "run", 2), "eval.at_start=false",
            f"train.dist_timeout_s={timeout_s}", "train.max_steps=20"]
    ranks = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        survivor, victim = ranks
        out, err = survivor.communicate(timeout=300)
        exited = time.time()
        assert stamp.exists(), err[-3000:]
        waited = exited - float(stamp.read_text())
        lines = err.strip().splitlines()
        assert survivor.returncode == 1, err[-3000:]
        assert "Traceback" not in err and lines[-1].startswith("error: rank 0: a collective failed (")
        assert f"train.dist_timeout_s={timeout_s} s" in lines[-1] and "--resume auto" in lines[-1]
        if how == "SIGKILL":  # the kernel closes a dead process's sockets: noticed at the next collective
            assert waited < timeout_s, waited
        else:  # a frozen process answers nothing: the timeout ends the wait
            assert timeout_s <= waited < 3 * timeout_s, waited
        print(f"{how}: rank 0 exited {waited:.1f} s after rank 1 stopped: {lines[-1]}")
    finally:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.communicate()


def test_a_failed_collective_is_told_apart_from_other_errors():
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:31669: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application.")
    assert collective_failed(gloo) and collective_failed(torch.distributed.DistBackendError("NCCL timeout"))
    assert not collective_failed(RuntimeError("CUDA out of memory")) and not collective_failed(ValueError("x"))
    message = lost_peer_message(gloo, 30)
    assert message.startswith("rank ") and "(Read error [127.0.0.1]:31669: Connection reset by peer)" in message
    assert "train.dist_timeout_s=30 s" in message and "\n" not in message
