"""The task's data for one run: split poems, per-epoch training questions, tokenised datasets, validation set."""
from __future__ import annotations

import logging
from functools import cached_property

from .config import DataConfig
from .data import DataError, Example, Issue, QuestionBuilder, load_poems, split_poems, validation_examples
from .prompt import PromptFormat, tokenize_examples

log = logging.getLogger(__name__)


class TaskData:
    """Training questions are re-drawn each epoch (fresh emotion options), so each epoch is tokenised when first
    asked for; validation questions are fixed (epoch 0 draw) so their curves are comparable across steps."""

    def __init__(self, cfg: DataConfig, fmt: PromptFormat, seed: int):
        self.cfg, self.fmt = cfg, fmt
        loaded = load_poems(cfg.train, on_invalid=cfg.on_invalid)
        if loaded.skipped_records:
            log.warning("%s: %s", cfg.train, loaded.summary("poems"))
        self.train_poems, self.val_poems = split_poems(loaded.records, cfg.val_fraction, cfg.split_seed)
        if not self.train_poems:
            raise DataError([Issue(cfg.train, None, None, f"no training poems left after the validation split "
                                                          f"(data.val_fraction={cfg.val_fraction})")])
        self.builder = QuestionBuilder(self.train_poems, seed=seed, max_items=cfg.max_items)
        self._epochs: dict = {}
        self.dropped_train: dict[int, int] = {}  # epoch -> its questions longer than data.max_len, once tokenised

    def train_epoch(self, epoch: int):
        """Tokenised training examples of `epoch` (columns input_ids, labels, length), without those longer than
        data.max_len (counted in dropped_train[epoch])."""
        if epoch not in self._epochs:
            examples = self.builder.epoch(epoch)
            self._epochs = {epoch: tokenize_examples(examples, self.fmt, self.cfg.max_len)}
            self.dropped_train[epoch] = len(examples) - len(self._epochs[epoch])
        return self._epochs[epoch]

    @cached_property
    def val_examples(self) -> list[Example]:
        return validation_examples(self.val_poems, self.builder.seed, self.cfg.max_items)

    @cached_property
    def val_dataset(self):
        return tokenize_examples(self.val_examples, self.fmt, self.cfg.max_len) if self.val_examples else None

    @property
    def dropped_val(self) -> int:
        """Validation questions longer than data.max_len, left out of val_dataset (tokenised by asking)."""
        return len(self.val_examples) - (len(self.val_dataset) if self.val_dataset is not None else 0)
