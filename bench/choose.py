"""choose_id by letter against by likelihood (poetry.choice), side by side: each method's accuracy with a Wilson 95%
interval, per valence half, the letters it answers, and a valence confusion table. The raw numbers are kept as JSON
under bench/results/.

    python bench/choose.py --questions Q.json --gold G.json [--model builtin:gemma-3-270m] [--adapter DIR]
    python bench/choose.py --config RUN/config.yaml [--builder-root DIR] [--model ...] [--adapter DIR]
    python bench/choose.py --folds [K] [--data DIR] [--config configs/demo.yaml] [--runs-dir DIR]
        [--train-overrides KEY=VALUE ...] [--also-questions Q.json --also-gold G.json]
    common: [--label zero-shot] [--methods letter,likelihood_norm,...] [--prior-weights 0,0.5,1]
        [--max-new-tokens 16] [--batch-size 8] [--dtype auto|fp32|bf16] [--name NAME] [--results-dir bench/results]

With --config the questions are the run's held-out poems as the loop validates on them, each poem's first question,
options and answer included (export-val keeps only questions with words, sentences and options, which the official
format requires: on the official poems that is 25 of 38 held-out poems). --builder-root builds them with another
source tree's poetry.data (`git worktree add /tmp/old HEAD`), to compare two versions' distractors on one model.

--folds K (4 when no K is given) is K-fold cross-validation over the poems of --data: fold i trains --config on the
other folds (`train.py data.folds=K data.fold=i`, in --runs-dir/fold-i; a fold whose adapter is there already is not
trained again), then the base model answers every fold's held-out questions (zero-shot) and each fold's final adapter
its own (fine-tuned). The picks are pooled over the folds, so every poem with options is one trial. With
--also-questions/--also-gold (data/balanced), each fold's adapter answers that set too: its rows per fold and their
mean over folds, against the base model's.

Rows: every poetry.choice method, likelihood_pmi once per --prior-weights λ. A question's valence is its gold
option's by the project's lexicon (poetry.data.emotions.valence), and its half is cheerful (positive or calm) or
sorrowful (negative). The confusion table counts (gold valence, valence of the picked option): a model that answers
from the training prior shifts its picks toward the training set's frequent valence.

A poem asked in several questions (a long one is split) has the same options and answer in each: one trial, counted
once. One constrained decoding gives every question's letter log-probabilities, which the letter methods read as
their `poetry.choice.letter_pick` does; one scoring of the options (and of their priors) gives every likelihood
method and λ its letter as letter_pick would compute it (tests/test_bench.py checks the two agree).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, autocast_dtype, console, inference_model, wilson, write_results  # noqa: E402
from poetry.config import OFFICIAL_DATA_HELP, ChoiceMethod  # noqa: E402
from poetry.data.emotions import valence  # noqa: E402
from poetry.quiet import quiet_libraries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDS = 4
# what a fold's run directory holds once train.py has finished: the train.py arguments and the final adapter
FOLD_DONE_FILE = "choose-fold.json"
NO_VALENCE = "none"
HALF_OF_VALENCE = {"positive": "cheerful", "calm": "cheerful", "negative": "sorrowful"}
METHODS = typing.get_args(ChoiceMethod)
# from one scoring of the options (and of their priors and channel scores)
DERIVED_METHODS = ("likelihood", "likelihood_norm", "likelihood_pmi", "likelihood_pmi_channel")
# run in the builder's tree: the held-out questions of a config under each list of overrides (a JSON list of
# lists), as JSON: the held-out poems' count, and their questions that have options
HELD_OUT = """
import json, sys
from poetry.config import load_config
from poetry.data import load_poems, split_poems, validation_examples

def held_out(overrides):
    cfg = load_config(sys.argv[1], overrides)
    data = cfg.data
    folds = (data.folds, data.fold) if getattr(data, "folds", 0) else ()  # a builder from before folds has none
    _, val = split_poems(load_poems(data.train, on_invalid=data.on_invalid).records, data.val_fraction,
                         data.split_seed, *folds)
    return {"poems": len(val), "items": [
        {"title": e.question.title, "author": e.question.author, "content": e.question.content,
         "qa_words": e.question.qa_words, "qa_sents": e.question.qa_sents, "choose": e.question.choose,
         "choose_id": e.answer.choose_id}
        for e in validation_examples(val, cfg.train.seed, data.max_items) if e.question.choose]}

print(json.dumps([held_out(overrides) for overrides in json.loads(sys.argv[2])], ensure_ascii=False))
"""


@dataclass
class Scored:
    """Questions (one per poem), their gold letters, and the letters each method (a row label) picked."""

    questions: list
    gold: list[str]
    picks: dict[str, list[str]]


def pooled(parts: list[Scored]) -> Scored:
    """The folds' questions and picks as one set: every held-out poem once."""
    return Scored([q for part in parts for q in part.questions], [g for part in parts for g in part.gold],
                  {label: [letter for part in parts for letter in part.picks[label]] for label in parts[0].picks})


def valence_of(question, letter: str) -> str:
    return valence(question.choose[letter]) or NO_VALENCE


def valence_confusion(questions: list, gold: list[str], letters: list[str]) -> dict[str, dict[str, int]]:
    """{gold option's valence: {picked option's valence: questions}}, in the order positive, calm, negative, none."""
    pairs = Counter((valence_of(question, truth), valence_of(question, pick))
                    for question, truth, pick in zip(questions, gold, letters, strict=True))
    order = [*HALF_OF_VALENCE, NO_VALENCE]
    return {truth: {picked: pairs[truth, picked] for picked in order if pairs[truth, picked]}
            for truth in order if any(pairs[truth, picked] for picked in order)}


def accuracy(right: int, questions: int) -> dict:
    low, high = wilson(right, questions)
    return {"right": right, "questions": questions, "accuracy": right / questions if questions else None,
            "ci95": [low, high]}


def half_accuracies(questions: list, gold: list[str], letters: list[str]) -> dict[str, dict]:
    """Accuracy on the cheerful half (gold option positive or calm) and the sorrowful one (negative); questions whose
    gold option has no valence by the lexicon form a third part, `none`."""
    halves: dict[str, list[bool]] = {}
    for question, truth, pick in zip(questions, gold, letters, strict=True):
        halves.setdefault(HALF_OF_VALENCE.get(valence_of(question, truth), NO_VALENCE), []).append(pick == truth)
    return {half: accuracy(sum(halves[half]), len(halves[half]))
            for half in ("cheerful", "sorrowful", NO_VALENCE) if half in halves}


def accuracy_row(label: str, questions: list, gold: list[str], letters: list[str]) -> dict:
    method, weight, channel_weight = method_of(label)
    right = sum(a == b for a, b in zip(letters, gold, strict=True))
    return {"method": method, "prior_weight": weight, "channel_weight": channel_weight, **accuracy(right, len(gold)),
            "letters": dict(sorted(Counter(letters).items())), "halves": half_accuracies(questions, gold, letters),
            "valence": valence_confusion(questions, gold, letters)}


def rows_of(scored: Scored) -> list[dict]:
    return [accuracy_row(label, scored.questions, scored.gold, letters) for label, letters in scored.picks.items()]


def mean_over_folds(fold_rows: list[list[dict]]) -> list[dict]:
    """Each row's accuracy, and each half's, averaged over the folds' adapters (the same questions and rows in each
    fold)."""
    def mean(parts: list[dict]) -> dict:
        return {"accuracy": sum(part["accuracy"] for part in parts) / len(parts)}

    return [{"method": rows[0]["method"], "prior_weight": rows[0]["prior_weight"],
             "channel_weight": rows[0]["channel_weight"], **mean(rows),
             "halves": {half: mean([row["halves"][half] for row in rows]) for half in rows[0]["halves"]}}
            for rows in zip(*fold_rows, strict=True)]


def row_labels(methods: list[str], prior_weights: list[float], channel_weights: list[float]) -> list[str]:
    """A row per method, per λ of the PMI methods and per β of likelihood_pmi_channel: `likelihood_pmi λ=0.5`,
    `likelihood_pmi_channel λ=0.5 β=0.3`."""
    def labels(method: str) -> list[str]:
        if method == "likelihood_pmi":
            return [f"{method} λ={w:g}" for w in prior_weights]
        if method == "likelihood_pmi_channel":
            return [f"{method} λ={w:g} β={b:g}" for w in prior_weights for b in channel_weights]
        return [method]

    return [label for method in methods for label in labels(method)]


def method_of(label: str) -> tuple[str, float | None, float | None]:
    """(method, λ or None, β or None) of a row label."""
    method, *weights = label.split(" ")
    named = {name: float(value) for name, value in (weight.split("=") for weight in weights)}
    return method, named.get("λ"), named.get("β")


def likelihood_letters(questions: list, logliks: list[dict[str, float]], priors: dict[str, float], method: str,
                       prior_weight: float | None, channel: list[dict[str, float]] | None = None,
                       channel_weight: float | None = None) -> list[str]:
    """The letters poetry.choice.letter_pick's likelihood modes pick, from option scores computed once for all of
    them: letter_pick scores every option again per method and λ, five passes over the questions instead of one."""
    from poetry.choice import likelihood_scores

    scores = likelihood_scores(questions, logliks, priors, method, 1.0 if prior_weight is None else prior_weight,
                               channel, 1.0 if channel_weight is None else channel_weight)
    return [max(per, key=per.get) for per in scores]


def pick_letters(model, fmt, questions: list, labels: list[str], batch_size: int, max_new_tokens: int,
                 channel: list[dict[str, float]] | None) -> dict[str, list[str]]:
    """Each row label's letters for `questions`, given their channel scores (None where no row reads them)."""
    from poetry import choice
    from poetry.decode import decode_constrained

    methods = {method_of(label)[0] for label in labels}
    if methods - set(DERIVED_METHODS):  # the letter is read after every value is decoded: most of the cost
        decoded = decode_constrained(model, fmt, questions, batch_size, max_new_tokens)  # eval, no grad
    if methods & set(DERIVED_METHODS):
        logliks = choice.option_logliks(model, fmt, questions, batch_size)
        priors = choice.option_priors(model, fmt, [text for q in questions for text in q.choose.values()],
                                      batch_size)
    picks = {}
    for label in labels:
        method, weight, channel_weight = method_of(label)
        if method in DERIVED_METHODS:
            picks[label] = likelihood_letters(questions, logliks, priors, method, weight, channel, channel_weight)
        else:
            pick = choice.letter_pick(model, fmt, questions, method, max_new_tokens, batch_size)
            picks[label] = [pick(i, d.option_logprobs) for i, d in enumerate(decoded)]
    return picks


def one_per_poem(questions: list, gold: list[str]) -> tuple[list, list[str]]:
    """Each poem's first question: a long poem split into several has the same options and answer in each."""
    first = {}
    for question, letter in zip(questions, gold, strict=True):
        first.setdefault((question.title, question.author, question.content), (question, letter))
    return [q for q, _ in first.values()], [letter for _, letter in first.values()]


def held_out(config: Path, builder_root: Path,
             override_sets: list[list[str]]) -> list[tuple[list, list[str], int]]:
    """(questions, gold letters, held-out poems) of a run config's held-out poems under each list of overrides, built
    by `builder_root`'s poetry.data in one process; poems without options ask no question."""
    from poetry.data import Question

    env = {**os.environ, "PYTHONPATH": str(builder_root)}
    out = subprocess.run([sys.executable, "-c", HELD_OUT, str(Path(config).resolve()), json.dumps(override_sets)],
                         cwd=builder_root, env=env, capture_output=True, text=True, check=True).stdout
    return [([Question(i, item["title"], item["content"], tuple(item["qa_words"]), tuple(item["qa_sents"]),
                       item["choose"], item["author"]) for i, item in enumerate(built["items"])],
             [item["choose_id"] for item in built["items"]], built["poems"]) for built in json.loads(out)]


def from_files(questions_file: str, gold_file: str) -> tuple[list, list[str]]:
    from poetry.data import load_answers, load_questions

    questions = [q for q in load_questions(questions_file).records if q.choose]
    letters = {a.idx: a.choose_id for a in load_answers(gold_file)}
    return one_per_poem(questions, [letters[q.idx] for q in questions])


class Scorer:
    """The base model, alone or with one adapter at a time, answering with every row label."""

    def __init__(self, args: argparse.Namespace):
        from poetry.builtin import resolve_model_path
        from poetry.model import load_tokenizer
        from poetry.prompt import PromptFormat

        self.args, self.dtype = args, autocast_dtype(args.dtype).value
        self.path = resolve_model_path(args.model)
        self.fmt = PromptFormat(load_tokenizer(self.path))
        self.labels = row_labels(args.methods, args.prior_weights, args.channel_weights)
        # the base model's, whatever adapter is loaded (switched off for it): each question's once, by its text
        self.channel_scores: dict[tuple, dict[str, float]] = {}

    def picks(self, question_sets: list[list], adapter: str | Path | None = None) -> list[dict[str, list[str]]]:
        """Each row label's letters for each set of questions (an empty set: no model run), one model load for all."""
        model = inference_model(self.path, self.dtype, adapter)
        return [pick_letters(model, self.fmt, questions, self.labels, self.args.batch_size, self.args.max_new_tokens,
                             self.channel(model, questions))
                if questions else {label: [] for label in self.labels} for questions in question_sets]

    def channel(self, model, questions: list) -> list[dict[str, float]] | None:
        """The channel scores of `questions` if a row uses them, computed only for those not scored before (a
        fold's adapter reuses the zero-shot pass's: a 4-fold rescoring 523 -> 286 s in bf16)."""
        from poetry.choice import option_channel_logliks

        if not any(method_of(label)[0] == "likelihood_pmi_channel" for label in self.labels):
            return None
        by_key = {channel_key(q): q for q in questions}
        if todo := [key for key in by_key if key not in self.channel_scores]:
            scores = option_channel_logliks(model, self.fmt, [by_key[key] for key in todo], self.args.batch_size)
            self.channel_scores.update(zip(todo, scores, strict=True))
        return [self.channel_scores[channel_key(q)] for q in questions]


def channel_key(question) -> tuple:
    """What a question's channel scores depend on: its title, poem and options."""
    return question.title, question.content, tuple(question.choose.items())


def row_name(row: dict) -> str:
    weights = [f"{name}={row[key]:g}" for name, key in (("λ", "prior_weight"), ("β", "channel_weight"))
               if row.get(key) is not None]
    return " ".join([row["method"], *weights])


def print_rows(title: str, rows: list[dict], gold: list[str], questions: list) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "right", "accuracy", "95% interval", "cheerful", "sorrowful", "letters answered",
                   "valence picked"):
        table.add_column(column, justify="right" if column in ("right", "accuracy", "95% interval") else "left")
    for row in rows:
        picked = Counter()
        for counts in row["valence"].values():
            picked.update(counts)
        halves = [row["halves"].get(half) for half in ("cheerful", "sorrowful")]
        table.add_row(row_name(row),
                      f"{row['right']}/{row['questions']}", f"{row['accuracy']:.3f}",
                      f"{row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}",
                      *[f"{h['right']}/{h['questions']}" if h else "-" for h in halves],
                      " ".join(f"{k}:{v}" for k, v in row["letters"].items()),
                      " ".join(f"{k}:{v}" for k, v in picked.items()))
    console.print(table)
    gold_valence = Counter(valence_of(q, g) for q, g in zip(questions, gold, strict=True))
    console.print(f"gold letters: {dict(sorted(Counter(gold).items()))}; gold valence: {dict(gold_valence)}; "
                  f"chance 0.25", highlight=False)


def run_single(args: argparse.Namespace) -> dict:
    """One model (+ adapter) on a config's held-out poems or on a question file."""
    if args.config:
        [(asked, asked_gold, _)] = held_out(args.config, args.builder_root, [[]])
        questions, gold = one_per_poem(asked, asked_gold)
        source = {"config": str(args.config), "builder_root": str(args.builder_root)}
    else:
        questions, gold = from_files(args.questions, args.gold)
        source = {"questions_file": args.questions, "gold_file": args.gold}
    scorer = Scorer(args)
    (picks,) = scorer.picks([questions], args.adapter)
    rows = rows_of(Scored(questions, gold, picks))
    print_rows(f"choose_id on {len(questions)} poems: {args.label or args.model}"
               f"{' + ' + args.adapter if args.adapter else ''}, {scorer.dtype}", rows, gold, questions)
    return {"adapter": args.adapter, **source, "poems": len(questions), "dtype": scorer.dtype,
            "gold_letters": dict(Counter(gold)), "rows": rows}


def fold_overrides(args: argparse.Namespace, fold: int) -> list[str]:
    return [f"model.path={args.model}", f"data.train={args.data.resolve()}", f"data.folds={args.folds}",
            f"data.fold={fold}", *args.train_overrides]


def train_fold(args: argparse.Namespace, fold: int) -> Path:
    """Fold `fold`'s final adapter, trained now unless its run directory records one trained by the same arguments
    (an interrupted training resumes from its last checkpoint)."""
    from poetry.checkpoint import checkpoint_dirs

    run_dir = args.runs_dir.resolve() / f"fold-{fold}"
    command = ["--config", str(args.config.resolve()), *fold_overrides(args, fold), f"log.dir={run_dir}",
               "train.resume=auto"]
    done = run_dir / FOLD_DONE_FILE
    if done.is_file():
        recorded = json.loads(done.read_text(encoding="utf-8"))
        if recorded["train_args"] != command:
            sys.exit(f"error: {run_dir} was trained with other arguments ({' '.join(recorded['train_args'])}); "
                     f"give another --runs-dir, or delete it")
        console.print(f"fold {fold}: trained already, adapter {recorded['adapter']}", highlight=False)
        return Path(recorded["adapter"])
    console.print(f"fold {fold}: train.py {' '.join(command)}", highlight=False)
    trained = subprocess.run([sys.executable, str(ROOT / "train.py"), *command], cwd=ROOT)
    if trained.returncode != 0:
        sys.exit(f"error: fold {fold}: train.py exited with {trained.returncode} (its output is above)")
    adapter = checkpoint_dirs(run_dir / "checkpoints")[-1]
    done.write_text(json.dumps({"train_args": command, "adapter": str(adapter)}, indent=1) + "\n", encoding="utf-8")
    return adapter


def run_folds(args: argparse.Namespace) -> dict:
    """K-fold cross-validation: each fold's adapter on its held-out poems, against the base model, pooled."""
    adapters = [train_fold(args, fold) for fold in range(args.folds)]
    built = held_out(args.config, ROOT, [fold_overrides(args, fold) for fold in range(args.folds)])
    held = [one_per_poem(questions, gold) for questions, gold, _ in built]
    also, also_gold = from_files(args.also_questions, args.also_gold) if args.also_questions else ([], [])
    scorer = Scorer(args)
    zero_shot, also_zero_shot = scorer.picks([[q for questions, _ in held for q in questions], also])
    tuned = [scorer.picks([questions, also], adapter) for (questions, _), adapter in zip(held, adapters, strict=True)]
    folds = [Scored(questions, gold, picks) for (questions, gold), (picks, _) in zip(held, tuned, strict=True)]
    fine_tuned = pooled(folds)
    models = {"zero-shot": Scored(fine_tuned.questions, fine_tuned.gold, zero_shot), "fine-tuned": fine_tuned}
    results = {"folds": args.folds, "data": str(args.data), "config": str(args.config), "runs_dir": str(args.runs_dir),
               "train_overrides": args.train_overrides, "held_out_poems": [poems for _, _, poems in built],
               "poems": len(fine_tuned.questions), "gold_letters": dict(Counter(fine_tuned.gold)),
               "dtype": scorer.dtype, "adapters": [str(adapter) for adapter in adapters],
               "rows": [{"model": model, **row} for model, scored in models.items() for row in rows_of(scored)],
               "scored": scored_poems(folds, models["zero-shot"])}
    for model, scored in models.items():
        print_rows(f"choose_id on {len(scored.questions)} poems, {args.folds} folds pooled: {model}, {scorer.dtype}",
                   [row for row in results["rows"] if row["model"] == model], scored.gold, scored.questions)
    if also:
        results["also"] = also_results(args, Scored(also, also_gold, also_zero_shot),
                                       [Scored(also, also_gold, picks) for _, picks in tuned])
    return results


def scored_poems(folds: list[Scored], zero_shot: Scored) -> list[dict]:
    """Every scored poem once: its fold, gold letter and each model's picks (zero_shot: the folds' poems pooled)."""
    poems = []
    for fold, part in enumerate(folds):
        for i, (question, gold) in enumerate(zip(part.questions, part.gold, strict=True)):
            position = len(poems)
            poems.append({"fold": fold, "title": question.title, "author": question.author, "gold": gold,
                          "zero-shot": {label: letters[position] for label, letters in zero_shot.picks.items()},
                          "fine-tuned": {label: letters[i] for label, letters in part.picks.items()}})
    return poems


def also_results(args: argparse.Namespace, zero_shot: Scored, folds: list[Scored]) -> dict:
    """The --also set (the balanced one) per half: the base model, each fold's adapter, and their mean."""
    zero_rows, fold_rows = rows_of(zero_shot), [rows_of(fold) for fold in folds]
    mean_rows = mean_over_folds(fold_rows)
    print_halves(f"{args.also_questions}, {len(zero_shot.questions)} poems: zero-shot against each fold's adapter",
                 zero_rows, mean_rows, fold_rows)
    return {"questions_file": args.also_questions, "gold_file": args.also_gold, "poems": len(zero_shot.questions),
            "zero_shot": zero_rows, "fine_tuned_mean": mean_rows, "fine_tuned_per_fold": fold_rows}


def print_halves(title: str, zero_rows: list[dict], mean_rows: list[dict], fold_rows: list[list[dict]]) -> None:
    """Accuracy as all / cheerful / sorrowful: zero-shot, the folds' mean, each fold."""
    from rich.table import Table

    def three(row: dict) -> str:
        parts = [row, row["halves"].get("cheerful"), row["halves"].get("sorrowful")]
        return " / ".join(f"{part['accuracy']:.3f}" for part in parts if part)

    table = Table(title=title, caption="accuracy: all / cheerful / sorrowful")
    for column in ("method", "zero-shot", "fine-tuned, mean", *[f"fold {i}" for i in range(len(fold_rows))]):
        table.add_column(column)
    for zero, mean, *per_fold in zip(zero_rows, mean_rows, *fold_rows, strict=True):
        table.add_row(row_name(zero), three(zero), three(mean), *map(three, per_fold))
    console.print(table)


def methods(text: str) -> list[str]:
    chosen = text.split(",")
    if unknown := [method for method in chosen if method not in METHODS]:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    return chosen


def weights_in(name: str, key: str):
    """An argparse type: numbers separated by commas, each in [0, 2] as eval.`key`."""
    def parse(text: str) -> list[float]:
        try:
            weights = [float(w) for w in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
        if not all(0 <= w <= 2 for w in weights):
            raise argparse.ArgumentTypeError(f"each {name} must be in [0, 2], as eval.{key}, got {text!r}")
        return weights

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--adapter", help="a LoRA adapter directory (a run's checkpoint)")
    parser.add_argument("--questions", help="questions in the official eval format")
    parser.add_argument("--gold", help="their gold answers in the submission format")
    parser.add_argument("--config", type=Path, help="a run's config: its held-out poems' questions instead; with "
                                                    "--folds, the config each fold trains (configs/demo.yaml)")
    parser.add_argument("--builder-root", type=Path, help="with --config: the source tree whose poetry.data builds "
                                                          "the questions (default: this one)")
    parser.add_argument("--folds", type=int, nargs="?", const=DEFAULT_FOLDS,
                        help=f"K-fold cross-validation over --data's poems (K={DEFAULT_FOLDS} when not given)")
    parser.add_argument("--data", type=Path, default=Path("data/ccpa2025/train-data"),
                        help="with --folds: the training poems (default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, help="with --folds: the folds' run directories "
                                                      "(default: runs/choose-K-folds)")
    parser.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="with --folds: more train.py overrides, e.g. train.max_steps=2")
    parser.add_argument("--also-questions", help="with --folds: another question set each fold's adapter answers")
    parser.add_argument("--also-gold", help="its gold answers")
    parser.add_argument("--methods", type=methods, default=list(METHODS),
                        help="the poetry.choice methods to score, separated by commas (default: all). The letter "
                             "methods decode every answer first, several times the likelihood methods' cost")
    parser.add_argument("--prior-weights", type=weights_in("λ", "choose_prior_weight"), default=[0.0, 0.5, 1.0],
                        help="the PMI methods' λ values, one row each (default: 0,0.5,1)")
    parser.add_argument("--channel-weights", type=weights_in("β", "choose_channel_weight"), default=[0.3],
                        help="likelihood_pmi_channel's β values, one row each with each λ (default: 0.3)")
    parser.add_argument("--label", default="", help="what the rows are, e.g. zero-shot, new distractors")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="budget of each value, as eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--name", help="results file name prefix (default: choose, or choose-K-folds)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    check_modes(parser, args)
    return args


def check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One mode's options and no other's; a --folds run's inputs exist before hours of training start."""
    if args.folds is None:
        if bool(args.config) == bool(args.questions and args.gold):
            parser.error("give either --config, or --questions and --gold, or --folds")
        if args.also_questions or args.runs_dir or args.train_overrides:
            parser.error("--also-questions, --runs-dir and --train-overrides go with --folds")
        args.builder_root = args.builder_root or ROOT
        args.name = args.name or "choose"
        return
    if args.folds < 2:
        parser.error(f"--folds: at least 2 folds, got {args.folds}")
    if args.questions or args.gold or args.adapter or args.builder_root:
        parser.error("--folds scores its own held-out questions and adapters: drop --questions, --gold, --adapter "
                     "and --builder-root")
    if bool(args.also_questions) != bool(args.also_gold):
        parser.error("give --also-questions and --also-gold together")
    if not args.data.exists():
        parser.error(f"--data {args.data}: no such file or directory; {OFFICIAL_DATA_HELP}")
    args.config = args.config or ROOT / "configs" / "demo.yaml"
    args.runs_dir = args.runs_dir or ROOT / "runs" / f"choose-{args.folds}-folds"
    args.name = args.name or f"choose-{args.folds}-folds"
    if Path(args.model).exists():  # a local model directory, as train.py (run from the project's root) finds it
        args.model = str(Path(args.model).resolve())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    results = run_folds(args) if args.folds else run_single(args)
    saved = write_results(args.name, {"label": args.label, "model": args.model, "prior_weights": args.prior_weights,
                                      "channel_weights": args.channel_weights,
                                      "max_new_tokens": args.max_new_tokens, **results}, args.results_dir)
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
