"""Answering questions with a model: constrained greedy decoding, free generation with a repairing parser, chat.

Constrained decoding forces the canonical answer of poetry.prompt token by token and lets the model write only the
values, so every answer is schema-valid whatever the model (no invalid JSON, no dropped or mangled keys, no empty
value, choose_id always a letter). For a question the forced skeleton is

    {"ans_qa_words": {"<w1>": "  VALUE  ", "<w2>": "  VALUE  "}, "ans_qa_sents": {"<s1>": "  VALUE  "},
     "choose_id": "  LETTER  "}  + end-of-turn

with parts present only, as in `answer_dict`. Token boundaries (measured on the Qwen3 tokenizer, guarded by
tests/test_decode.py): the text before a value ends in the token ` "`; a value closes with a token that fuses the
quote with what follows (`",`, `"},`), or, after ASCII punctuation, also with what precedes it (`."`, `!",`). So a
value ends at the first generated token holding an unescaped `"`; its text before the quote stays in the value, and
the tokens forced next are those of that text plus the following fixed piece, tokenised together: the ids the
training target has there. With gold values teacher-forced, the forced ids equal `PromptFormat.target_ids` for all
656 targets built from the sample and official data, with the Qwen3 and the Gemma-3 tokenizer. The one known
exception: a value opening with ASCII punctuation (`(`, `<`, an escaped `"`, ...), which the BPE merges with the
opening quote (` "(`) while the decoder has already forced ` "`; the value text is still right. choose_id is read
at the position after `"choose_id": "`, where each letter is one token: the most likely of the four letters, or
what `pick` makes of their log-probabilities (poetry.choice: calibrated, or the option text's likelihood).

Batching. A forward costs about the same whatever few tokens it takes (on Gemma-3-270M it reads the 671 MB fp32
lm_head and the layers' weights), and forced tokens are most of an answer, so a forced run (the prompt, a key and
its punctuation) is fed in one forward, and lm_head runs on each row's last position only. Each row keeps its own
keys and values, in buffers that grow by doubling. A forward packs every row's due tokens into one sequence without
padding, whatever each is due (a token, its drafts, a forced run of any length), and its layers attend row by row
over each row's own slots (`_rows_attention`): one forward a round, one choice a row a forward, and no row holds a
hole, which Gemma's sliding window would count (it is measured in cache slots; tests/test_decode.py). The engine
before packed forwards stacked the rows left-padded into one cache each forward (a copy of it a forward) and made
every row as wide as the widest feed, re-feeding cached tokens; a long forced run took a forward of its own. On the
demo's 13 held-out questions (Gemma-3-270M with its adapter merged, fp32, 2 drafts, Intel), packing took
22.7-22.9 s against 27.7-28.1 s, with the same answers (bench/README.md, packed forwards). Questions on one poem in
a batch share the keys and values of the prompt up to where it differs: on the tiny config's validation questions
(several per poem) that skips 20% of the prompt tokens and 10% of the time; the demo config asks one question per
poem.

Speculative decoding (`draft_tokens`, eval.draft_tokens, infer.py --draft-tokens) feeds a row due a value's token
the tokens that followed the row's last n-gram where it occurred before (prompt lookup: a translation reuses its
line, a gloss its word), reads scores at each, and keeps the prefix its state would have chosen itself, one token
at a time: exact greedy decoding under the constraint, in fewer forwards when the guesses are right. Each verified
position costs its share of lm_head, so wrong guesses are not free.

The engine (`drive`: rows, batches, the cache, speculation) does not know which constraint its states keep: answers
here, poems in a form in poetry.write.

Free decoding (`decode_free`) lets the model write everything and repairs the text; it exists for comparison.
`chat` answers a free conversation (infer.py chat, the server's /v1/chat/completions).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .data.records import OPTION_LETTERS, Answer, Question
from .loss import TargetOnlyLoss
from .model import VirtualTokens
from .prompt import PromptFormat

Progress = Callable[[int], None]  # called with the number of questions finished since the last call
VIRTUAL_ID = -1  # stands for a prompt-learning adapter's virtual token in a row's ids: never fed
CHOOSE_HEAD = '"choose_id": "'
DRAFT_NGRAM = 3  # prompt lookup matches the last 3 tokens of a row, else 2, else 1
# the attention implementation of the engine's forwards (`_rows_attention`), and the keyword that hands it their rows
ROWS_ATTENTION = PACKING_KEYWORD = "poetry_rows"


class UnsupportedTokenizer(ValueError):
    """The tokenizer cannot express the canonical answer the way the constrained decoder needs."""


class UnsupportedModel(ValueError):
    """The model's attention is one that the decoding engine cannot run."""


@dataclass(frozen=True)
class Decoded:
    answer: Answer
    option_logprobs: dict[str, float] | None  # log-softmax over the A-D letter logits; None without options


# Given a question's position in the batch and its letter log-probabilities, the letter to answer (poetry.choice)
LetterPick = Callable[[int, dict[str, float]], str]


def pick_most_likely_letter(position: int, letter_logprobs: dict[str, float]) -> str:
    return max(letter_logprobs, key=letter_logprobs.get)


@dataclass(frozen=True)
class Skeleton:
    """The canonical answer text with its values cut out.

    `pieces[i]` is the fixed text before slot i and `pieces[-1]` the text after the last slot; `slots[i]` is the
    key whose value fills slot i, or None for the choose_id letter. Keys go through `json.dumps` exactly as in
    `render_target`, so escaping and separators match the training target.
    """

    pieces: tuple[str, ...]
    slots: tuple[str | None, ...]

    @classmethod
    def of(cls, question: Question) -> Skeleton:
        pieces, slots, text = [], [], "{"
        sections = [(name, keys) for name, keys in (("ans_qa_words", question.qa_words),
                                                    ("ans_qa_sents", question.qa_sents)) if keys]
        for n, (name, keys) in enumerate(sections):
            text += (", " if n else "") + json.dumps(name) + ": {"
            for k, key in enumerate(keys):
                pieces.append(text + (", " if k else "") + json.dumps(key, ensure_ascii=False) + ': "')
                slots.append(key)
                text = '"'
            text += "}"
        if question.choose:
            pieces.append(text + (", " if sections else "") + CHOOSE_HEAD)
            slots.append(None)
            text = '"'
        pieces.append(text + "}")
        return cls(tuple(pieces), tuple(slots))


def closing_quote(text: str, before: str = "") -> int | None:
    """Index in `text` of the first `"` that closes a JSON string whose content so far is `before`, or None."""
    for i, char in enumerate(text):
        if char == '"':
            preceding = before + text[:i]
            if (len(preceding) - len(preceding.rstrip("\\"))) % 2 == 0:  # an odd run of backslashes escapes it
                return i
    return None


@dataclass(frozen=True)
class _Vocab:
    """Per-tokenizer tables for generating values."""

    texts: list[str]  # each id decoded on its own
    blocked: torch.Tensor  # never inside a value: special and added tokens, end of turn, ids past the tokenizer
    blocked_first: torch.Tensor  # also never first: tokens that would close the value at once, blank tokens
    quote_ids: frozenset[int]  # tokens whose text holds a `"`: the only ones that can close a value


def _id_texts(tokenizer, known: int) -> list[str]:
    """Each id of `range(known)` decoded alone, as `tokenizer.decode` does without cleaning up spaces: a fast
    tokenizer's own Rust batch (0.37 s on Gemma-3's 262k ids) rather than a Python call per id (1.1 s)."""
    ids = [[i] for i in range(known)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    return backend.decode_batch(ids, skip_special_tokens=False)


@functools.lru_cache(maxsize=4)  # the first evaluation of a run pays it: ~1 s on a 262k vocabulary
def _vocab(tokenizer, size: int, device: str, end_ids: tuple[int, ...]) -> _Vocab:
    known = min(len(tokenizer), size)
    texts = _id_texts(tokenizer, known)
    blocked = torch.zeros(size, dtype=torch.bool)
    blocked[known:] = True  # embedding rows padded past the tokenizer: no text at all
    control = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids) | set(end_ids)
    blocked[[i for i in control if i < size]] = True
    first = blocked.clone()
    first[[i for i, text in enumerate(texts) if not text.strip() or closing_quote(text) is not None]] = True
    return _Vocab(texts, blocked.to(device), first.to(device),
                  frozenset(i for i, text in enumerate(texts) if '"' in text))


def token_texts(model, fmt: PromptFormat) -> list[str]:
    """Each id's text decoded alone, for the ids the tokenizer knows (cached per tokenizer)."""
    return _vocab(fmt.tokenizer, model.get_output_embeddings().out_features, str(model_device(model)),
                  tuple(fmt.end_ids)).texts


def option_letter_ids(fmt: PromptFormat) -> list[int]:
    """The ids of A-D as the value of choose_id; raises UnsupportedTokenizer unless each is one token there."""
    ids = []
    for letter in OPTION_LETTERS:
        alone = fmt.text_ids(letter)
        if len(alone) != 1 or fmt.text_ids(CHOOSE_HEAD + letter + '"}') != (
                fmt.text_ids(CHOOSE_HEAD) + alone + fmt.text_ids('"}')):
            raise UnsupportedTokenizer(
                f"{type(fmt.tokenizer).__name__}: the option letter {letter} is not a single token after "
                f"{CHOOSE_HEAD!r} (it tokenises as {fmt.text_ids(letter)}), so choose_id cannot be read from the "
                f"letter logits at one position")
        ids += alone
    return ids


def _value_text(raw: str, key: str) -> str:
    """The value as the answer shows it: JSON escapes undone, outer whitespace stripped, never blank."""
    try:
        text = json.loads(f'"{raw}"', strict=False)  # strict=False: raw control characters are kept as they are
    except ValueError:  # e.g. cut by the budget inside an escape
        text = raw
    # A value whose bytes decode to blank text only (a split whitespace character) falls back to the key itself
    return text.strip() or raw.strip() or key


class _AnswerState:
    """One answer being decoded: forced skeleton runs, values generated up to their closing quote, the letter."""

    def __init__(self, question: Question, fmt: PromptFormat, vocab: _Vocab, letter_ids: list[int],
                 max_new_tokens: int, pick: Callable[[dict[str, float]], str]):
        self.question, self.fmt, self.vocab, self.letter_ids = question, fmt, vocab, letter_ids
        self.max_new_tokens, self.pick = max_new_tokens, pick
        self.skeleton = Skeleton.of(question)
        self.slot = 0
        self.emitted: list[int] = []  # fed to the model, or due to be
        self.tail: list[int] = []  # what follows the last slot: known, so never fed
        self.value_ids: list[int] = []
        self.values: list[str] = []
        self.letter: str | None = None
        self.option_logprobs: dict[str, float] | None = None

    @property
    def done(self) -> bool:
        """Every slot filled."""
        return self.slot == len(self.skeleton.slots)

    @property
    def ids(self) -> list[int]:
        """The whole answer's token ids."""
        return self.emitted + self.tail

    @property
    def prompt_key(self) -> tuple:
        """Rows with equal keys ask about one poem: the engine feeds its prompt once for them (`_shared_prompts`)."""
        return self.question.title, self.question.author, self.question.content

    def drafts(self, sequence: list[int], max_tokens: int) -> list[int]:
        """Prompt lookup's guesses after the due token, which ends `sequence`: inside a value and its budget only
        (the token that fills the budget closes the value)."""
        if self.done or self.skeleton.slots[self.slot] is None:
            return []
        room = min(max_tokens, self.max_new_tokens - len(self.value_ids) - 1)
        return prompt_lookup(sequence, room) if room > 0 else []

    def _piece_ids(self, tail: str) -> list[int]:
        """Ids of the fixed piece after the current slot, tokenised together with the value's text that shared
        the closing quote's token, as the target tokenises them; the final piece ends the turn."""
        ids = self.fmt.text_ids(tail + self.skeleton.pieces[self.slot])
        return ids + self.fmt.end_ids if self.done else ids

    def start(self) -> list[int]:
        """The forced tokens before the first slot: fed together with the prompt."""
        return self._emit(self._piece_ids(""))

    def advance(self, logits: torch.Tensor) -> list[int]:
        """The tokens to feed next, given the next-token scores: a value's token, or a forced run (the letter or
        the closing quote, and the skeleton up to the next slot) after which scores are wanted again; nothing once
        every slot is filled."""
        return self._emit(self._choose(logits) if self.skeleton.slots[self.slot] is None else self._generate(logits))

    def _emit(self, ids: list[int]) -> list[int]:
        if self.done:
            self.tail = ids
            return []
        self.emitted += ids
        return ids

    def _raw(self) -> str:
        return self.fmt.tokenizer.decode(self.value_ids, clean_up_tokenization_spaces=False)

    def _generate(self, logits: torch.Tensor) -> list[int]:
        blocked = self.vocab.blocked if self.value_ids else self.vocab.blocked_first
        token = int(logits.masked_fill(blocked, float("-inf")).argmax())
        if token in self.vocab.quote_ids:
            before, text = self._raw(), self.vocab.texts[token]
            cut = closing_quote(text, before)
            if cut is not None:  # the canonical tokens replace the model's closing token
                return self._close(before + text[:cut], tail=text[:cut])
        self.value_ids.append(token)
        if len(self.value_ids) == self.max_new_tokens:
            return [token, *self._close(self._raw(), tail="")]
        return [token]

    def _close(self, raw: str, tail: str) -> list[int]:
        self.values.append(_value_text(raw, self.skeleton.slots[self.slot]))
        self.value_ids = []
        self.slot += 1
        return self._piece_ids(tail)

    def _choose(self, logits: torch.Tensor) -> list[int]:
        letters = logits[self.letter_ids].float().log_softmax(-1)
        self.option_logprobs = dict(zip(OPTION_LETTERS, letters.tolist(), strict=True))
        self.letter = self.pick(self.option_logprobs)
        self.slot += 1
        return [self.letter_ids[OPTION_LETTERS.index(self.letter)], *self._piece_ids("")]

    def decoded(self) -> Decoded:
        q, n = self.question, len(self.question.qa_words)
        answer = Answer(q.idx, dict(zip(q.qa_words, self.values[:n], strict=True)),
                        dict(zip(q.qa_sents, self.values[n:], strict=True)), self.letter)
        return Decoded(answer, self.option_logprobs)


@contextlib.contextmanager
def inference(model):
    """Eval mode without autograd; each module's previous mode comes back after, since training decodes mid-run."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def padding_id(fmt: PromptFormat) -> int:
    pad = fmt.tokenizer.pad_token_id
    return fmt.end_ids[0] if pad is None else pad


def _states(model, fmt: PromptFormat, questions: list[Question], max_new_tokens: int,
            pick: LetterPick) -> list[_AnswerState]:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    letter_ids = option_letter_ids(fmt) if any(q.choose for q in questions) else []
    vocab = _vocab(fmt.tokenizer, model.get_output_embeddings().out_features, str(model_device(model)),
                   tuple(fmt.end_ids))
    return [_AnswerState(q, fmt, vocab, letter_ids, max_new_tokens, functools.partial(pick, i))
            for i, q in enumerate(questions)]


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = [[pad_id] * (width - len(s)) + s for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _batches(lengths: list[int], batch_size: int, groups: list | None = None) -> list[list[int]]:
    """Indices grouped by length, longest first (little padding; an out-of-memory shows on the first batch); with
    `groups`, the members of a group next to each other (by the group's longest), so that they share a batch."""
    groups = list(range(len(lengths))) if groups is None else groups
    longest, first = {}, {}
    for i, (group, length) in enumerate(zip(groups, lengths, strict=True)):
        longest[group] = max(longest.get(group, 0), length)
        first.setdefault(group, i)
    order = sorted(range(len(lengths)), key=lambda i: (-longest[groups[i]], first[groups[i]], -lengths[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def decode_constrained(model, fmt: PromptFormat, questions: list[Question], batch_size: int = 8,
                       max_new_tokens: int = 64, progress: Progress | None = None,
                       pick: LetterPick = pick_most_likely_letter, draft_tokens: int = 0) -> list[Decoded]:
    """Batched greedy constrained decoding with a KV cache; results in input order. `max_new_tokens` is the
    budget of each value: a value that reaches it is cut there; `pick` chooses each choose_id (poetry.choice).
    `draft_tokens` > 0 verifies up to that many prompt-lookup drafts per value token (`_forward`): the same
    answers in fewer forwards."""
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be 0 (off) or positive, got {draft_tokens}")
    states = _states(model, fmt, questions, max_new_tokens, pick)
    drive(model, fmt, states, [fmt.prompt_ids(q) for q in questions], batch_size, progress, draft_tokens)
    return [state.decoded() for state in states]


def drive(model, fmt: PromptFormat, states: list, prompts: list[list[int]], batch_size: int,
          progress: Progress | None = None, draft_tokens: int = 0) -> None:
    """The engine, whatever the constraint: each state, fed its prompt and its forced start, chooses from the
    scores what is fed next until it is done, in batches of rows with their own keys and values. A state has
    `start() -> ids`, `advance(logits) -> ids` (nothing once done), `drafts(sequence, max_tokens) -> ids` (tokens
    to verify after the due one, which ends `sequence`; see `_forward`) and `prompt_key` (states with equal keys
    share their prompt's keys and values)."""
    virtual = VirtualTokens.of(model)
    with inference(model):
        prefix = virtual.kv() if virtual else []
        rows = [_Row(state, prompt + state.start(), prefix) for state, prompt in zip(states, prompts, strict=True)]
        lm = TargetOnlyLoss(virtual.base if virtual else model)  # its decoder, and its output layer on chosen rows
        with _packed_attention(lm.decoder.config):
            for batch in _batches([len(row.feed) for row in rows], batch_size, [state.prompt_key for state in states]):
                _decode_batch(lm, [rows[i] for i in batch], draft_tokens)
                if progress:
                    progress(len(batch))


class _Row:
    """One sequence of a batch with its own keys and values, so that it can be fed any number of tokens at once.
    A prompt-learning adapter's virtual tokens are its first `len(prefix)` slots: cached, never fed."""

    def __init__(self, state, feed: list[int], prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        self.state = state
        self.virtual = prefix[0][0].shape[1] if prefix else 0
        self.ids: list[int] = [VIRTUAL_ID] * self.virtual  # the tokens `kv` holds in its first slots
        # per layer: keys, values (heads, capacity, dim); the prefix's are every row's, but full: the first write
        # moves them to buffers of the row's own
        self.kv = [[keys, values] for keys, values in prefix]
        self.feed = feed  # the tokens due next; scores are wanted after the last

    def drafts(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens to verify after the one due, as its state proposes them; none after a run."""
        if len(self.feed) != 1 or max_tokens < 1:
            return []
        return self.state.drafts(self.ids[self.virtual:] + self.feed, max_tokens)

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the fed tokens' keys and values (heads, n, dim) after the row's slots in its layer's buffers, which
        grow by doubling (a forward copies nothing else), and returns all its slots up to them."""
        cached, fed = len(self.ids), keys.shape[1]
        if layer == len(self.kv):  # the row's first forward
            self.kv.append([states.new_empty(states.shape[0], 0, states.shape[-1]) for states in (keys, values)])
        for part, states in enumerate((keys, values)):
            buffer = self.kv[layer][part]
            if buffer.shape[-2] < cached + fed:
                grown = states.new_empty(states.shape[0], max(cached + fed, 2 * buffer.shape[-2]), states.shape[-1])
                grown[:, :cached] = buffer[:, :cached]
                self.kv[layer][part] = buffer = grown
            buffer[:, cached:cached + fed] = states
        return tuple(buffer[:, :cached + fed] for buffer in self.kv[layer])

    def take_prompt(self, leader: _Row, shared: int) -> None:
        """The keys and values of the leader's first `shared` prompt tokens (after any virtual ones), copied."""
        kept = self.virtual + shared
        self.ids, self.feed = leader.ids[:kept], self.feed[shared:]
        self.kv = [[buffer[:, :kept].clone() for buffer in layer] for layer in leader.kv]


def _decode_batch(lm: TargetOnlyLoss, rows: list[_Row], draft_tokens: int = 0) -> None:
    """The prompts first, each poem's once; then one forward a round, in which every row takes what it is due:
    one token with up to `draft_tokens` drafts after it, or a forced run of any length."""
    followers = _shared_prompts(rows)
    _forward(lm, [row for row in rows if row not in followers])
    for row, (leader, shared) in followers.items():
        row.take_prompt(leader, shared)
    due = rows
    while due := [row for row in due if row.feed]:
        _forward(lm, due, draft_tokens)
    for row in rows:  # a row lives until the last batch is done: its buffers must not
        row.kv = []


def _shared_prompts(rows: list[_Row]) -> dict[_Row, tuple[_Row, int]]:
    """Rows asking about a poem that an earlier row asks about too, with that row and the length of their common
    start (the poem): it is fed whole, they take its keys and values for that start and are fed the rest."""
    first: dict[tuple, _Row] = {}
    followers = {}
    for row in rows:
        leader = first.setdefault(row.state.prompt_key, row)
        if leader is not row:
            common = next((i for i, (a, b) in enumerate(zip(leader.feed, row.feed, strict=False)) if a != b),
                          min(len(leader.feed), len(row.feed)))
            followers[row] = (leader, min(common, len(row.feed) - 1))  # scores are wanted after its last token
    return followers


def _forward(lm: TargetOnlyLoss, rows: list[_Row], draft_tokens: int = 0) -> None:
    """Feeds each row its due tokens in one forward, and lets its state choose from the scores what is due next.

    Speculative, with `draft_tokens`: a row due one token of a value is also fed the tokens that prompt lookup
    (`prompt_lookup`) guesses will follow it, and scores are read at each of them. The state advances on the scores
    one position at a time, as it would with one forward per token, for as long as the token it chooses is the next
    draft; the first choice that differs (another token, a forced run, a closing quote) is what is due next, and
    the keys and values of the drafts after it are dropped. Greedy answers are those of plain decoding by
    construction; a longer forward may round differently, which in fp32 flips no choice on the tested models. The
    output layer runs on the positions whose scores are read only: a row's due token and its own drafts.

    The rows' tokens are packed into one sequence, without padding: the layers' matmuls see each fed token once,
    whatever the others are due, and attention runs row by row on each row's own slots (`_RowsAttention`).
    """
    if not rows:
        return
    drafts = [row.drafts(draft_tokens) for row in rows]
    fed = [row.feed + draft for row, draft in zip(rows, drafts, strict=True)]
    device = lm.lm_head.weight.device
    input_ids = torch.tensor([[token for tokens in fed for token in tokens]], device=device)
    # a row's positions go on from its slots (virtual ones included), as if it were alone
    positions = torch.tensor([[len(row.ids) + i for row, tokens in zip(rows, fed, strict=True)
                               for i in range(len(tokens))]], device=device)
    packing = _RowsAttention(rows, [len(tokens) for tokens in fed])
    hidden = lm.decoder(input_ids=input_ids, position_ids=positions, use_cache=False,
                        **{PACKING_KEYWORD: packing}).last_hidden_state[0]
    # the output layer (a 262k-row matmul on Gemma) on each row's due token and its own drafts only
    scored = [1 + len(draft) for draft in drafts]
    ends = [start + len(tokens) for start, tokens in zip(packing.starts, fed, strict=True)]
    read = [position for end, n in zip(ends, scored, strict=True) for position in range(end - n, end)]
    logits = lm.target_logits(hidden[read]).split(scored)
    for row, tokens, draft, row_logits in zip(rows, fed, drafts, logits, strict=True):
        accepted, row.feed = _verify(row.state, row_logits, draft)
        row.ids = row.ids + tokens[:len(tokens) - (len(draft) - accepted)]  # slots past them are overwritten later


def _verify(state, logits: torch.Tensor, draft: list[int]) -> tuple[int, list[int]]:
    """How many draft tokens the state chooses itself given the scores at each fed position (the due token's, then
    each draft's), and the tokens due after the last one it accepts."""
    for position, token in enumerate(draft):
        due = state.advance(logits[position])
        if due != [token]:
            return position, due
    return len(draft), state.advance(logits[len(draft)])


def prompt_lookup(sequence: list[int], max_tokens: int, max_ngram: int = DRAFT_NGRAM) -> list[int]:
    """Up to `max_tokens` tokens guessed to come next (prompt lookup decoding): those that followed, at its latest
    earlier occurrence in `sequence`, the longest n-gram (n <= max_ngram) that ends it. Answers restate the
    question: a translation reuses its line's characters, a gloss often repeats its word."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start:start + n] == tail:
                return sequence[start + n:start + n + max_tokens]
    return []


class _RowsAttention:
    """One forward's packing: row b's fed tokens are the next `lengths[b]` positions of the packed sequence. Each
    layer's attention runs row by row, the row's fed queries over its own slots (`_Row.attend`), so no row waits
    on padding and no slot is copied. A row's masks are made once a forward, for all layers."""

    def __init__(self, rows: list[_Row], lengths: list[int]):
        self.rows, self.lengths = rows, lengths
        self.starts = [0, *itertools.accumulate(lengths)][:-1]
        self.masks: dict[tuple[int, int | None], tuple[int, torch.Tensor | None]] = {}

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                 window: int | None) -> torch.Tensor:
        outputs = []
        for b, (row, start, n) in enumerate(zip(self.rows, self.starts, self.lengths, strict=True)):
            keys, values = row.attend(module.layer_idx, key[0, :, start:start + n], value[0, :, start:start + n])
            first, mask = self._seen(b, keys.shape[1], window, query.device)
            out, _ = sdpa_attention_forward(module, query[:, :, start:start + n], keys[None, :, first:],
                                            values[None, :, first:], mask, scaling=scaling)
            outputs.append(out)
        return torch.cat(outputs, dim=1)

    def _seen(self, b: int, slots: int, window: int | None, device) -> tuple[int, torch.Tensor | None]:
        """The first of row b's slots that its fed tokens may see, and the mask over the slots from there: None when
        SDPA's own rule gives it (a single query sees every slot; a prompt alone, causal order)."""
        if (b, window) not in self.masks:
            n = self.lengths[b]
            first = 0 if window is None else max(0, slots - n - window + 1)  # a sliding window counts slots
            if n == 1 or (n == slots and (window is None or n <= window)):
                self.masks[b, window] = first, None
            else:
                queries = torch.arange(slots - n, slots, device=device)[:, None]
                keys = torch.arange(first, slots, device=device)[None]
                seen = (keys <= queries) & (keys > queries - window if window is not None else True)
                self.masks[b, window] = first, seen[None, None]
        return self.masks[b, window]


def _rows_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """The attention implementation of the engine's forwards (registered with transformers as ROWS_ATTENTION):
    query, key and value are the packed rows' fed tokens (1, heads, tokens, dim)."""
    if kwargs.get("softcap") is not None:
        raise UnsupportedModel("the decoding engine's attention runs SDPA, which has no attention logit soft-capping")
    return kwargs[PACKING_KEYWORD](module, query, key, value, scaling, sliding_window), None


AttentionInterface.register(ROWS_ATTENTION, _rows_attention)


@contextlib.contextmanager
def _packed_attention(config):
    """The decoder's layers attend row by row (`_rows_attention`) for as long as the engine runs them."""
    before = config._attn_implementation
    config._attn_implementation = ROWS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def decode_naive(model, fmt: PromptFormat, questions: list[Question], max_new_tokens: int = 64,
                 pick: LetterPick = pick_most_likely_letter) -> list[Decoded]:
    """Reference for decode_constrained: one question at a time, no cache, no padding, the whole sequence re-run
    for every choice. Slow; tests compare the two."""
    results = []
    with inference(model):
        for question, state in zip(questions, _states(model, fmt, questions, max_new_tokens, pick), strict=True):
            ids = fmt.prompt_ids(question) + state.start()
            while not state.done:
                ids += state.advance(model(input_ids=torch.tensor([ids], device=model_device(model)),
                                           logits_to_keep=1).logits[0, -1].float())
            results.append(state.decoded())
    return results


# ---- free generation, for comparison ----

@dataclass(frozen=True)
class FreeDecoded:
    answer: Answer
    text: str  # what the model wrote
    repairs: tuple[str, ...]  # what the parser had to fix; empty for a clean answer


@dataclass(frozen=True)
class FreeResult:
    items: list[FreeDecoded]

    @property
    def answers(self) -> list[Answer]:
        return [item.answer for item in self.items]

    @property
    def repaired(self) -> int:
        """Items that needed any repair."""
        return sum(bool(item.repairs) for item in self.items)

    @property
    def repair_counts(self) -> Counter:
        return Counter(kind for item in self.items for kind in item.repairs)


def free_budget(fmt: PromptFormat, question: Question, max_new_tokens: int) -> int:
    """New tokens allowed to a free answer: the skeleton plus the constrained budget of each value."""
    skeleton = Skeleton.of(question)
    return len(fmt.text_ids("".join(skeleton.pieces))) + len(skeleton.slots) * max_new_tokens + len(fmt.end_ids)


def decode_free(model, fmt: PromptFormat, questions: list[Question], batch_size: int = 8,
                max_new_tokens: int = 64, progress: Progress | None = None) -> FreeResult:
    """Greedy `generate` on the same prompts, then `parse_free_answer`. `max_new_tokens` means what it means in
    decode_constrained (per value); see free_budget."""
    tokenizer, pad_id = fmt.tokenizer, padding_id(fmt)
    stop = list(dict.fromkeys(fmt.end_ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    prompts = [fmt.prompt_ids(q) for q in questions]
    texts = [""] * len(questions)
    with inference(model):
        for batch in _batches([len(p) for p in prompts], batch_size):
            input_ids, mask = _left_pad([prompts[i] for i in batch], pad_id, model_device(model))
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=stop,
                                 max_new_tokens=max(free_budget(fmt, questions[i], max_new_tokens) for i in batch))
            for i, row in zip(batch, out[:, input_ids.shape[1]:], strict=True):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            if progress:
                progress(len(batch))
    items = []
    for question, text in zip(questions, texts, strict=True):
        answer, repairs = parse_free_answer(question, text)
        items.append(FreeDecoded(answer, text, repairs))
    return FreeResult(items)


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_STRING = r'"((?:[^"\\]|\\.)*)"'
_PAIR = re.compile(_STRING + r"\s*:\s*" + _STRING)
_CHOOSE = re.compile(r'"[^"]*choose[^"]*"\s*:\s*("(?:[^"\\]|\\.)*"|[^,}\s]+)')
_LETTER = re.compile(r"(?<![A-Za-z])[A-Da-d](?![A-Za-z])")


def parse_free_answer(question: Question, text: str) -> tuple[Answer, tuple[str, ...]]:
    """A schema-valid answer from free text, and the repairs it took.

    Values are read by position (the scorer reads them so, and models mangle keys): the first object-valued entry
    is the words, the second the sentences, unless the canonical section names are there. What cannot be read
    falls back to something never empty: the word or sentence itself, the letter A.
    """
    repairs: list[str] = []
    body = _strip_think(text, repairs)
    if "```" in body:
        body = re.sub(r"```[A-Za-z]*", "", body)
        repairs.append("fence")
    parsed = _first_object(body)
    if parsed is None:
        repairs.append("invalid_json")
        words, sents, choose = _salvage(body, len(question.qa_words))
    else:
        words, sents, choose = _read_object(parsed, question, repairs)
    answer = Answer(question.idx, _fill(question.qa_words, words, repairs), _fill(question.qa_sents, sents, repairs),
                    _letter(choose, repairs) if question.choose else None)
    return answer, tuple(dict.fromkeys(repairs))


def _strip_think(text: str, repairs: list[str]) -> str:
    body = _THINK_BLOCK.sub("", text)
    if "</think>" in body:  # the block was opened in the prompt
        body = body.rsplit("</think>", 1)[1]
    if "<think>" in body:  # never closed: the rest is reasoning cut off by the budget
        body = body.split("<think>", 1)[0]
    if body != text:
        repairs.append("think")
    return body


def _first_object(text: str) -> dict | None:
    """The first balanced `{...}` (braces inside strings ignored), if it parses as a JSON object."""
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for end in range(start, len(text)):
        char = text[end]
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char in "{}":
            depth += 1 if char == "{" else -1
            if depth == 0:
                try:
                    parsed = json.loads(text[start:end + 1], strict=False)
                except ValueError:
                    return None
                return parsed if isinstance(parsed, dict) else None
    return None


def _read_object(parsed: dict, question: Question, repairs: list[str]) -> tuple[list, list, object]:
    objects = [value for value in parsed.values() if isinstance(value, dict)]
    sections = []
    asked = [(name, keys) for name, keys in (("ans_qa_words", question.qa_words),
                                             ("ans_qa_sents", question.qa_sents)) if keys]
    for position, (name, keys) in enumerate(asked):
        section = parsed.get(name)
        if not isinstance(section, dict):
            repairs.append("section_name")
            section = objects[position] if position < len(objects) else {}
        if list(section) != list(keys):
            repairs.append("keys")
        sections.append(list(section.values()))
    words = sections.pop(0) if question.qa_words else []
    sents = sections.pop(0) if question.qa_sents else []
    choose = parsed.get("choose_id", next((v for k, v in parsed.items() if "choose" in k), None))
    return words, sents, choose


def _salvage(body: str, n_words: int) -> tuple[list, list, object]:
    """Invalid JSON: string pairs in order of appearance, the first n_words taken as words, the rest as
    sentences."""
    values = [_unescape(value) for key, value in _PAIR.findall(body) if "choose" not in key]
    choose = _CHOOSE.search(body)
    return values[:n_words], values[n_words:], choose.group(1).strip('"') if choose else None


def _unescape(value: str) -> str:
    try:
        return json.loads(f'"{value}"', strict=False)
    except ValueError:
        return value


def _fill(keys: tuple[str, ...], values: list, repairs: list[str]) -> dict[str, str]:
    filled = {}
    for position, key in enumerate(keys):
        value = values[position] if position < len(values) else None
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            repairs.append("missing_value")
        filled[key] = text or key
    return filled


def _letter(choose: object, repairs: list[str]) -> str:
    if choose in OPTION_LETTERS:
        return choose
    repairs.append("choose_id")
    match = _LETTER.search(str(choose)) if choose is not None else None
    return match.group().upper() if match else OPTION_LETTERS[0]


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens ran out; "cancelled"
    prompt_tokens: int
    completion_tokens: int


class _TextCallback(TextStreamer):
    """Hands each finished piece of text to `on_text`; TextStreamer holds back a piece until its characters are
    whole (a CJK character can span tokens)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class _StopWhen(StoppingCriteria):
    def __init__(self, cancelled: Callable[[], bool]):
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancelled(), dtype=torch.bool, device=input_ids.device)


def chat(model, fmt: PromptFormat, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, on_text: Callable[[str], None] | None = None,
         cancelled: Callable[[], bool] | None = None) -> Reply:
    """The assistant's next turn after `messages` (see `PromptFormat.chat_ids`): greedy at temperature 0, else
    sampled. `on_text` receives the reply piece by piece as it is generated; `cancelled` is polled after each
    token and stops the generation when it turns true."""
    ids = fmt.chat_ids(messages)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with inference(model):
        input_ids = torch.tensor([ids], device=model_device(model))
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            eos_token_id=list(fmt.end_ids), pad_token_id=padding_id(fmt),
            streamer=_TextCallback(fmt.tokenizer, on_text) if on_text else None,
            stopping_criteria=StoppingCriteriaList([_StopWhen(cancelled)]) if cancelled else None, **sampling)
    new = out[0, len(ids):].tolist()
    if cancelled and cancelled():
        reason = "cancelled"
    else:
        reason = "stop" if new and new[-1] in fmt.end_ids else "length"
    return Reply(fmt.tokenizer.decode(new, skip_special_tokens=True), reason, len(ids), len(new))
