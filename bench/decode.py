"""Constrained decoding against free generation (greedy `generate` + the repairing parser) on the same questions,
side by side in one run: seconds per question and the share of answers that are valid JSON, non-empty, positional
(the asked keys in order: the scorer reads by position) and with a letter; optionally against the naive reference
and against another version of poetry/decode.py, their answers compared with the constrained ones. The raw numbers
are kept as JSON under bench/results/.

    python bench/decode.py [--model builtin:gemma-3-270m] [--adapter DIR [--merge | --also-merged]]
        [--questions Q.json] [--count 8] [--max-new-tokens 8] [--batch-size 8] [--draft-tokens 0,4] [--options]
        [--no-free] [--repeats 2] [--threads N] [--dtype auto|fp32|bf16] [--naive] [--baseline FILE]
        [--options-baseline FILE] [--results-dir bench/results] [--name decode]

The model is the base alone (zero-shot), or with --adapter a run's adapter, unmerged as the training loop's
evaluation runs it, or merged as infer.py loads it with --merge. --also-merged runs the constrained rows on both,
the merged model loaded beside the unmerged one, every answer compared with the unmerged plain decoder's (in fp32
merging rounds the weights once, which may flip a near-tie). --draft-tokens times constrained decoding once per
k (0: plain), speculative rows compared with the plain one; each is also run once more, untimed, with counters:
forwards per value token, the mean number of drafts accepted per verification, and the time split between the
prompts' prefill, the forwards of forced runs alone, those in which a row is due a value's token (with their drafts'
verification, and other rows' forced runs since the engine packs them together) and, inside all three, the output
layer. --options adds a row for the likelihood modes' option scoring (poetry.choice: the options of every
question and their priors, batched across questions) and one for likelihood_pmi_channel's channel term (the poem
after each option, by the base model); --options-baseline times another version of poetry/choice.py's
option scoring beside it, their scores compared.

--baseline times an older decoder interleaved with the current one: `git worktree add /tmp/old-decode HEAD` (or
`git show HEAD:poetry/decode.py > /tmp/old_decode.py`), then `--baseline /tmp/old-decode/poetry/decode.py`; the file
is imported as a module of this package, so it must fit the rest of the tree. On a machine other jobs are using,
pass --threads 1 (see bench/precision.py): decoding is many small forwards, which two threads waiting for a busy
core slow down most.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_dtype_option,
    autocast_dtype,
    console,
    inference_model,
    interleaved,
    side_by_side,
    write_results,
)
from poetry import choice, decode  # noqa: E402
from poetry.builtin import resolve_model_path  # noqa: E402
from poetry.data import load_questions  # noqa: E402
from poetry.model import load_tokenizer  # noqa: E402
from poetry.prompt import PromptFormat, render_target  # noqa: E402
from poetry.quiet import quiet_libraries  # noqa: E402

FREE, CONSTRAINED, NAIVE, OPTIONS = ("free: generate + parser", "constrained", "naive (no cache)",
                                    "option scoring (likelihood modes)")
CHANNEL = "channel scoring (likelihood_pmi_channel)"
MERGED = ", merged"  # a constrained row's name ends so when it ran on the merged model (--also-merged)
# what parse_free_answer repairs, by the property of the answer text it shows missing
LACKS = {"valid": {"invalid_json", "fence", "think"}, "non_empty": {"missing_value"},
         "positional": {"invalid_json", "fence", "think", "section_name", "keys"}, "letter": {"choose_id"}}


def load_baseline(path: Path, name: str) -> ModuleType:
    """Another version of a module of poetry/ (decode.py, choice.py), imported as a module of this package (its
    relative imports resolve to this tree)."""
    spec = importlib.util.spec_from_file_location(f"poetry._baseline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up there
    spec.loader.exec_module(module)
    return module


def scored_options(module: ModuleType, model, fmt, questions, batch_size: int) -> list[float]:
    """Every option's summed log-probability after its question, then every distinct option's after the cue alone
    (likelihood_pmi's prior), by `module` (poetry.choice or a baseline of it)."""
    logliks = module.option_logliks(model, fmt, questions, batch_size)
    priors = module.option_priors(model, fmt, [text for q in questions for text in q.choose.values()], batch_size)
    return [score for per in logliks for score in per.values()] + [priors[text] for text in sorted(priors)]


def channel_scores(model, fmt, questions, batch_size: int) -> list[float]:
    return [score for per in choice.option_channel_logliks(model, fmt, questions, batch_size) for score in per.values()]


def score_difference(scores: list[float], reference: list[float]) -> float:
    return max((abs(a - b) for a, b in zip(scores, reference, strict=True)), default=0.0)


def quality(questions, texts: list[str]) -> dict[str, float]:
    """Shares of answer texts that need no repair of each kind in LACKS, and of those that need none at all."""
    repairs = [set(decode.parse_free_answer(q, text)[1]) for q, text in zip(questions, texts, strict=True)]
    shares = {name: sum(not (r & kinds) for r in repairs) / len(repairs) for name, kinds in LACKS.items()}
    return shares | {"clean": sum(not r for r in repairs) / len(repairs)}


def agreement(decoded: list, reference: list) -> dict:
    """How many answers equal the constrained decoder's, and the largest difference of an option log-prob."""
    differences = [abs(a.option_logprobs[k] - b.option_logprobs[k]) for a, b in zip(decoded, reference, strict=True)
                   if a.option_logprobs and b.option_logprobs for k in a.option_logprobs]
    return {"identical": sum(a.answer == b.answer for a, b in zip(decoded, reference, strict=True)),
            "max_option_logprob_difference": max(differences, default=0.0)}


class Counters:
    """What one constrained decoding costs, counted by wrapping poetry.decode's forward, verification and value
    steps (each `_generate` chooses one token of a value, or its closing quote), and timing the output layer with
    hooks."""

    def __init__(self, model):
        self.model, self.forwards, self.row_forwards, self.value_tokens = model, 0, 0, 0
        self.verified = self.accepted = 0
        self.seconds = {"prefill": 0.0, "forced runs": 0.0, "value tokens": 0.0, "output layer": 0.0}

    def run(self, call):
        forward, verify, generate = decode._forward, decode._verify, decode._AnswerState._generate
        head = self.model.get_output_embeddings()
        started = []
        hooks = [head.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
                 head.register_forward_hook(lambda *_: self._add("output layer", started.pop()))]

        def counted_forward(head, rows, *args):
            kind = ("prefill" if all(len(row.ids) == row.virtual for row in rows) else
                    "value tokens" if any(len(row.feed) == 1 for row in rows) else "forced runs")
            self.forwards, self.row_forwards = self.forwards + bool(rows), self.row_forwards + len(rows)
            begun = time.perf_counter()
            forward(head, rows, *args)
            self._add(kind, begun)

        def counted_verify(state, logits, draft):
            accepted, due = verify(state, logits, draft)
            if draft:
                self.verified, self.accepted = self.verified + 1, self.accepted + accepted
            return accepted, due

        def counted_generate(state, logits):
            self.value_tokens += 1
            return generate(state, logits)

        decode._forward, decode._verify, decode._AnswerState._generate = counted_forward, counted_verify, \
            counted_generate
        try:
            return call()
        finally:
            decode._forward, decode._verify, decode._AnswerState._generate = forward, verify, generate
            for hook in hooks:
                hook.remove()

    def _add(self, kind: str, started: float) -> None:
        self.seconds[kind] += time.perf_counter() - started

    def summary(self) -> dict:
        return {"forwards": self.forwards, "row_forwards": self.row_forwards, "value_tokens": self.value_tokens,
                "row_forwards_per_value_token": self.row_forwards / max(self.value_tokens, 1),
                "verifications": self.verified,
                "mean_accepted": self.accepted / self.verified if self.verified else None,
                "seconds": self.seconds}


def load(args: argparse.Namespace, dtype: str):
    """(model directory, tokenizer, model): the base alone, or with --adapter (merged with --merge), its weights in
    `dtype`."""
    quiet_libraries()
    path = resolve_model_path(args.model)
    return path, load_tokenizer(path), inference_model(path, dtype, args.adapter, args.merge)


def draft_counts(text: str) -> list[int]:
    counts = [int(k) for k in text.split(",")]
    if 0 not in counts or any(k < 0 for k in counts):
        raise argparse.ArgumentTypeError(f"draft counts separated by commas, 0 (plain decoding) among them; got "
                                         f"{text!r}")
    return sorted(set(counts))


def adapter_form(args: argparse.Namespace) -> str:
    return " (merged)" if args.merge else " (unmerged, and merged in rows so named)" if args.also_merged else ""


def constrained_name(draft_tokens: int) -> str:
    return CONSTRAINED if not draft_tokens else f"{CONSTRAINED}, {draft_tokens} draft tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--adapter", help="a PEFT adapter directory (a run's checkpoint): the fine-tuned model")
    parser.add_argument("--merge", action="store_true", help="merge --adapter into the base, as infer.py does")
    parser.add_argument("--also-merged", action="store_true",
                        help="also the constrained rows on --adapter merged into a second copy of the base")
    parser.add_argument("--draft-tokens", type=draft_counts, default=[0],
                        help="constrained decoding with each number of draft tokens, 0 (plain) among them: 0,4")
    parser.add_argument("--options", action="store_true", help="also time the likelihood modes' option scoring")
    parser.add_argument("--no-free", action="store_true", help="leave free generation out (slow on real models)")
    parser.add_argument("--questions", default="data/sample/eval.json",
                        help="eval-format questions (also what `python -m poetry.data export-val` writes)")
    parser.add_argument("--count", type=int, default=8, help="questions decoded per call")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="per-value budget")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one untimed warm-up")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's own choice")
    parser.add_argument("--naive", action="store_true", help="also the naive reference (slow on real models)")
    parser.add_argument("--options-baseline", type=Path,
                        help="another poetry/choice.py whose option scoring to time against --options' (implies it)")
    parser.add_argument("--baseline", type=Path, help="another poetry/decode.py to time against")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="decode", help="the results file's name before the CPU and date")
    add_dtype_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = autocast_dtype(args.dtype)

    if (args.merge or args.also_merged) and not args.adapter:
        parser.error("--merge and --also-merged need --adapter")
    if args.merge and args.also_merged:
        parser.error("--also-merged runs the unmerged model beside the merged one: leave --merge out")
    args.options = args.options or bool(args.options_baseline)
    path, tokenizer, model = load(args, dtype.value)
    fmt = PromptFormat(tokenizer)
    questions = load_questions(args.questions).records[:args.count]
    outputs: dict[str, list] = {}

    def run(name: str, call):
        def timed():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
                outputs[name] = call()
        return timed

    methods = {} if args.no_free else {
        FREE: lambda: decode.decode_free(model, fmt, questions, args.batch_size, args.max_new_tokens).items}
    if args.baseline:
        old = load_baseline(args.baseline, "decode")
        methods[f"constrained, baseline {args.baseline}"] = lambda: old.decode_constrained(
            model, fmt, questions, args.batch_size, args.max_new_tokens)
    models = {"": model}
    if args.also_merged:  # a second copy of the base: merging in place would change the unmerged rows' model
        models[MERGED] = inference_model(path, dtype.value, args.adapter, merge=True)
    constrained = {constrained_name(k) + suffix: (decoder, functools.partial(
        decode.decode_constrained, decoder, fmt, questions, args.batch_size, args.max_new_tokens, draft_tokens=k))
        for suffix, decoder in models.items() for k in args.draft_tokens}
    methods |= {name: call for name, (_, call) in constrained.items()}
    if args.naive:
        methods[NAIVE] = lambda: decode.decode_naive(model, fmt, questions, args.max_new_tokens)
    if args.options:
        methods[OPTIONS] = functools.partial(scored_options, choice, model, fmt, questions, args.batch_size)
        methods[CHANNEL] = functools.partial(channel_scores, model, fmt, questions, args.batch_size)
    if args.options_baseline:
        old_choice = load_baseline(args.options_baseline, "choice")
        methods[f"{OPTIONS}, baseline {args.options_baseline}"] = functools.partial(
            scored_options, old_choice, model, fmt, questions, args.batch_size)
    times = interleaved({name: run(name, call) for name, call in methods.items()}, args.repeats)

    results = {}
    for name, seconds in times.items():
        results[name] = {"seconds": seconds, "seconds_per_question": statistics.median(seconds) / len(questions)}
        if name.startswith(OPTIONS) or name == CHANNEL:
            if name.startswith(f"{OPTIONS}, baseline"):
                results[name]["max_score_difference"] = score_difference(outputs[name], outputs[OPTIONS])
            continue
        texts = ([item.text for item in outputs[name]] if name == FREE
                 else [render_target(d.answer) for d in outputs[name]])
        results[name]["quality"] = quality(questions, texts)
        if name not in (FREE, CONSTRAINED):
            results[name]["agreement"] = agreement(outputs[name], outputs[CONSTRAINED])
    for name, (decoder, call) in constrained.items():  # once more, untimed: what the time went to
        counters = Counters(decoder)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
            counters.run(call)
        results[name]["cost"] = counters.summary()
    title = (f"decoding {len(questions)} questions of {args.questions}, {args.model}"
             f"{' + ' + args.adapter + adapter_form(args) if args.adapter else ''}: value budget "
             f"{args.max_new_tokens} tokens, batch {args.batch_size}, autocast {dtype.value}, "
             f"{torch.get_num_threads()} threads")
    side_by_side(title, times, note=f"speed-up over the first row; autocast {dtype.value}: {dtype.reason}")
    summary(results, len(questions))
    costs(results)
    path = write_results(args.name, {
        "args": {"model": args.model, "adapter": args.adapter, "merge": args.merge, "also_merged": args.also_merged,
                 "questions": args.questions,
                 "count": len(questions), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                 "draft_tokens": args.draft_tokens, "repeats": args.repeats, "dtype": dtype.value,
                 "threads": torch.get_num_threads(), "baseline": str(args.baseline) if args.baseline else None,
                 "options_baseline": str(args.options_baseline) if args.options_baseline else None},
        "results": results}, args.results_dir)
    print(f"raw results: {path}")


def summary(results: dict[str, dict], count: int) -> None:
    table = Table(title="answers", caption="shares of answers needing no such repair by parse_free_answer; "
                                           "agreement: answers identical to the constrained decoder's (fp32 expects "
                                           "all; bf16 rounds a batch differently from one sequence, which can flip "
                                           "near-ties), largest option log-prob difference")
    columns = ("method", "s / question", *LACKS, "clean", "agreement")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, result in results.items():
        if "quality" not in result:
            continue
        shares = [f"{result['quality'][kind]:.0%}" for kind in (*LACKS, "clean")]
        agreed = result.get("agreement")
        table.add_row(name, f"{result['seconds_per_question']:.2f}", *shares,
                      f"identical answers: {agreed['identical']} of {count}, "
                      f"{agreed['max_option_logprob_difference']:.1e}" if agreed else "")
    console.print(table)


def costs(results: dict[str, dict]) -> None:
    """The counted run of each constrained row: forwards per value token, drafts accepted, where the time went."""
    table = Table(title="constrained decoding, counted (one untimed run each)",
                  caption="a row forward is one row's part of a batched forward; per value token, every row "
                          "forward counts (prompts and forced runs too) against the value tokens chosen (closing "
                          "quotes included); accepted: drafts kept per verification; value tokens: forwards in which "
                          "a row is due a value's token (other rows' forced runs ride along), forced runs: forwards of "
                          "runs only; the output layer's time is inside the three before it")
    columns = ("method", "forwards", "value tokens", "row forwards / value token", "accepted / verification",
               "prefill s", "forced runs s", "value tokens s", "output layer s")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, result in results.items():
        if cost := result.get("cost"):
            accepted = cost["mean_accepted"]
            table.add_row(name, str(cost["forwards"]), str(cost["value_tokens"]),
                          f"{cost['row_forwards_per_value_token']:.2f}", "-" if accepted is None else f"{accepted:.2f}",
                          *[f"{seconds:.2f}" for seconds in cost["seconds"].values()])
    console.print(table)


if __name__ == "__main__":
    main()
