"""Answer evaluation questions with a (LoRA-tuned) model, merge an adapter into its base, or chat with a model.

    python infer.py [predict] --model DIR [--adapter DIR [--no-merge]] --input eval.json --output submission.json
                    [--decode constrained|free] [--choose-prior-weight λ] [--choose-channel-weight β]
                    [--choose letter|letter_calibrated|likelihood|likelihood_norm|likelihood_pmi|likelihood_pmi_channel]
                    [--batch-size N] [--max-new-tokens N] [--draft-tokens K] [--system-prompt TEXT]
                    [--load-in-4bit | --load-in-8bit] [--dtype auto|fp32|bf16|fp16]
    python infer.py merge --model DIR --adapter DIR --out DIR [--dtype auto|fp32|bf16|fp16]
    python infer.py chat --model DIR [--adapter DIR [--no-merge]] [--prompt TEXT] [--sample --temperature T --top-p P]
                    [--max-new-tokens N] [--system-prompt TEXT] [--dtype auto|fp32|bf16|fp16]
    python infer.py perplexity --model DIR [--adapter DIR [--no-merge]] --input questions.json --gold gold.json
                    [--batch-size N] [--system-prompt TEXT] [--dtype auto|fp32|bf16|fp16]
    python infer.py write --model DIR [--adapter DIR [--no-merge]] (--form 七言绝句 --title 秋思 | --input F --output F)
                    [--rhyme 十一尤] [--tones strict|loose|off] [--n 4 --temperature 0.8 --top-p 0.9 --seed 0]
                    [--decode constrained|free]
                    [--batch-size N] [--system-prompt TEXT] [--dtype auto|fp32|bf16|fp16]
    python infer.py serve --model DIR [--adapter DIR [--no-merge]] [--host 127.0.0.1 --port 8000] [--api-key KEY]
                    [--served-model-name NAME] [--max-batch N] [--max-wait-ms MS] [--max-queue N] [--max-chat-tokens N]
                    [--choose ...] [--max-new-tokens N] [--draft-tokens K] [--system-prompt TEXT] [--dtype ...]

An adapter (--adapter) is merged into the base at load for chat, perplexity and serve, and for predict once the
emotion letters are picked, when it is a LoRA or IA3 one and the base is not quantized: the same model, each forward
at the base's cost. `--no-merge` keeps it apart; merged weights in bf16 are rounded once, so a few answers may differ
from the unmerged model's there. Under `--choose likelihood_pmi_channel` (the default) serve keeps it apart: that
choice reads each poem with the base model too.

`predict` is the default subcommand: arguments that start with an option (`infer.py --model ...`) are predict's.
`--model` is a local directory or `builtin:NAME` (e.g. builtin:tiny-qwen3, built on first use). Constrained decoding
(the default) forces the answer format, so every item is valid whatever the model; free decoding lets the model
write everything and repairs what it can, reporting how many items needed it (see poetry.decode). `--choose` is
how constrained decoding picks choose_id: the letter's logit, calibrated, or the likelihood of each option's text
(see poetry.choice); it must match the run's eval.choose for scores comparable with its curves.
`--max-new-tokens` is the budget of each value; free decoding gets the same room. `--system-prompt` must be the one
the model was trained with (data.system_prompt). The submission is checked as the official scorer checks it before
anything is written. Bad input is one `error:` line on stderr and exit code 2.

`chat` answers one `--prompt`, or without it converses: replies stream as they are generated, the conversation is
kept as history (/reset forgets it, /exit leaves), and it is rendered as training renders a question (the chat
template, or the plain template's answer cue; see PromptFormat.chat_ids).

`perplexity` scores the gold answers to questions as training scores its targets: the prompt masked, the loss per
target token averaged over all of them, exp of it. On a run's held-out questions (python -m poetry.data export-val)
with its checkpoint and dtype it is the run's val/ppl at that step.

`write` writes poems in a form (see poetry.write): the form forced line by line, one character a token, rhymes in
one group, and with `--tones` each position's tone; each poem is printed with its check (poetry.prosody). With
`--input` (a JSON list or JSONL of `{form, title}`), all are written and `--output` gets each one's candidates and
checks. `--n` candidates (sampled: `--temperature` > 0) are ranked by the model's mean log-probability.

`serve` answers over HTTP (see poetry.serve): POST /v1/answer takes evaluation questions and returns what predict
would write for them, concurrent requests batched together; POST /v1/chat/completions is OpenAI's chat API,
streaming included; POST /v1/poems writes as `write` does. With `--api-key` (or POETRY_API_KEY) every endpoint but
/health wants `Authorization: Bearer <key>`; serving beyond loopback without one warns. It needs the `serve`
extra: pip install -e '.[serve]'.

`--dtype auto` (the default) picks bf16 where the hardware computes it natively (a GPU that supports it, a CPU with
avx512_bf16/amx_bf16), else fp16 on a GPU and fp32 on a CPU: bf16 on a CPU without native support runs ~20x slower
(see poetry.precision). The first line printed says which dtype was chosen and why.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import sys
import time
import typing

from poetry.config import ChoiceMethod, EvalConfig

SUBCOMMANDS = ("predict", "merge", "chat", "perplexity", "serve", "write")
HELP_FLAGS = ("-h", "--help")
# poetry.precision.DTYPES and auto, spelled out here because importing poetry.precision loads torch
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _choice_weight(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"must be in [0, 2], got {value}")
    return value


def _model_arguments(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument("--model", required=True, help="base or merged model directory, or builtin:NAME")
    parser.add_argument("--adapter", required=adapter_required,
                        help="PEFT LoRA adapter directory, or a run directory (its best checkpoint, else the latest)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weight dtype; auto: bf16 where the hardware has it natively, else fp16 on a GPU and "
                             "fp32 on a CPU (default: %(default)s)")


def _merge_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-merge", action="store_true",
                        help="keep a LoRA or IA3 adapter apart from the base; by default it is merged into an "
                             "unquantized base at load, so that each forward costs the base's alone")


def _answer_arguments(parser: argparse.ArgumentParser) -> None:
    """How questions are answered: predict's and serve's."""
    # the loop's evaluation defaults: infer.py answers as the curves measured
    parser.add_argument("--choose", choices=typing.get_args(ChoiceMethod), default=EvalConfig.choose,
                        help="how constrained decoding picks choose_id, see poetry.choice (default: %(default)s)")
    parser.add_argument("--choose-prior-weight", type=_choice_weight, default=EvalConfig.choose_prior_weight,
                        help="the PMI methods' λ, as eval.choose_prior_weight: the share of each option's "
                             "likelihood after the cue alone taken away (default: %(default)s)")
    parser.add_argument("--choose-channel-weight", type=_choice_weight, default=EvalConfig.choose_channel_weight,
                        help="likelihood_pmi_channel's β, as eval.choose_channel_weight: the weight of the base "
                             "model's log-probability of the poem after each option (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=_positive, default=64,
                        help="token budget of each value (default: %(default)s)")
    parser.add_argument("--draft-tokens", type=_non_negative, default=EvalConfig.draft_tokens,
                        help="prompt-lookup drafts verified per value token, as eval.draft_tokens: the same greedy "
                             "answers in fewer forwards; 0 = off (default: %(default)s)")
    parser.add_argument("--system-prompt", default="",
                        help="system message the model was trained with (default: none)")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit base weights")
    quantization.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit base weights")


def _subcommand(commands, name: str, summary: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=summary)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = _subcommand(commands, "predict", "write a submission for an evaluation file (the default)")
    _model_arguments(predict)
    _merge_argument(predict)
    predict.add_argument("--input", required=True, help="evaluation questions: a JSON list or JSONL")
    predict.add_argument("--output", required=True, help="submission file to write")
    predict.add_argument("--decode", choices=["constrained", "free"], default="constrained",
                         help="constrained forces the answer format; free lets the model write it and repairs what "
                              "it can (default: %(default)s)")
    predict.add_argument("--batch-size", type=_positive, default=8,
                         help="questions decoded together (default: %(default)s)")
    _answer_arguments(predict)

    merge = _subcommand(commands, "merge", "fold an adapter into its base and save the result")
    _model_arguments(merge, adapter_required=True)
    merge.add_argument("--out", required=True, help="directory for the merged model (safetensors) and tokenizer")

    chatting = _subcommand(commands, "chat", "answer one free prompt, or converse (without --prompt)")
    _model_arguments(chatting)
    _merge_argument(chatting)
    chatting.add_argument("--prompt", help="the user message to answer; without it, an interactive conversation")
    chatting.add_argument("--system-prompt", default="",
                          help="system message the model was trained with (default: none)")
    chatting.add_argument("--max-new-tokens", type=_positive, default=256,
                          help="length limit of the reply (default: %(default)s)")
    chatting.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chatting.add_argument("--temperature", type=float, default=0.7,
                          help="with --sample: softmax temperature (default: %(default)s)")
    chatting.add_argument("--top-p", type=float, default=0.9,
                          help="with --sample: nucleus probability mass (default: %(default)s)")

    scoring = _subcommand(commands, "perplexity", "perplexity of gold answers, prompts masked as in training")
    _model_arguments(scoring)
    _merge_argument(scoring)
    scoring.add_argument("--input", required=True, help="the questions: a JSON list or JSONL")
    scoring.add_argument("--gold", required=True, help="their gold answers, in the submission format and order")
    scoring.add_argument("--batch-size", type=_positive, default=8,
                         help="examples per forward, grouped by length (default: %(default)s)")
    scoring.add_argument("--system-prompt", default="",
                         help="system message the model was trained with (default: none)")

    writing = _subcommand(commands, "write", "write poems in a given form, each printed with its prosody check")
    _model_arguments(writing)
    _merge_argument(writing)
    writing.add_argument("--form", help="五言绝句, 七言绝句, 五言律诗, 七言律诗 (or 五绝 ...), 如梦令, 忆江南, 长相思, "
                                        "浣溪沙 or 清平乐")
    writing.add_argument("--title", default="", help="the poem's title (default: none)")
    writing.add_argument("--input", help="instead of --form/--title: a JSON list or JSONL of {form, title}")
    writing.add_argument("--output", help="with --input: where to write each poem's candidates and checks (JSON)")
    writing.add_argument("--rhyme", help="the 平水韵 group to rhyme in, e.g. 十一尤 (default: the first rhyme's)")
    writing.add_argument("--tones", choices=["strict", "loose", "off"], default="loose",
                         help="the tone asked at each position: strict everywhere, loose with regulated verse's "
                              "1-3-5 allowance, or off (default: %(default)s)")
    writing.add_argument("--decode", choices=["constrained", "free"], default="constrained",
                         help="constrained forces the form, rhyme and tones; free lets the model write, for "
                              "comparison (default: %(default)s)")
    writing.add_argument("--n", type=_positive, default=1, help="candidates a poem, best first (default: %(default)s)")
    writing.add_argument("--temperature", type=float, default=0.0,
                         help="0 is greedy; above, sampling (needed for --n > 1) (default: %(default)s)")
    writing.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default: %(default)s)")
    writing.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    writing.add_argument("--batch-size", type=_positive, default=8,
                         help="poems written together (default: %(default)s)")
    writing.add_argument("--system-prompt", default="",
                         help="system message the model was trained with (default: none)")

    serving = _subcommand(commands, "serve", "answer questions and chat over HTTP (FastAPI + uvicorn)")
    _model_arguments(serving)
    _merge_argument(serving)
    _answer_arguments(serving)
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serving.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serving.add_argument("--served-model-name", default="poetry",
                         help="the name /v1/models lists and chat requests give as `model` (default: %(default)s)")
    serving.add_argument("--max-batch", type=_positive, default=8,
                         help="questions decoded together across requests (default: %(default)s)")
    serving.add_argument("--max-wait-ms", type=float, default=10.0,
                         help="how long an idle model waits for more questions before a batch (default: %(default)s)")
    serving.add_argument("--max-queue", type=_positive, default=256,
                         help="questions (a chat counts one) admitted at once; more get 503 (default: %(default)s)")
    serving.add_argument("--max-chat-tokens", type=_positive, default=512,
                         help="the largest max_tokens a chat request may ask (default: %(default)s)")
    serving.add_argument("--api-key", default=os.environ.get("POETRY_API_KEY") or None,
                         help="every endpoint but /health then wants `Authorization: Bearer <key>` (default: the "
                              "POETRY_API_KEY environment variable, else none)")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Arguments starting with an option are predict's; a first word that names no subcommand is an error (it
    would otherwise be read as predict's, and `infer.py perplexity --help` would answer with predict's help)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in HELP_FLAGS):
        argv = ["predict", *argv]
    elif argv[0] not in (*SUBCOMMANDS, *HELP_FLAGS):
        print(f"error: unknown subcommand {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "predict" and args.decode == "free" and any(a.split("=")[0] == "--choose" for a in argv):
        parser.error("--choose applies to constrained decoding; free decoding reads choose_id from the text")
    if args.command == "write" and (bool(args.form) == bool(args.input) or bool(args.input) != bool(args.output)):
        parser.error("give --form (and --title), or --input with --output")
    return args


if __name__ == "__main__":
    _parse(sys.argv[1:])  # --help and usage errors answer here, before torch loads (~5 s)

from poetry.quiet import quiet_progress_bars  # noqa: E402

quiet_progress_bars()  # before transformers is imported: its bars would put carriage returns into logs

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402

from poetry.builtin import resolve_model_path  # noqa: E402
from poetry.checkpoint import resolve_adapter  # noqa: E402
from poetry.choice import answer_questions, letter_pick  # noqa: E402
from poetry.config import ConfigError, ModelConfig  # noqa: E402
from poetry.data import (  # noqa: E402
    DataError,
    Example,
    check_submission,
    load_answers,
    load_questions,
    load_writing_requests,
    write_submission,
)
from poetry.decode import UnsupportedTokenizer, chat, decode_constrained, decode_free, model_device  # noqa: E402
from poetry.feed import Collator  # noqa: E402
from poetry.loss import TargetOnlyLoss  # noqa: E402
from poetry.model import is_prompt_learning, load_model, load_tokenizer, with_saved_adapter  # noqa: E402
from poetry.precision import choose, default_device  # noqa: E402
from poetry.prompt import PromptFormat, tokenize_examples  # noqa: E402
from poetry.prosody import form_named, record_form  # noqa: E402
from poetry.validation import perplexity, target_loss_sums  # noqa: E402
from poetry.write import Sampling, rhyme_group, several_character_share, write_poems  # noqa: E402


def _dtype(requested: str, device: str) -> str:
    """`requested` resolved for `device`, announced on stdout; a choice that runs far slower warns on stderr."""
    choice = choose(requested, device, "--dtype")
    print(f"dtype: {choice.value} ({choice.reason})", flush=True)
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr, flush=True)
    return choice.value


def _quantization(args: argparse.Namespace) -> str:
    if getattr(args, "load_in_4bit", False):
        return "4bit"
    return "8bit" if getattr(args, "load_in_8bit", False) else "none"


def _load(args: argparse.Namespace, merge: bool = True):
    """(model, tokenizer) from --model, --dtype, the quantization flags and --adapter, in eval mode; the adapter
    merged unless --no-merge or not `merge` (see _merged_for_inference)."""
    path = resolve_model_path(args.model, key="--model")
    device = default_device()
    dtype = _dtype(args.dtype, device)
    quantization = _quantization(args)
    tokenizer = load_tokenizer(path)
    model = load_model(ModelConfig(path=path, dtype=dtype, quantization=quantization), device, for_training=False)
    if quantization == "none":  # quantized weights are placed on the device while loading
        model.to(device)
    if args.adapter:
        adapter = resolve_adapter(args.adapter)
        print(f"adapter: {adapter}", flush=True)
        model = with_saved_adapter(model, adapter)
        if merge:
            model = _merged_for_inference(model, args)
    return model.eval(), tokenizer


def _merged_for_inference(model, args: argparse.Namespace):
    """A LoRA or IA3 adapter folded into an unquantized base: an unmerged LoRA made each decoding step of
    Gemma-3-270M 1.4-1.7x as long as the base's. The in-loop evaluation never merges: a bf16 base would drift with
    each merge and unmerge. Nor does serve when its choice reads the base model (likelihood_pmi_channel) with each
    request; predict picks its letters before it merges. Other adapters stay apart, and the reason is printed. The
    merge subcommand merges and saves by itself."""
    if getattr(args, "no_merge", True) or not args.adapter:
        return model
    quantization = _quantization(args)
    if is_prompt_learning(model):
        reason = "its virtual tokens come before every prompt"
    elif quantization != "none":
        reason = f"the base is quantized ({quantization}): merging would round the adapter into it"
    elif args.command == "serve" and args.choose == "likelihood_pmi_channel":
        reason = "likelihood_pmi_channel scores each poem with the base model, the adapter switched off"
    else:
        print("adapter: merged into the base for inference (--no-merge keeps it apart)", flush=True)
        return model.merge_and_unload()
    print(f"adapter: kept apart from the base, {reason}", flush=True)
    return model


class _Progress:
    """A rich bar on a terminal; elsewhere (logs) a plain line after each 30 s of silence, so logs stay short."""

    QUIET_S = 30.0

    def __init__(self, total: int, label: str, unit: str = "questions"):
        self.total, self.label, self.unit, self.done = total, label, unit, 0
        self.plain = not sys.stdout.isatty()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), disable=self.plain)
        self.started = self.last_line = time.monotonic()

    def __enter__(self) -> _Progress:
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total)
        if self.plain:
            print(f"{self.label}: {self.total} {self.unit}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def advance(self, finished: int) -> None:
        self.done += finished
        self.bar.advance(self.task, finished)
        if self.plain and time.monotonic() - self.last_line >= self.QUIET_S:
            print(f"{self.label}: {self.done}/{self.total} {self.unit} ({self.rate:.2f}/s)", flush=True)
            self.last_line = time.monotonic()


def _predict(args: argparse.Namespace) -> int:
    questions = load_questions(args.input).records  # before the model: bad input fails in a second
    model, tokenizer = _load(args, merge=False)
    fmt = PromptFormat(tokenizer, system_prompt=args.system_prompt)
    with _Progress(len(questions), f"{args.decode} decoding") as progress:
        if args.decode == "constrained":
            # the letters before merging: likelihood_pmi_channel reads the base model, which a merge does away with
            pick = letter_pick(model, fmt, questions, args.choose, args.max_new_tokens, args.batch_size,
                               args.choose_prior_weight, args.choose_channel_weight)
            model = _merged_for_inference(model, args)
            result = decode_constrained(model, fmt, questions, args.batch_size, args.max_new_tokens,
                                        progress.advance, pick, args.draft_tokens)
        else:
            model = _merged_for_inference(model, args)
            result = decode_free(model, fmt, questions, args.batch_size, args.max_new_tokens, progress.advance)
    if args.decode == "constrained":
        answers, note = [decoded.answer for decoded in result], ""
    else:
        counts = ", ".join(f"{kind} {n}" for kind, n in result.repair_counts.most_common())
        answers = result.answers
        note = f"; {result.repaired} of {len(answers)} answers needed repair" + (f" ({counts})" if counts else "")
    check_submission(questions, answers, args.output)
    write_submission(answers, args.output)
    print(f"wrote {len(answers)} answers to {args.output} ({args.decode} decoding, {progress.rate:.2f} "
          f"questions/s{note})", flush=True)
    return 0


def _merge(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    if is_prompt_learning(model):
        return _error(f"{args.adapter}: a {model.active_peft_config.peft_type.value.lower()} adapter has no weights to "
                      f"merge (its virtual tokens come before every prompt); use it as --adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)  # safetensors
    tokenizer.save_pretrained(args.out)
    print(f"merged {args.adapter} into {args.model}: {args.out}", flush=True)
    return 0


def _chat(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    fmt = PromptFormat(tokenizer, system_prompt=args.system_prompt)
    reply = functools.partial(chat, model, fmt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature if args.sample else 0.0, top_p=args.top_p)
    if args.prompt is not None:
        print(reply([{"role": "user", "content": args.prompt}]).text, flush=True)
        return 0
    _converse(reply, args.max_new_tokens)
    return 0


CHAT_HELP = "type a message and press Enter; /reset forgets the conversation, /exit (or Ctrl-D) leaves"


def _converse(reply: typing.Callable, max_new_tokens: int) -> None:
    """The interactive chat: each reply streamed as it is generated, the conversation kept as history. Ctrl-C
    stops a reply (its turn is dropped from the history)."""
    print(CHAT_HELP, flush=True)
    history: list[dict] = []
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print(flush=True)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", flush=True)
        elif text.startswith("/"):
            print(f"unknown command {text}: {CHAT_HELP}", flush=True)
        elif text:
            history.append({"role": "user", "content": text})
            try:
                answer = reply(history, on_text=lambda piece: print(piece, end="", flush=True))
            except KeyboardInterrupt:
                history.pop()
                print("\n(stopped)", flush=True)
                continue
            print("\n(cut at --max-new-tokens)" if answer.finish_reason == "length" else "", flush=True)
            history.append({"role": "assistant", "content": answer.text})


def _perplexity(args: argparse.Namespace) -> int:
    questions = load_questions(args.input).records
    gold = load_answers(args.gold)
    check_submission(questions, gold, args.gold)  # the gold answers these questions, in order
    model, tokenizer = _load(args)
    fmt = PromptFormat(tokenizer, system_prompt=args.system_prompt)
    examples = [Example(q, a) for q, a in zip(questions, gold, strict=True)]
    dataset = tokenize_examples(examples, fmt, max_len=sys.maxsize)  # scored whole, however long
    totals = target_loss_sums(TargetOnlyLoss(model).eval(), dataset, args.batch_size, Collator(tokenizer.pad_token_id),
                              model_device(model), contextlib.nullcontext)
    loss_sum, n_targets = totals.tolist()
    mean, ppl = perplexity(loss_sum, n_targets)
    print(f"perplexity {ppl:.4f}: mean loss {mean:.6f} per target token over {int(n_targets)} target tokens of "
          f"{len(examples)} gold answers", flush=True)
    return 0


def _write(args: argparse.Namespace) -> int:
    """Poems in a form, each printed with its check; with --input, every request's candidates to --output."""
    try:  # before the model: bad input fails at once
        requests = [(form_named(args.form), args.title)] if args.form else [
            (record_form(verse.form, verse.source), verse.title) for verse in load_writing_requests(args.input)]
        sampling = Sampling(args.temperature, args.top_p, args.seed)
        rhyme_group([form for form, _ in requests], args.rhyme, args.n, sampling)  # a rhyme, --n without sampling
    except ValueError as err:
        return _error(str(err))
    model, tokenizer = _load(args)
    fmt = PromptFormat(tokenizer, system_prompt=args.system_prompt)
    with _Progress(len(requests) * args.n, "writing", "poems (candidates counted)") as progress:
        results = write_poems(model, fmt, requests, args.n, args.tones, args.rhyme, sampling, args.batch_size,
                              progress.advance, constrained=args.decode == "constrained")
    for (form, title), candidates in zip(requests, results, strict=True):
        print(f"《{title}》 {form.name}" if title else form.name, flush=True)
        for rank, written in enumerate(candidates, start=1):
            print(f"{rank}. {written.text}\n   {_verdict(written)}", flush=True)
            for violation in written.check.violations:
                print(f"   {violation}", flush=True)
    every = [w for candidates in results for w in candidates]
    if args.decode == "constrained":
        print(_excluded(every), flush=True)
    if args.output:
        rows = [{"form": form.name, "title": title, "poems": [w.to_json() for w in candidates]}
                for (form, title), candidates in zip(requests, results, strict=True)]
        with open(args.output, "w", encoding="utf-8") as out:
            json.dump(rows, out, ensure_ascii=False, indent=1)
        print(f"wrote {len(every)} poems to {args.output}", flush=True)
    return 0


def _excluded(written: list) -> str:
    """What allowing one character a token took from the model, where it wrote."""
    top, positions, mass = several_character_share(written)
    return (f"one character a token: the model's most likely token held several characters at {top} of "
            f"{positions} positions, and such tokens {mass:.1%} of its probability there")


def _verdict(written) -> str:
    return f"{written.check.summary()}; {written.check.pattern}; mean log-prob {written.mean_logprob:.3f}"


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (poetry.serve's)
        import uvicorn
    except ImportError as err:
        return _error(f"serving needs the serve extra ({err.name} is missing): pip install -e '.[serve]'")
    if not args.api_key and not _loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches the port can use the model "
              f"(--api-key, or POETRY_API_KEY)", file=sys.stderr, flush=True)
    app = _app(args)
    print(f"serving {args.served_model_name!r} on http://{args.host}:{args.port} (POST /v1/answer, "
          f"POST /v1/chat/completions, POST /v1/poems, GET /health, GET /v1/models"
          f"{'; an API key is required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _app(args: argparse.Namespace):
    """The FastAPI app `serve` runs, over the model, adapter and answering options of `args`."""
    from poetry.serve import ServeConfig, create_app

    model, tokenizer = _load(args)
    fmt = PromptFormat(tokenizer, system_prompt=args.system_prompt)
    cfg = ServeConfig(model_name=args.served_model_name, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                      max_queue=args.max_queue, max_chat_tokens=args.max_chat_tokens, api_key=args.api_key)
    return create_app(functools.partial(_answers, model, fmt, args), functools.partial(chat, model, fmt), cfg,
                      {"model_path": args.model, "adapter": args.adapter}, functools.partial(_poems, model, fmt, args))


def _answers(model, fmt: PromptFormat, args: argparse.Namespace, questions: list) -> list:
    """The answers predict writes for `questions`, in order."""
    return [decoded.answer for decoded in answer_questions(model, fmt, questions, args.max_batch,
                                                           args.max_new_tokens, None, args.choose,
                                                           args.choose_prior_weight, args.choose_channel_weight,
                                                           args.draft_tokens)]


def _poems(model, fmt: PromptFormat, args: argparse.Namespace, requests: list, n: int, tones: str, rhyme,
           sampling, constrained: bool) -> list:
    """What write prints for one request: its candidates, best first."""
    return write_poems(model, fmt, requests, n, tones, rhyme, sampling, args.max_batch, None, constrained)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    command = {"predict": _predict, "merge": _merge, "chat": _chat, "perplexity": _perplexity,
               "serve": _serve, "write": _write}[args.command]
    try:
        return command(args)
    except DataError as err:
        return _error(err.one_line())
    except OSError as err:  # FileNotFoundError included; library messages can span lines
        shown = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
        return _error(shown.strip().splitlines()[0] if shown.strip() else type(err).__name__)
    except (UnsupportedTokenizer, ConfigError) as err:
        return _error(str(err))


if __name__ == "__main__":
    sys.exit(main())
