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

The rest of the answer is the same constrained decoding in every mode, and so is the answer's format.
"""
from __future__ import annotations

import typing

import torch
from transformers import DynamicCache

from .config import ChoiceMethod
from .data.records import OPTION_LETTERS, Question
from .decode import (
    Decoded,
    LetterPick,
    Progress,
    decode_constrained,
    inference,
    model_device,
    padding_id,
    pick_most_likely_letter,
)
from .model import CACHE_KEYWORD, VirtualTokens
from .prompt import PromptFormat

METHODS = typing.get_args(ChoiceMethod)
CONTENT_FREE = "N/A"


def option_logliks(model, fmt: PromptFormat, question: Question) -> dict[str, float]:
    """Summed log-probability of each option's text after `fmt.emotion_prompt_ids(question)`.

    The prompt is fed once and its keys and values repeated for the four options, which are fed together, padded
    on the right (a pad after a sequence changes nothing before it)."""
    prompt = fmt.emotion_prompt_ids(question)
    options = [fmt.text_ids(text) for text in question.choose.values()]
    device = model_device(model)
    virtual = VirtualTokens.of(model)  # a prompt-learning adapter's tokens come first, as cached slots
    runner, start = (virtual.base, virtual.length) if virtual else (model, 0)
    with inference(model):
        # without the config: every layer keeps all its slots (see decode._forward)
        cache = DynamicCache([(keys[None], values[None]) for keys, values in virtual.kv()] if virtual else None)
        first = runner(input_ids=torch.tensor([prompt], device=device), **{CACHE_KEYWORD: cache}, use_cache=True,
                       logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
        cache.batch_repeat_interleave(len(options))
        width, end = max(map(len, options)), start + len(prompt)
        ids = torch.tensor([o + [padding_id(fmt)] * (width - len(o)) for o in options], device=device)
        mask = torch.tensor([[1] * (end + len(o)) + [0] * (width - len(o)) for o in options], device=device)
        positions = torch.arange(end, end + width, device=device).expand(len(options), -1)
        rest = runner(input_ids=ids, attention_mask=mask, position_ids=positions, **{CACHE_KEYWORD: cache},
                      use_cache=True).logits.float().log_softmax(-1)
    scores = []
    for row, option in enumerate(options):
        following = rest[row, torch.arange(len(option) - 1, device=device),
                         torch.tensor(option[1:], dtype=torch.long, device=device)]
        scores.append(float(first[option[0]] + following.sum()))
    return dict(zip(question.choose, scores, strict=True))


def content_free_prior(model, fmt: PromptFormat, max_new_tokens: int) -> dict[str, float]:
    """The letter log-probabilities of a question with no content, answered as every question is."""
    blank = Question(idx=0, title=CONTENT_FREE, author=None, content=CONTENT_FREE, qa_words=(CONTENT_FREE,),
                     qa_sents=(CONTENT_FREE,), choose=dict.fromkeys(OPTION_LETTERS, CONTENT_FREE))
    (decoded,) = decode_constrained(model, fmt, [blank], 1, max_new_tokens)
    return decoded.option_logprobs


def letter_pick(model, fmt: PromptFormat, questions: list[Question], method: str, max_new_tokens: int) -> LetterPick:
    """What decides each question's letter under `method`; likelihood modes score every option here, first."""
    if method not in METHODS:
        raise ValueError(f"unknown choice method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "letter":
        return pick_most_likely_letter
    if method == "letter_calibrated":
        prior = content_free_prior(model, fmt, max_new_tokens)
        return lambda position, logprobs: max(logprobs, key=lambda letter: logprobs[letter] - prior[letter])
    scores = [option_logliks(model, fmt, q) if q.choose else {} for q in questions]
    if method == "likelihood_norm":
        scores = [{k: s / len(q.choose[k]) for k, s in per.items()} for q, per in zip(questions, scores, strict=True)]
    return lambda position, logprobs: max(scores[position], key=scores[position].get)


def answer_questions(model, fmt: PromptFormat, questions: list[Question], batch_size: int = 8,
                     max_new_tokens: int = 64, progress: Progress | None = None,
                     method: str = "letter") -> list[Decoded]:
    """Constrained answers whose choose_id is picked by `method`."""
    pick = letter_pick(model, fmt, questions, method, max_new_tokens)
    return decode_constrained(model, fmt, questions, batch_size, max_new_tokens, progress, pick)
