"""What the loop is fed: the run's tokenised questions (TaskData), a length-bucketed batch sampler and a
dynamic-padding collator.

Training questions are re-drawn each epoch (fresh emotion options) and tokenised when first asked for; validation
questions are fixed. Bucketing sorts examples of similar length into the same batch, so padding stays small without
giving up randomness: examples are shuffled, cut into mega-buckets of `bucket_multiplier` batches, sorted by length
inside each bucket, batched, and the batch order is shuffled again. The most expensive batch goes first, so an
out-of-memory shows at step 1 rather than an hour in.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import DataConfig
from .data import Example, Poem, QuestionBuilder, validation_examples
from .data.mix import load_training_poems
from .data.questions import validation_writing_examples
from .prompt import IGNORE_INDEX, PromptFormat, tokenize_examples


class TaskData:
    """Training questions are re-drawn each epoch (fresh emotion options), so each epoch is tokenised when first
    asked for; validation questions are fixed (epoch 0 draw) so their curves are comparable across steps."""

    def __init__(self, cfg: DataConfig, fmt: PromptFormat, seed: int):
        self.cfg, self.fmt = cfg, fmt
        self.mixture, self.val_poems = load_training_poems(cfg, seed)
        self.train_poems = self.mixture.poems
        self.builder = QuestionBuilder(self.train_poems, seed=seed, max_items=cfg.max_items,
                                       emotion_examples=cfg.emotion_examples, writing_examples=cfg.writing_examples)
        self._epochs: dict = {}
        self.dropped_train: dict[int, int] = {}  # epoch -> its questions longer than data.max_len, once tokenised

    def _built(self, epoch: int) -> list[tuple[Example, Poem]]:
        """The epoch's questions, each with its poem: those of the poems the mixture draws for it."""
        return [(example, poem) for poem in self.mixture.draw(epoch) for example in self.builder.examples(poem, epoch)]

    def train_epoch(self, epoch: int):
        """Tokenised training examples of `epoch` (columns input_ids, labels, length), without those longer than
        data.max_len (counted in dropped_train[epoch])."""
        if epoch not in self._epochs:
            examples = [example for example, _ in self._built(epoch)]
            self._epochs = {epoch: tokenize_examples(examples, self.fmt, self.cfg.max_len)}
            self.dropped_train[epoch] = len(examples) - len(self._epochs[epoch])
        return self._epochs[epoch]

    def describe_rows(self, epoch: int, rows: list[int]) -> list[str]:
        """What rows of `train_epoch(epoch)` are, to name them in a message: the poem's title and source."""
        built = self._built(epoch)
        dataset = self.train_epoch(epoch)
        named = [built[dataset[row]["example"]] for row in rows]
        return [f"《{example.question.title}》 {poem.source or ''}".strip() for example, poem in named]

    @cached_property
    def val_examples(self) -> list[Example]:
        return validation_examples(self.val_poems, self.builder.seed, self.cfg.max_items)

    @cached_property
    def val_dataset(self):
        return tokenize_examples(self.val_examples, self.fmt, self.cfg.max_len) if self.val_examples else None

    @cached_property
    def val_writing_examples(self) -> list[Example]:
        """The held-out poems' writing examples (data.writing_examples): none when off."""
        return validation_writing_examples(self.val_poems) if self.cfg.writing_examples else []

    @cached_property
    def val_writing_dataset(self):
        examples = self.val_writing_examples
        return tokenize_examples(examples, self.fmt, self.cfg.max_len) if examples else None

    @property
    def dropped_val(self) -> int:
        """Validation questions longer than data.max_len, left out of val_dataset (tokenised by asking)."""
        return len(self.val_examples) - (len(self.val_dataset) if self.val_dataset is not None else 0)


class LengthBucketBatchSampler:
    """This rank's micro-batches of indices, one epoch at a time; every example exactly once per epoch.

    The epoch is cut into global batches of `batch_size` x `num_replicas` examples, and rank r takes rows r, r+W,
    r+2W, ... of each (a batch is sorted longest first, so the ranks get alike lengths). The global batches depend
    on that product only: 2 ranks of batch b see exactly the batches 1 process of batch 2b sees, and a step's
    gradient is the same. A batch with fewer rows than ranks leaves a rank an empty part, which the Collator turns
    into a row without targets: that rank still joins the gradient all-reduce and adds nothing to it.
    `max_tokens` bounds each rank's padded tokens instead of its row count.
    `state_dict()` records (epoch, batches consumed), so a resume continues mid-epoch at the same batch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, bucket_multiplier: int = 32,
                 max_tokens: int = 0, num_replicas: int = 1, rank: int = 0):
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths, self.seed = list(lengths), seed
        self.global_size = batch_size * num_replicas
        self.bucket_size = self.global_size * bucket_multiplier
        self.max_tokens, self.num_replicas, self.rank = max_tokens, num_replicas, rank
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, lengths: list[int] | None = None) -> None:
        """Start an epoch; `lengths` change when the epoch's questions are re-drawn."""
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch
        if lengths is not None:
            self.lengths = list(lengths)

    def _cost(self, batch: list[int]) -> int:
        return len(batch) * max(self.lengths[i] for i in batch)  # padded tokens over all ranks

    def _rows_per_rank(self, rows: int) -> int:
        return -(-rows // self.num_replicas)  # rank 0's share, the largest

    def _split(self, bucket: list[int]) -> list[list[int]]:
        if not self.max_tokens:
            return [bucket[i:i + self.global_size] for i in range(0, len(bucket), self.global_size)]
        batches, current = [], []
        for index in bucket:  # longest first, so the first example of a batch fixes its padded length
            rows = self._rows_per_rank(len(current) + 1)
            if rows > 1 and rows * self.lengths[current[0]] > self.max_tokens:  # one row a rank, whatever its length
                batches.append(current)
                current = []
            current.append(index)
        return batches + [current] if current else batches

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches over all ranks, the costliest first (an out-of-memory shows at step 1)."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.bucket_size):
            bucket = sorted(order[start:start + self.bucket_size], key=lambda i: -self.lengths[i])
            batches += self._split(bucket)
        costliest = max(range(len(batches)), key=lambda b: self._cost(batches[b]))
        rest = batches[:costliest] + batches[costliest + 1:]
        rng.shuffle(rest)
        return [batches[costliest]] + rest

    def rank_batches(self) -> list[list[int]]:
        """This rank's part of each global batch (empty when the batch has fewer rows than ranks)."""
        return [batch[self.rank::self.num_replicas] for batch in self.global_batches()]

    def __len__(self) -> int:
        return len(self.global_batches())

    def __iter__(self):
        batches = self.rank_batches()
        while self.consumed < len(batches):
            self.consumed += 1
            yield batches[self.consumed - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]


@dataclass
class Collator:
    """Right-pads a list of tokenised examples to the batch's longest (rounded up to a multiple, which lets tensor
    cores use aligned shapes); labels are padded with IGNORE_INDEX so padding is never learned. No rows (a rank's
    empty part of a small global batch) give one pad-token row without targets: a forward and backward that add
    nothing, which the rank needs to join the step's gradient all-reduce.

    With `choice` (train.choice_loss_weight > 0), each emotion example also brings four rows after the batch's own:
    its prompt followed by each option, whose tokens are the targets of `choice_labels` (the choice loss's, never
    the LM loss's), with `choice_right` (the right option's index) and `choice_chars` (each option's characters).
    They cost four forwards of the poem's length per emotion example.

    Not transformers' DataCollatorForSeq2Seq, which pads on the tokenizer's side (left for Gemma and Llama), wants a
    list of rows without the `length` column, and took 1.8x as long (tests/test_feed.py compares them)."""

    pad_token_id: int
    pad_to_multiple_of: int = 8
    choice: bool = False

    def __call__(self, columns: dict[str, list]) -> dict[str, torch.Tensor]:
        """`columns` as `dataset[indices]` returns them: {"input_ids": [[...], ...], "labels": [[...], ...]}."""
        rows = [(ids, labels, None) for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True)]
        rows = rows or [([self.pad_token_id], [IGNORE_INDEX], None)]
        options = option_rows(columns) if self.choice and columns["input_ids"] else None
        if options:
            rows += [(ids, None, targets) for ids, targets in options["rows"]]
        longest = max(len(ids) for ids, _, _ in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
                 "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)}
        if options:
            batch["choice_labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            batch["choice_right"] = torch.tensor(options["right"], dtype=torch.long)
            batch["choice_chars"] = torch.tensor(options["chars"], dtype=torch.float)
        for i, (ids, labels, choice_labels) in enumerate(rows):
            batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, :len(ids)] = 1
            if labels is not None:
                batch["labels"][i, :len(ids)] = torch.tensor(labels)
            if choice_labels is not None:
                batch["choice_labels"][i, :len(ids)] = torch.tensor(choice_labels)
        return batch


def option_rows(columns: dict[str, list]) -> dict | None:
    """For each emotion example among `columns`' rows (choice_right >= 0): its prompt (the ids before its first
    target) followed by each of its options, as (ids, labels on the option's tokens) rows, four an example in
    letter order; with each example's right index and options' characters. None when no row is one."""
    rows, right, chars = [], [], []
    for ids, labels, options, lengths, correct in zip(columns["input_ids"], columns["labels"], columns["choice_ids"],
                                                      columns["choice_chars"], columns["choice_right"], strict=True):
        if correct < 0:
            continue
        prompt = ids[:next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]
        rows += [(prompt + option, [IGNORE_INDEX] * len(prompt) + option) for option in options]
        right.append(correct)
        chars.append(lengths)
    return {"rows": rows, "right": right, "chars": chars} if right else None


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def choice_examples(batch: dict[str, torch.Tensor]) -> int:
    """Emotion examples that carry the choice loss (their option rows: Collator with `choice`)."""
    return len(batch["choice_right"]) if "choice_right" in batch else 0
