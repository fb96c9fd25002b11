"""The task's metrics: character BLEU, Chinese BERTScore, emotion accuracy and the official total; ROUGE beside.

    total = 0.5 * acc + 0.5 * mean(bleu_words, bleu_sents, bertscore_words, bertscore_sents)

Pairing is by position, as the official scorer reads answers: item i of the prediction goes with gold item i, and
inside an item the j-th word (sentence) answer with the j-th gold one; keys are not consulted. A gold answer with no
predicted counterpart scores 0. BLEU and BERTScore are averaged over individual answers (every word gloss of every
item for `*_words`, every sentence for `*_sents`); accuracy is averaged over items.

BLEU: the official tokenisation and smoothing are unpublished. We score characters with nltk `sentence_bleu` at its
default uniform 4-gram weights and smoothing `method1`. This is what the total uses: it is nltk's out-of-the-box
setting, and it gives magnitudes in line with the published rows (bleu_words and bleu_sents both about 0.23-0.25).
Its catch is short answers: an n-gram order longer than the answer counts as precision 0.1 (method1's epsilon), so an
answer identical to its 1-, 2- or 3-character reference scores only 0.1**0.75 = 0.178, 0.1**0.5 = 0.316 or
0.1**0.25 = 0.562. Since the official choice is unknown, `auto_reweigh=True` (weights 1/n over the n orders a short
hypothesis has, so identical answers score 1.0) is reported too, as `bleu_words_reweighed` / `bleu_sents_reweighed`;
it is not part of any total.

BERTScore: F1 without baseline rescaling, from a local model directory (bert-base-chinese at layer 8 is the likely
official setting); nothing is fetched from the hub. Without it `total` is None and the result says why, never a
silent zero. `proxy_total = 0.5 * acc + 0.5 * mean(bleu_words, bleu_sents)` is what in-training curves use, where
BERTScore is off; it is not comparable with published totals (BERTScore, near 0.9, would raise it).

ROUGE-1, ROUGE-2 and ROUGE-L F-measures over characters (rouge-score, Google's reimplementation of ROUGE-1.5.5) are
extra columns, in no total. rouge-score's default tokenizer keeps only [a-z0-9] and would score every Chinese answer
0; it is given a character tokenizer (whitespace dropped, punctuation kept, as BLEU's characters).

An empty (or all-whitespace) answer scores 0 and is never handed to nltk or bert-score: BertTokenizer models crash on
an empty candidate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from .data import Answer

_SMOOTHING = SmoothingFunction().method1


def char_bleu(reference: str, hypothesis: str, reweigh: bool = False) -> float:
    """Sentence BLEU over characters, 4-gram uniform weights, smoothing method1; `reweigh` sets auto_reweigh."""
    if not hypothesis.strip() or not reference.strip():
        return 0.0
    return float(sentence_bleu([list(reference)], list(hypothesis), smoothing_function=_SMOOTHING,
                               auto_reweigh=reweigh))


class _Characters:
    """rouge-score's tokenizer interface, one token per character."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return [char for char in text if not char.isspace()]


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ROUGE = RougeScorer(list(ROUGE_TYPES), tokenizer=_Characters())


def char_rouge(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures over characters; 0 when either side is empty."""
    if not hypothesis.strip() or not reference.strip():
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    return {kind: score.fmeasure for kind, score in _ROUGE.score(reference, hypothesis).items()}


class MetricUnavailable(Exception):
    """A metric cannot be computed here (model directory missing or unloadable); the message says why."""


class BertScore:
    """BERTScore F1 from a local model directory, at an explicit layer (bert-score only knows layers of hub names)."""

    def __init__(self, model_dir: str | Path, layer: int, device: str = "cpu", batch_size: int = 64):
        path = Path(model_dir).resolve()
        if not path.is_dir():
            raise MetricUnavailable(f"BERTScore model directory {path} does not exist")
        try:
            # Imported here so that BLEU-only callers (in-training evaluation, evaluate.py without a model) do not
            # pay for it; a broken install is then reported like a broken model.
            from bert_score import BERTScorer

            # lang="zh" only names the (unused) baseline file: with model_type set, nothing goes to the hub
            self._scorer = BERTScorer(model_type=str(path), num_layers=layer, lang="zh", device=device,
                                      batch_size=batch_size)
        except Exception as err:  # transformers and bert-score raise OSError, ValueError, AssertionError, ...
            raise MetricUnavailable(f"cannot load a BERTScore model from {path} at layer {layer}: "
                                    f"{type(err).__name__}: {err}") from err
        self._cap_tokenizer_length()
        self._frame_like_bert()
        self._scorer._model.float()  # a bf16 checkpoint loads as bf16: identical strings then score F1 = 1.0013

    def _cap_tokenizer_length(self) -> None:
        # A tokenizer saved without model_max_length reports 1e30; bert-score truncates to it and the fast tokenizer
        # overflows. The model's position table is the real limit.
        tokenizer, config = self._scorer._tokenizer, self._scorer._model.config
        positions = getattr(config, "max_position_embeddings", None)
        if positions and tokenizer.model_max_length > positions:
            tokenizer.model_max_length = positions

    def _frame_like_bert(self) -> None:
        """bert-score assumes BERT's framing, [CLS] text [SEP]: both framing tokens get weight 0, and a text of two
        tokens counts as empty and scores 0. A decoder's tokenizer breaks both: Gemma's adds only <bos>, which then
        matches the other side's <bos> perfectly at full weight (inflating every score) while a one-token answer is
        zeroed as "empty"; Qwen's adds nothing, so every two-token answer is zeroed. Such tokenizers are given the
        same frame: <bos> (else <eos>) before the text, <eos> after it. (Not the pad token: its embedding row may
        be all zeros, and bert-score normalises every token's vector, framing ones included.)"""
        tokenizer = self._scorer._tokenizer
        if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            return
        from tokenizers.processors import TemplateProcessing

        first = tokenizer.bos_token or tokenizer.eos_token
        last = tokenizer.eos_token
        if first is None or last is None or not hasattr(tokenizer, "backend_tokenizer"):
            raise MetricUnavailable(f"{type(tokenizer).__name__} has neither [CLS]/[SEP] nor <bos>/<eos> tokens to "
                                    "frame texts with, as BERTScore needs")
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{first} $A {last}",
            special_tokens=[(token, tokenizer.convert_tokens_to_ids(token)) for token in dict.fromkeys([first, last])])
        tokenizer.cls_token, tokenizer.sep_token = first, last  # bert-score gives these two weight 0

    def f1(self, candidates: list[str], references: list[str]) -> list[float]:
        """F1 per (candidate, reference) pair; a pair with an empty side scores 0 without reaching the model."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
        scored = [i for i, (c, r) in enumerate(zip(candidates, references, strict=True)) if c.strip() and r.strip()]
        f1 = [0.0] * len(candidates)
        if scored:
            _, _, values = self._scorer.score([candidates[i] for i in scored], [references[i] for i in scored])
            for i, value in zip(scored, values.tolist(), strict=True):
                f1[i] = value
        return f1


@dataclass(frozen=True)
class AnswerScore:
    """One word gloss or sentence translation: gold key, both texts and their scores."""

    key: str
    gold: str
    pred: str
    bleu: float
    bleu_reweighed: float
    bertscore: float | None
    rouge: dict[str, float]  # F-measure of each of ROUGE_TYPES

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ItemScore:
    idx: int
    words: tuple[AnswerScore, ...]
    sents: tuple[AnswerScore, ...]
    choose_id: str | None
    gold_choose_id: str | None
    correct: bool | None  # None when the gold item has no emotion question (some training questions)

    def to_dict(self) -> dict:
        return {"idx": self.idx, "correct": self.correct, "choose_id": self.choose_id,
                "gold_choose_id": self.gold_choose_id, "words": [w.to_dict() for w in self.words],
                "sents": [s.to_dict() for s in self.sents]}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def combine(acc: float | None, parts: list[float | None]) -> float | None:
    """0.5 * acc + 0.5 * mean(parts): the official total over (bleu_w, bleu_s, bert_w, bert_s), or the proxy over
    the two BLEUs; None when any input is missing."""
    if acc is None or any(p is None for p in parts):
        return None
    return 0.5 * acc + 0.5 * sum(parts) / len(parts)


@dataclass(frozen=True)
class Scores:
    """Aggregates and per-item scores. An aggregate is None when nothing could be scored for it."""

    items: tuple[ItemScore, ...]
    bertscore_off: str | None  # why BERTScore was not computed; None when it was

    def _answers(self, part: str) -> list[AnswerScore]:
        return [answer for item in self.items for answer in getattr(item, part)]

    def _bleu(self, part: str, reweighed: bool) -> float | None:
        return _mean([a.bleu_reweighed if reweighed else a.bleu for a in self._answers(part)])

    def _bertscore(self, part: str) -> float | None:
        return None if self.bertscore_off else _mean([a.bertscore for a in self._answers(part)])

    def rouge(self, part: str, kind: str) -> float | None:
        """Mean F-measure of ROUGE `kind` (one of ROUGE_TYPES) over the `part` ("words" or "sents") answers."""
        return _mean([a.rouge[kind] for a in self._answers(part)])

    @property
    def bleu_words(self) -> float | None:
        return self._bleu("words", reweighed=False)

    @property
    def bleu_sents(self) -> float | None:
        return self._bleu("sents", reweighed=False)

    @property
    def bleu_words_reweighed(self) -> float | None:
        return self._bleu("words", reweighed=True)

    @property
    def bleu_sents_reweighed(self) -> float | None:
        return self._bleu("sents", reweighed=True)

    @property
    def bertscore_words(self) -> float | None:
        return self._bertscore("words")

    @property
    def bertscore_sents(self) -> float | None:
        return self._bertscore("sents")

    @property
    def acc(self) -> float | None:
        return _mean([float(item.correct) for item in self.items if item.correct is not None])

    @property
    def total(self) -> float | None:
        """The official total; None when any part is missing (BERTScore off, or nothing to average)."""
        return combine(self.acc, [self.bleu_words, self.bleu_sents, self.bertscore_words, self.bertscore_sents])

    @property
    def proxy_total(self) -> float | None:
        """0.5 * acc + 0.5 * mean(bleu_words, bleu_sents): the in-training curve, where BERTScore is off."""
        return combine(self.acc, [self.bleu_words, self.bleu_sents])

    @property
    def incomplete(self) -> bool:
        return self.total is None

    def to_dict(self) -> dict:
        names = ("total", "proxy_total", "acc", "bleu_words", "bleu_sents", "bertscore_words", "bertscore_sents",
                 "bleu_words_reweighed", "bleu_sents_reweighed", "incomplete", "bertscore_off")
        return {**{name: getattr(self, name) for name in names},
                **{f"{kind}_{part}": self.rouge(part, kind) for part in ("words", "sents") for kind in ROUGE_TYPES},
                "counts": {"items": len(self.items), "words": len(self._answers("words")),
                           "sents": len(self._answers("sents"))},
                "items": [item.to_dict() for item in self.items]}


def _pairs(gold: dict[str, str], pred: dict[str, str]) -> list[tuple[str, str, str]]:
    """(gold key, gold text, predicted text) by position; a missing prediction is empty, an extra one ignored."""
    predicted = list(pred.values())
    return [(key, text, predicted[i] if i < len(predicted) else "") for i, (key, text) in enumerate(gold.items())]


def _score_part(pairs: list[tuple[str, str, str]], bertscore: BertScore | None) -> list[AnswerScore]:
    f1 = bertscore.f1([p for _, _, p in pairs], [g for _, g, _ in pairs]) if bertscore else [None] * len(pairs)
    return [AnswerScore(key, gold, pred, char_bleu(gold, pred), char_bleu(gold, pred, reweigh=True), value,
                        char_rouge(gold, pred)) for (key, gold, pred), value in zip(pairs, f1, strict=True)]


def score_answers(gold: list[Answer], pred: list[Answer], bertscore: BertScore | None = None,
                  bertscore_off: str = "no BERTScore model given") -> Scores:
    """Score predictions against gold answers, item by item in list order (check the submission first: the lists
    must have the same length). `bertscore_off` is recorded as the reason when `bertscore` is None."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predicted items for {len(gold)} gold items")
    words = [_pairs(g.ans_qa_words, p.ans_qa_words) for g, p in zip(gold, pred, strict=True)]
    sents = [_pairs(g.ans_qa_sents, p.ans_qa_sents) for g, p in zip(gold, pred, strict=True)]
    # One bert-score call per part, not per item: it batches, and each call has a fixed cost
    word_scores = _score_part([pair for item in words for pair in item], bertscore)
    sent_scores = _score_part([pair for item in sents for pair in item], bertscore)
    word_scores, sent_scores = iter(word_scores), iter(sent_scores)
    items = tuple(
        ItemScore(idx=g.idx, words=tuple(islice(word_scores, len(item_words))),
                  sents=tuple(islice(sent_scores, len(item_sents))), choose_id=p.choose_id,
                  gold_choose_id=g.choose_id, correct=None if g.choose_id is None else p.choose_id == g.choose_id)
        for g, p, item_words, item_sents in zip(gold, pred, words, sents, strict=True))
    return Scores(items, None if bertscore else bertscore_off)
