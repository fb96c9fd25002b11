"""How choose_id is picked (`eval.choose`, `infer.py --choose`): from the letters, or from the options' own text.

- `letter`: the most likely of the four letter tokens where the constrained answer writes choose_id.
- `letter_calibrated`: the same after subtracting the letter log-probabilities the model gives a content-free
  question ("N/A" for poem, words, sentences and options), as in Zhao et al. 2021, "Calibrate before use": a base
  model's prior for "A" outweighs what it reads from the options.
- `likelihood`: the option whose text has the highest summed log-probability after the poem and
  `poetry.prompt.EMOTION_CUE`, as lm-evaluation-harness scores multiple choice (`acc`).
- `likelihood_norm`: the same divided by the option's length in characters (lm-eval's `acc_norm` divides by bytes;
  the options are Chinese, 3 bytes a character in UTF-8, so the two rank alike). Summed log-probabilities favour
  short options.
- `likelihood_pmi`: domain-conditional PMI (Holtzman et al., EMNLP 2021, "Surface form competition"): the option's
  log-probability after the poem minus `prior_weight` (λ, `eval.choose_prior_weight`) times its log-probability
  after the cue alone, per character. An option the model finds likely whatever the poem (the training set's
  frequent sorrow) loses what it owes to that prior. Each distinct option text's prior is computed once a call.
- `likelihood_pmi_channel`: the PMI score plus `channel_weight` (β, `eval.choose_channel_weight`) times the option's
  noisy-channel score (Min et al., ACL 2022, "Noisy Channel Language Model Prompting for Few-Shot Text
  Classification"): the summed log-probability of the poem's title and text after `这首诗表达了<option>。`, by the
  base model with any adapter switched off. The direct score asks which option follows the poem; the channel asks
  which option explains every character of it, and has no term for an option's own frequency. The base model's,
  since the adapters here never learn that direction: with a fine-tuned adapter on, the channel score alone fell
  from 68 to 62 of 161 official questions (README). A merged adapter has no base left, so infer.py picks before
  merging; after full fine-tuning (peft.method=full) the channel reads the tuned model.

Option likelihoods are scored by the decoding engine (poetry.decode.drive: a prompt-learning adapter's virtual tokens
first, the output layer on the option's positions only), the options of `batch_size` questions a batch: each
question's prompt is fed once, then its four options in one forward after the prompt's keys and values. Fed as
four rows of prompt and option, the prompt (~300 tokens, the option ~5) was most of the cost, four times over.

The rest of the answer is the same constrained decoding in every mode, and so is the answer's format.
"""
from __future__ import annotations

import contextlib
import typing

import torch

from .config import ChoiceMethod
from .data.records import OPTION_LETTERS, Question
from .decode import Decoded, LetterPick, Progress, decode_constrained, drive, pick_most_likely_letter
from .model import is_prompt_learning
from .prompt import PromptFormat

METHODS = typing.get_args(ChoiceMethod)
PMI_METHODS = ("likelihood_pmi", "likelihood_pmi_channel")
CONTENT_FREE = "N/A"


class _Continuation:
    """A known continuation scored after its context by the decoding engine (poetry.decode.drive): its tokens are
    the drafts, which it always accepts, and their log-probabilities are summed as the engine reads their scores.
    Rows of one context share its keys and values: a question's poem is fed once, not once per option."""

    def __init__(self, context: list[int], tokens: list[int]):
        if not tokens:
            raise ValueError("an empty continuation has no likelihood to score")
        self.prompt_key = tuple(context)
        self.tokens = tokens
        self.scored = 0
        self.logprob = 0.0

    def start(self) -> list[int]:
        return []

    def drafts(self, sequence: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` of the tokens after the due one whose scores are still wanted (the last token's scores
        never are)."""
        return self.tokens[self.scored:len(self.tokens) - 1][:max_tokens]

    def advance(self, logits: torch.Tensor) -> list[int]:
        self.logprob += float(logits.float().log_softmax(-1)[self.tokens[self.scored]])
        self.scored += 1
        return [self.tokens[self.scored - 1]] if self.scored < len(self.tokens) else []


def continuation_logliks(model, fmt: PromptFormat, pairs: list[tuple[list[int], list[int]]],
                         rows_per_forward: int) -> list[float]:
    """The summed log-probability of each continuation after its context, for (context ids, continuation ids)
    pairs: the pairs of one context in a batch share its forward, and each continuation takes one more."""
    states = [_Continuation(context, tokens) for context, tokens in pairs]
    longest = max((len(tokens) for _, tokens in pairs), default=0)
    drive(model, fmt, states, [context for context, _ in pairs], rows_per_forward, draft_tokens=longest)
    return [state.logprob for state in states]


def option_logliks(model, fmt: PromptFormat, questions: list[Question], batch_size: int = 8) -> list[dict[str, float]]:
    """Each question's options' summed log-probabilities after its emotion prompt, {letter: score} ({} for a
    question without options); the options of `batch_size` questions in one forward."""
    pairs = []
    for question in questions:
        prompt = fmt.emotion_prompt_ids(question) if question.choose else []
        pairs += [(prompt, fmt.text_ids(text)) for text in question.choose.values()]
    scores = iter(continuation_logliks(model, fmt, pairs, len(OPTION_LETTERS) * batch_size))
    return [{letter: next(scores) for letter in question.choose} for question in questions]


def option_priors(model, fmt: PromptFormat, texts: list[str], batch_size: int = 8) -> dict[str, float]:
    """Each distinct option text's summed log-probability after the cue alone (PMI's domain premise), once a text:
    options repeat across questions."""
    distinct = sorted(set(texts))
    cue = fmt.emotion_cue_ids()
    scores = continuation_logliks(model, fmt, [(cue, fmt.text_ids(text)) for text in distinct],
                                  len(OPTION_LETTERS) * batch_size)
    return dict(zip(distinct, scores, strict=True))


def option_channel_logliks(model, fmt: PromptFormat, questions: list[Question],
                            batch_size: int = 8) -> list[dict[str, float]]:
    """Each option's channel score, {letter: summed log-probability of the poem after a sentence naming the option}
    by the base model alone ({} for a question without options)."""
    pairs = [fmt.channel_ids(question, text) for question in questions for text in question.choose.values()]
    with base_model(model) as base:
        scores = iter(continuation_logliks(base, fmt, pairs, len(OPTION_LETTERS) * batch_size))
    return [{letter: next(scores) for letter in question.choose} for question in questions]


@contextlib.contextmanager
def base_model(model):
    """`model` without its PEFT adapter for the block: a prompt-learning adapter's base, any other adapter switched
    off; a model without one (plain or merged) as it is."""
    if not hasattr(model, "disable_adapter"):
        yield model
    elif is_prompt_learning(model):
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model


def content_free_prior(model, fmt: PromptFormat, max_new_tokens: int) -> dict[str, float]:
    """The letter log-probabilities of a question with no content, answered as every question is."""
    blank = Question(idx=0, title=CONTENT_FREE, author=None, content=CONTENT_FREE, qa_words=(CONTENT_FREE,),
                     qa_sents=(CONTENT_FREE,), choose=dict.fromkeys(OPTION_LETTERS, CONTENT_FREE))
    (decoded,) = decode_constrained(model, fmt, [blank], 1, max_new_tokens)
    return decoded.option_logprobs


def letter_pick(model, fmt: PromptFormat, questions: list[Question], method: str, max_new_tokens: int,
                batch_size: int = 8, prior_weight: float = 1.0, channel_weight: float = 1.0) -> LetterPick:
    """What decides each question's letter under `method`; likelihood modes score every option here, first."""
    if method not in METHODS:
        raise ValueError(f"unknown choice method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "letter":
        return pick_most_likely_letter
    if method == "letter_calibrated":
        prior = content_free_prior(model, fmt, max_new_tokens)
        return lambda position, logprobs: max(logprobs, key=lambda letter: logprobs[letter] - prior[letter])
    logliks = option_logliks(model, fmt, questions, batch_size)
    priors = option_priors(model, fmt, [text for q in questions for text in q.choose.values()], batch_size) \
        if method in PMI_METHODS else {}
    channel = option_channel_logliks(model, fmt, questions, batch_size) if method == "likelihood_pmi_channel" else []
    scores = likelihood_scores(questions, logliks, priors, method, prior_weight, channel, channel_weight)
    return lambda position, logprobs: max(scores[position], key=scores[position].get)


def likelihood_scores(questions: list[Question], logliks: list[dict[str, float]], priors: dict[str, float],
                      method: str, prior_weight: float = 1.0, channel: list[dict[str, float]] | None = None,
                      channel_weight: float = 1.0) -> list[dict[str, float]]:
    """What a likelihood method ranks each question's options by, from their summed log-probabilities (option_logliks),
    for the PMI methods their priors (option_priors), and for likelihood_pmi_channel their channel scores
    (option_channel_logliks)."""
    scores = logliks
    if method in PMI_METHODS:
        scores = [{k: s - prior_weight * priors[q.choose[k]] for k, s in per.items()}
                  for q, per in zip(questions, scores, strict=True)]
    if method in ("likelihood_norm", *PMI_METHODS):
        scores = [{k: s / len(q.choose[k]) for k, s in per.items()} for q, per in zip(questions, scores, strict=True)]
    if method == "likelihood_pmi_channel":
        scores = [{k: s + channel_weight * read[k] for k, s in per.items()}
                  for per, read in zip(scores, channel, strict=True)]
    return scores


def answer_questions(model, fmt: PromptFormat, questions: list[Question], batch_size: int = 8,
                     max_new_tokens: int = 64, progress: Progress | None = None,
                     method: str = "letter", prior_weight: float = 1.0, channel_weight: float = 1.0,
                     draft_tokens: int = 0) -> list[Decoded]:
    """Constrained answers whose choose_id is picked by `method` (`prior_weight`: the PMI methods' λ;
    `channel_weight`: likelihood_pmi_channel's β; `draft_tokens`: speculative decoding, see decode_constrained)."""
    pick = letter_pick(model, fmt, questions, method, max_new_tokens, batch_size, prior_weight, channel_weight)
    return decode_constrained(model, fmt, questions, batch_size, max_new_tokens, progress, pick, draft_tokens)
