"""A run's training poems: one or several sources (data.train), the validation split of the primary one, the check
against data.exclude, and each epoch's draw by weight.

Only the first source is split: its held-out poems are the validation set, so the curves of a run that adds an
imported corpus stay comparable with the curves of one that does not. The other sources only train.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from ..config import DataConfig
from .errors import DataError, Issue
from .io import load_poems
from .overlap import OverlapIndex
from .questions import split_poems
from .records import Poem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    path: str
    weight: float
    poems: list[Poem]  # its training poems (the primary's after the split)

    @property
    def per_epoch(self) -> int:
        """Poems drawn from it each epoch: each poem int(weight) times, and a fresh share of the rest."""
        whole, part = divmod(self.weight, 1.0)
        return int(whole) * len(self.poems) + round(part * len(self.poems))


class Mixture:
    """The sources' training poems, drawn by weight each epoch, reproducibly from the seed: a weight of 1 takes
    every poem once, in file order; 0.2 a fifth of them, another fifth each epoch; 2 every poem twice."""

    def __init__(self, sources: list[Source], seed: int):
        self.sources, self.seed = sources, seed

    @property
    def poems(self) -> list[Poem]:
        """Every training poem once: the pool the emotion distractors are drawn from."""
        return [poem for source in self.sources for poem in source.poems]

    def draw(self, epoch: int) -> list[Poem]:
        drawn = []
        for number, source in enumerate(self.sources):
            whole, part = divmod(source.weight, 1.0)
            rng = random.Random(f"{self.seed}:{number}:{epoch}")
            some = sorted(rng.sample(range(len(source.poems)), round(part * len(source.poems))))
            drawn += source.poems * int(whole) + [source.poems[i] for i in some]
        return drawn

    def describe(self) -> str:
        """The run's start line on its sources: each one's poems, weight and share of an epoch."""
        total = sum(source.per_epoch for source in self.sources) or 1
        return "; ".join(f"{source.path}: {len(source.poems)} poems x {source.weight:g} = {source.per_epoch} an "
                         f"epoch ({100 * source.per_epoch / total:.0f}%)" for source in self.sources)


def _source_of(poem: Poem) -> tuple[str, int | None]:
    """(file, record) from a poem's `file:record` source."""
    file, _, number = (poem.source or "").rpartition(":")
    return (file, int(number)) if number.isdigit() else (poem.source or "", None)


def check_exclusions(poems: list[Poem], cfg: DataConfig) -> int:
    """Stop on a poem of the data that data.exclude holds (unless data.allow_overlap): one issue per poem, naming
    the excluded poem and what they share. Returns how many overlap."""
    if not cfg.exclude:
        return 0
    index = OverlapIndex.from_paths(cfg.exclude)
    issues = []
    for poem in poems:
        if found := index.find(poem.title, poem.author, poem.content):
            file, number = _source_of(poem)
            issues.append(Issue(file, number, None, f"《{poem.title}》 is an excluded poem: {found}"))
    if issues and not cfg.allow_overlap:
        raise DataError(issues + [Issue("data.exclude", None, None, f"{len(issues)} training poems are in "
                                        f"{', '.join(cfg.exclude)}; remove them, or set data.allow_overlap=true")])
    if issues:
        log.warning("data.allow_overlap: training on %d poems found in data.exclude (first: %s)", len(issues),
                    issues[0])
    return len(issues)


def load_training_poems(cfg: DataConfig, seed: int) -> tuple[Mixture, list[Poem]]:
    """(the training mixture, the validation poems): every source loaded and validated, the primary split, and
    what trains checked against data.exclude (the held-out poems may be in it: they are never trained on)."""
    loaded = []
    for source in cfg.sources:
        part = load_poems(source.path, on_invalid=cfg.on_invalid)
        if part.skipped_records:
            log.warning("%s: %s", source.path, part.summary("poems"))
        loaded.append(part.records)
    primary = cfg.sources[0]
    train, val = split_poems(loaded[0], cfg.val_fraction, cfg.split_seed, cfg.folds, cfg.fold)
    check_exclusions(train + [poem for poems in loaded[1:] for poem in poems], cfg)  # what trains, not validation
    sources = [Source(primary.path, primary.weight, train)]
    sources += [Source(s.path, s.weight, poems) for s, poems in zip(cfg.sources[1:], loaded[1:], strict=True)]
    if not train and len(sources) == 1:
        split = f"data.folds={cfg.folds}, data.fold={cfg.fold}" if cfg.folds else \
            f"data.val_fraction={cfg.val_fraction}"
        raise DataError([Issue(primary.path, None, None, f"no training poems left after the validation split "
                                                         f"({split})")])
    mixture = Mixture(sources, seed)
    if not any(source.per_epoch for source in sources):
        raise DataError([Issue("data.train", None, None, f"the weights draw no poem an epoch: {mixture.describe()}")])
    return mixture, val
