"""Writing a poem in a given form: the decoding engine (poetry.decode.drive) driven by the form instead of an answer.

The prompt is the writing example's (`写一首<form>，题为《<title>》。`, poetry.prompt), and the form is forced by
construction: each line takes exactly its number of characters, and its punctuation and the end of the turn are
forced after it (，after a line that does not rhyme, 。after one that does and at the end), as is a repeated line
(叠句) whole. Inside a line only tokens that are one CJK character are allowed, as in CharPoet (Yu et al., ACL 2024
demos): a token of several characters would break the count. How much of the model's probability that takes away
is measured as it writes (`Written.several_mass`, `several_top`).

Rhyme positions take characters of one rhyme class: a 平水韵 level group for regulated verse, a 词林正韵 部 (of the
chain's tone) for a 词, as poetry.prosody.check judges them. `rhyme` fixes the group; else the first rhyme position
fixes it, by the character chosen there among all characters of the right tone. Regulated verse never rhymes
twice on one character (重韵): a rhyme position does not take a character an earlier rhyme ended on. With `tones`
(`strict` or `loose`, the 1-3-5 allowance), every position takes only characters of the tone the form asks there;
regulated verse keeps the patterns (平起/仄起, first line rhymed or not) that fit what is written so far, so the
pattern is the model's choice. A character the table lacks is allowed only where the tone is free. The 1-3-5
allowance never frees the two positions that would make 孤平 or 三平尾 (`Pattern.writing_tone`).

Greedy, or sampling with a temperature and top-p, each candidate from its own seeded generator (so a candidate
does not depend on the others in its batch). Candidates are ranked by the model's mean log-probability of their
characters, read from its unconstrained distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .decode import Progress, drive, model_device, token_texts
from .prompt import PromptFormat
from .prosody.check import PoemCheck, check_poem, group_classes, rhyme_classes
from .prosody.forms import EITHER, Form
from .prosody.tables import LEVEL, OBLIQUE, RhymeGroup, RhymeTable, rhyme_table

TONE_MODES = ("strict", "loose", "off")
_TONE_BITS = {LEVEL: 1, OBLIQUE: 2}


class WritingError(ValueError):
    """A request that cannot be written, naming the parameter at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # candidate i draws from a generator seeded with seed * 1_000_003 + i

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class Written:
    title: str
    text: str
    ids: tuple[int, ...]   # the tokens after the prompt, up to the last character: one a character, punctuation forced
    mean_logprob: float    # the model's, unconstrained, per character
    check: PoemCheck
    several_mass: float | None  # the mean probability the model gave, where it wrote, to tokens of several characters
    several_top: int | None     # positions where its most likely token was one of them (excluded by construction)
    positions: int              # characters written (tokens, unconstrained)

    def to_json(self) -> dict:
        return {"text": self.text, "mean_logprob": self.mean_logprob, **self.check.to_json()}


def several_character_share(written: list[Written]) -> tuple[int, int, float]:
    """What allowing one character a token took from the model over constrained poems: (positions where its most
    likely token held several characters, positions written, the mean probability such tokens held there)."""
    positions = sum(w.positions for w in written)
    return (sum(w.several_top for w in written), positions,
            sum(w.several_mass * w.positions for w in written) / positions)


class CharVocab:
    """Masks over the output layer's rows: the ids that are one CJK character (by their tone, by their rhyme) and
    those that hold several."""

    def __init__(self, texts: list[str], size: int, device, table: RhymeTable):
        self.size, self.device, self.table = size, device, table  # rows past the tokenizer's texts: never chosen
        self.chars = {i: text for i, text in enumerate(texts) if len(text) == 1 and _is_cjk(text)}
        self.ids_of: dict[str, list[int]] = {}
        for i, char in self.chars.items():
            self.ids_of.setdefault(char, []).append(i)
        self.single = self._mask(self.chars)
        self.several = self._mask([i for i, text in enumerate(texts) if sum(map(_is_cjk, text)) > 1])
        bits = torch.zeros(self.size, dtype=torch.uint8)
        for i, char in self.chars.items():
            bits[i] = sum(_TONE_BITS[tone] for tone in table.tones(char))
        self.tone_bits = bits.to(device)
        self.several_ids = self.several.nonzero().flatten()
        self._allowed: dict[tuple, torch.Tensor] = {}

    def _mask(self, ids) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[torch.tensor(sorted(ids), dtype=torch.long)] = True
        return mask.to(self.device)

    def allowed_ids(self, tones: frozenset[str] | None, rhyme: tuple | None = None,
                    or_oblique: bool = False) -> torch.Tensor:
        """The single-character ids of one of `tones` (None: any), that rhyme as `rhyme` asks (classes, tone,
        regulated), or, with `or_oblique`, are oblique instead; cached, since positions repeat their asks."""
        key = (tones, rhyme, or_oblique)
        if key not in self._allowed:
            mask = self.single if tones is None else self._tone_mask(tones)
            if rhyme is not None:
                rhyming = self._rhyme_mask(*rhyme)
                mask = mask & (rhyming | self._tone_mask(frozenset({OBLIQUE})) if or_oblique else rhyming)
            self._allowed[key] = mask.nonzero().flatten()
        return self._allowed[key]

    def _tone_mask(self, tones: frozenset[str]) -> torch.Tensor:
        """Single characters allowed where any of `tones` is asked (中: any character, the table's or not)."""
        if EITHER in tones:
            return self.single
        return self.single & (self.tone_bits & sum(_TONE_BITS[tone] for tone in tones)).bool()

    def _rhyme_mask(self, classes: frozenset[str], tone: str, regulated: bool) -> torch.Tensor:
        """Single characters with a reading of `tone` that rhymes in one of `classes` (in any, when empty)."""
        return self._mask([i for i, char in self.chars.items()
                           if (found := rhyme_classes(char, tone, regulated, self.table))
                           and (not classes or found & classes)])


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


@cache
def char_vocab(texts: tuple[str, ...], size: int, device: str) -> CharVocab:
    return CharVocab(list(texts), size, device, rhyme_table())


class _Writing:
    """What the engine asks of a state, alike for every poem being written."""

    form: Form
    title: str

    @property
    def prompt_key(self) -> tuple:
        return "write", self.form.name, self.title  # the candidates of one title share its prompt

    def drafts(self, sequence: list[int], max_tokens: int) -> list[int]:
        return []  # a poem restates nothing of its prompt for prompt lookup to find

    def start(self) -> list[int]:
        return []


class PoemState(_Writing):
    """One poem being written: a character at a time, each line's punctuation forced after its last character."""

    def __init__(self, form: Form, title: str, fmt: PromptFormat, chars: CharVocab, tones: str,
                 rhyme: RhymeGroup | None, sampling: Sampling, candidate: int):
        if tones not in TONE_MODES:
            raise ValueError(f"tones must be one of {', '.join(TONE_MODES)}, got {tones!r}")
        self.form, self.title, self.fmt, self.chars, self.tones = form, title, fmt, chars, tones
        self.sampling = sampling
        self.generator = torch.Generator(device=chars.device).manual_seed(sampling.seed * 1_000_003 + candidate)
        self.specs = form.patterns[0].lines  # line lengths and punctuation: the same in every pattern
        self.patterns = list(form.patterns)  # those that fit what is written so far (tones on)
        self.classes = {chain: frozenset(group_classes(rhyme, form.regulated)) if rhyme and rhyme.tone == tone
                        else frozenset() for chain, tone in form.chain_tones.items()}  # 清平乐: one chain of two
        self.lines: list[str] = [""]
        self.rhymed: list[int] = []  # the ids of the characters rhymes ended on, which regulated verse never repeats
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.several_mass: list[float] = []
        self.several_top = 0
        self.done = False

    def advance(self, logits: torch.Tensor) -> list[int]:
        due = self._advance(logits)
        self.ids += due
        return due

    def _advance(self, logits: torch.Tensor) -> list[int]:
        if self.done:
            return []
        logits = logits.float()
        allowed = self._allowed()  # sampling sorts these, not the whole vocabulary
        token = int(allowed[_pick(logits[allowed], self.sampling, self.generator)])
        self._record(logits, token)
        self._narrow(self.chars.chars[token])
        self.lines[-1] += self.chars.chars[token]
        if len(self.lines[-1]) < len(self.specs[len(self.lines) - 1]):
            return [token]
        ids = [token, *self.fmt.text_ids(_punctuation(self.specs, len(self.lines) - 1))]
        while len(self.lines) < len(self.specs) and (repeated := self.specs[len(self.lines)].repeats) is not None:
            self.lines.append(self.lines[repeated])  # a 叠句 (如梦令's 知否，知否) is forced whole
            ids += self.fmt.text_ids(self.lines[-1] + _punctuation(self.specs, len(self.lines) - 1))
        if len(self.lines) == len(self.specs):
            self.done = True
            self.ids.append(token)
            return []  # the rest and the end of the turn are known: never fed
        self.lines.append("")
        return ids

    @property
    def text(self) -> str:
        return "".join(line + _punctuation(self.specs, i) for i, line in enumerate(self.lines))

    def _position(self) -> tuple[int, int, bool]:
        """(line, position, whether it is the line's last)."""
        line, position = len(self.lines) - 1, len(self.lines[-1])
        return line, position, position == len(self.specs[line]) - 1

    def _allowed(self) -> torch.Tensor:
        """The ids allowed at the next position."""
        line, position, last = self._position()
        tones = None if self.tones == "off" else frozenset(
            p.writing_tone(line, position, self.tones == "loose") for p in self.patterns)
        chains = self._chains(self.patterns, line, last)
        if None not in chains:  # every pattern left rhymes here
            allowed = self.chars.allowed_ids(tones, self._rhyme_key(chains.pop()))
            if self.form.regulated and self.rhymed:
                allowed = allowed[~torch.isin(allowed, torch.tensor(self.rhymed, device=allowed.device))]
            return allowed
        if len(chains) > 1 and tones is not None:  # a regulated first line, rhymed or not: level rhymes or oblique
            return self.chars.allowed_ids(tones, self._rhyme_key(next(c for c in chains if c)), or_oblique=True)
        return self.chars.allowed_ids(tones)

    @staticmethod
    def _chains(patterns: list, line: int, last: bool) -> set[str | None]:
        """The rhyme chains of `line` under `patterns` at its last position ({None} elsewhere: nothing rhymes)."""
        return {p.lines[line].rhyme for p in patterns} if last else {None}

    def _rhyme_key(self, chain: str) -> tuple:
        return self.classes[chain], self.form.chain_tones[chain], self.form.regulated

    def _narrow(self, char: str) -> None:
        """Keep the patterns the character fits (a level one ending the first line rhymes it), and narrow the rhyme
        class of the chain it rhymes in."""
        line, position, last = self._position()
        if self.tones != "off":
            tones, loose = self.chars.table.tones(char), self.tones == "loose"
            fitting = [p for p in self.patterns if p.writing_tone(line, position, loose) in (EITHER, *tones)]
            chains = self._chains(fitting, line, last)
            if len(chains) > 1:  # a regulated first line: rhymed if the character rhymes, else not
                rhymes = self._rhymes(char, next(chain for chain in chains if chain))
                fitting = [p for p in fitting if bool(p.lines[line].rhyme) == rhymes]
            self.patterns = fitting
        chains = self._chains(self.patterns, line, last)
        if None not in chains:
            chain = chains.pop()
            self.rhymed += self.chars.ids_of[char]
            found = self._found(char, chain)
            self.classes[chain] = (self.classes[chain] & found) if self.classes[chain] else found
        elif len(chains) > 1 and self._rhymes(char, next(chain for chain in chains if chain)):
            self.rhymed += self.chars.ids_of[char]  # tones off leave the first line free to rhyme; this end does

    def _found(self, char: str, chain: str) -> frozenset[str]:
        return frozenset(rhyme_classes(char, self.form.chain_tones[chain], self.form.regulated, self.chars.table))

    def _rhymes(self, char: str, chain: str) -> bool:
        found = self._found(char, chain)
        return bool(found) and (not self.classes[chain] or bool(found & self.classes[chain]))

    def _record(self, logits: torch.Tensor, token: int) -> None:
        logprobs = logits.log_softmax(-1)
        self.logprobs.append(float(logprobs[token]))
        self.several_mass.append(float(logprobs[self.chars.several_ids].exp().sum()))
        self.several_top += bool(self.chars.several[int(logits.argmax())])

    def written(self) -> Written:
        check = check_poem(self.text, self.form, loose=self.tones != "strict", table=self.chars.table)
        return Written(self.title, self.text, tuple(self.ids), sum(self.logprobs) / len(self.logprobs), check,
                       sum(self.several_mass) / len(self.several_mass), self.several_top, len(self.logprobs))


class FreeState(_Writing):
    """A poem as the model writes it unconstrained, up to the end of its turn or `max_new_tokens`: what the
    constraints are measured against (its form, rhyme and tone rates, by the checker)."""

    def __init__(self, form: Form, title: str, fmt: PromptFormat, max_new_tokens: int, sampling: Sampling,
                 candidate: int, device):
        self.form, self.title, self.fmt, self.max_new_tokens, self.sampling = form, title, fmt, max_new_tokens, sampling
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed * 1_000_003 + candidate)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.done = False

    def advance(self, logits: torch.Tensor) -> list[int]:
        if self.done:
            return []
        logits = logits.float()
        token = _pick(logits, self.sampling, self.generator)
        if token in self.fmt.end_ids:
            self.done = True
            return []
        self.ids.append(token)
        self.logprobs.append(float(logits.log_softmax(-1)[token]))
        self.done = len(self.ids) == self.max_new_tokens
        return [] if self.done else [token]

    def written(self) -> Written:
        text = self.fmt.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return Written(self.title, text, tuple(self.ids), sum(self.logprobs) / max(len(self.logprobs), 1),
                       check_poem(text, self.form), None, None, len(self.ids))


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """An index into `logits`: the largest, or drawn from the temperature's softmax cut to top_p."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, -1)
    ordered, order = probs.sort(descending=True)
    ordered = ordered * (ordered.cumsum(-1) - ordered < sampling.top_p)  # the smallest head holding top_p
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])


def _punctuation(specs, line: int) -> str:
    """，after a line that does not rhyme, 。after one that does and at the end."""
    return "。" if specs[line].rhyme or line == len(specs) - 1 else "，"


def rhyme_group(forms: list[Form], rhyme: str | None, n: int, sampling: Sampling) -> RhymeGroup | None:
    """The named rhyme group, checked against each form's rhymes, and the candidates' count against the sampling:
    a WritingError naming the parameter otherwise."""
    if n < 1:
        raise WritingError("n", f"n must be at least 1, got {n}")
    if n > 1 and sampling.temperature == 0:
        raise WritingError("n", "several candidates need sampling (a temperature above 0): greedy decoding writes "
                                "the same poem each time")
    if not rhyme:
        return None
    try:
        group = rhyme_table().group(rhyme)
    except ValueError as err:
        raise WritingError("rhyme", str(err)) from None
    for form in forms:
        if group.tone not in form.chain_tones.values():
            raise WritingError("rhyme", f"rhyme {group.name} is {group.tone}, but {form.name} rhymes "
                                        f"{'/'.join(sorted(set(form.chain_tones.values())))}")
    return group


def write_poems(model, fmt: PromptFormat, requests: list[tuple[Form, str]], n: int = 1, tones: str = "loose",
                rhyme: str | None = None, sampling: Sampling = Sampling(), batch_size: int = 8,
                progress: Progress | None = None, constrained: bool = True) -> list[list[Written]]:
    """`n` candidates for each (form, title), best first by mean log-probability. Without `constrained`, the model
    writes freely (tones and rhyme unused), with room for twice the form's characters and 16 tokens more."""
    group = rhyme_group([form for form, _ in requests], rhyme, n, sampling)
    if constrained:
        chars = char_vocab(tuple(token_texts(model, fmt)), model.get_output_embeddings().out_features,
                           str(model_device(model)))
        states = [PoemState(form, title, fmt, chars, tones, group, sampling, candidate)
                  for form, title in requests for candidate in range(n)]
    else:
        states = [FreeState(form, title, fmt, 2 * sum(form.line_lengths) + 16, sampling, candidate,
                            model_device(model)) for form, title in requests for candidate in range(n)]
    prompts = [fmt.writing_prompt_ids(state.form.name, state.title) for state in states]
    drive(model, fmt, states, prompts, batch_size, progress)
    written = [state.written() for state in states]
    return [sorted(written[i:i + n], key=lambda w: -w.mean_logprob) for i in range(0, len(written), n)]

