"""What the loop is fed: the run's tokenised questions, the length-bucketed sampler and the collator."""
import json

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from poetry.config import DataConfig
from poetry.data import DataError
from poetry.feed import Collator, LengthBucketBatchSampler, TaskData, target_tokens
from poetry.prompt import IGNORE_INDEX, PromptFormat

LENGTHS = [(i * 37) % 101 + 5 for i in range(103)]


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def cost(batch):
    """Padded tokens."""
    return len(batch) * max(LENGTHS[i] for i in batch)


def test_every_example_exactly_once_per_epoch():
    sampler = LengthBucketBatchSampler(LENGTHS, batch_size=8, seed=1, bucket_multiplier=4)
    for epoch in range(3):
        flat = [i for batch in epoch_batches(sampler, epoch) for i in batch]
        assert sorted(flat) == list(range(len(LENGTHS)))


def test_buckets_reduce_padding_and_costliest_batch_first():
    sampler = LengthBucketBatchSampler(LENGTHS, batch_size=8, seed=1, bucket_multiplier=4)
    batches = epoch_batches(sampler, 0)

    assert cost(batches[0]) == max(map(cost, batches))
    padded = sum(map(cost, batches))
    unsorted = sum(len(b) * max(LENGTHS[i] for i in b)
                   for b in (list(range(k, min(k + 8, 103))) for k in range(0, 103, 8)))
    assert padded < 0.8 * unsorted


def test_order_is_seeded_and_changes_per_epoch():
    a = LengthBucketBatchSampler(LENGTHS, 8, seed=1)
    b = LengthBucketBatchSampler(LENGTHS, 8, seed=1)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) != epoch_batches(b, 0)
    assert epoch_batches(LengthBucketBatchSampler(LENGTHS, 8, seed=2), 0) != epoch_batches(b, 0)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_batches_one_process_of_the_whole_batch_would_see(world):
    """W ranks of batch b run, step by step, the batches of 1 process of batch b*W: the same gradients."""
    samplers = [LengthBucketBatchSampler(LENGTHS, 4, seed=4, num_replicas=world, rank=r) for r in range(world)]
    single = LengthBucketBatchSampler(LENGTHS, 4 * world, seed=4)
    for epoch in range(2):
        per_rank = [epoch_batches(s, epoch) for s in samplers]
        whole = epoch_batches(single, epoch)
        assert [len(batches) for batches in per_rank] == [len(whole)] * world == [len(s) for s in samplers]
        for step, batch in enumerate(whole):
            parts = [batches[step] for batches in per_rank]
            assert sorted(i for part in parts for i in part) == sorted(batch)  # each example once, on one rank
            assert all(len(part) <= 4 for part in parts)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        rank_costs = [cost(batches[0]) for batches in per_rank if batches[0]]
        assert cost(whole[0]) == max(map(cost, whole)) and max(rank_costs) == max(  # every rank's OOM at step 1
            cost(part) for batches in per_rank for part in batches if part)


def test_a_batch_smaller_than_the_world_leaves_a_rank_a_row_without_targets():
    lengths = [30, 20, 10, 40, 50]  # one bucket: batches of 4 and 1, so rank 1 has nothing in the second
    parts = [epoch_batches(LengthBucketBatchSampler(lengths, 2, num_replicas=2, rank=r), 0) for r in range(2)]
    assert [list(map(len, p)) for p in parts] == [[2, 1], [2, 0]]
    filler = Collator(pad_token_id=7)({"input_ids": [], "labels": []})
    assert filler["input_ids"][0, 0] == 7 and filler["attention_mask"][0].tolist() == [1] + [0] * 7
    assert target_tokens(filler) == 0


@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_bounds_each_ranks_padded_tokens(world):
    samplers = [LengthBucketBatchSampler(LENGTHS, 1, seed=0, bucket_multiplier=200, max_tokens=300,
                                         num_replicas=world, rank=r) for r in range(world)]
    per_rank = [epoch_batches(s, 0) for s in samplers]
    parts = [part for batches in per_rank for part in batches]
    assert all(cost(part) <= 300 or len(part) == 1 for part in parts if part)
    assert sorted(i for part in parts for i in part) == list(range(len(LENGTHS)))
    assert max(map(len, parts)) > 1


def test_resume_mid_epoch_continues_at_the_same_batch():
    sampler = LengthBucketBatchSampler(LENGTHS, 8, seed=3)
    sampler.set_epoch(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    resumed = LengthBucketBatchSampler(LENGTHS, 8, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert seen + list(resumed) == epoch_batches(LengthBucketBatchSampler(LENGTHS, 8, seed=3), 2)
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(sampler)  # a new epoch starts from its first batch


def test_collator_pads_dynamically_to_a_multiple():
    rows = {"input_ids": [[5, 6, 7], [8] * 10], "labels": [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 5 + [8] * 5]}
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all() and batch["labels"][1, 5:10].tolist() == [8] * 5
    assert target_tokens(batch) == 2 + 5


def test_collator_keeps_exact_multiple():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)({"input_ids": [[1] * 8], "labels": [[1] * 8]})
    assert batch["input_ids"].shape == (1, 8) and torch.equal(batch["attention_mask"], torch.ones(1, 8).long())


@pytest.fixture(scope="module")
def epoch(tokenizer, few_poems):
    """One epoch of tokenised training questions of the tiny model: columns input_ids, labels, length."""

    return TaskData(DataConfig(train=str(few_poems), val_fraction=0), PromptFormat(tokenizer), seed=0).train_epoch(0)


def as_rows(columns: dict) -> list[dict]:
    """`dataset[indices]` columns as the list of examples transformers' collators take."""
    pairs = zip(columns["input_ids"], columns["labels"], strict=True)
    return [{"input_ids": ids, "labels": labels} for ids, labels in pairs]


def library_collator(tokenizer):
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX)


def test_collator_equals_transformers_on_a_right_padding_tokenizer(tokenizer, epoch):
    """With Qwen's tokenizer (padding_side right) DataCollatorForSeq2Seq gives the same tensors, dtypes included."""
    columns = epoch[[0, 3, 5, 7]]
    ours, theirs = Collator(tokenizer.pad_token_id)(columns), library_collator(tokenizer)(as_rows(columns))
    assert tokenizer.padding_side == "right" and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) and ours[key].dtype == theirs[key].dtype for key in ours)


def test_transformers_collator_pads_on_the_tokenizers_side(tiny_model_dir, epoch):
    """Why Collator stays: transformers' collator pads on the tokenizer's side, left for Gemma's and Llama's
    tokenizers (Gemma-3-270M's included), and it passes the sampler's `length` column on into the batch, where
    the loss would reject it; ours right-pads whatever the tokenizer and takes `dataset[indices]` as it is."""
    left = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    columns = epoch[[0, 3, 5, 7]]
    ours, theirs = Collator(left.pad_token_id)(columns), library_collator(left)(as_rows(columns))
    shorter = ours["attention_mask"].sum(1) < ours["attention_mask"].size(1)
    assert shorter.any()
    assert (ours["attention_mask"][:, 0] == 1).all() and (theirs["attention_mask"][shorter, 0] == 0).all()
    assert torch.equal(ours["attention_mask"].sum(1), theirs["attention_mask"].sum(1))
    assert "length" in library_collator(left)([epoch[i] for i in range(4)])



def task_data(few_poems, tokenizer, max_len: int) -> TaskData:
    return TaskData(DataConfig(train=str(few_poems), val_fraction=0.3, max_len=max_len), PromptFormat(tokenizer), 0)


def test_overlong_questions_are_counted(few_poems, tokenizer):
    whole = task_data(few_poems, tokenizer, max_len=100_000)
    train_lengths, val_lengths = list(whole.train_epoch(0)["length"]), list(whole.val_dataset["length"])
    assert whole.dropped_train == {0: 0} and whole.dropped_val == 0
    limit = sorted(train_lengths + val_lengths)[len(train_lengths + val_lengths) // 2]  # about half too long
    cut = task_data(few_poems, tokenizer, max_len=limit)
    assert len(cut.train_epoch(0)) + cut.dropped_train[0] == len(train_lengths)
    assert cut.dropped_train == {0: sum(n > limit for n in train_lengths)} and cut.dropped_train[0] > 0
    assert cut.dropped_val == sum(n > limit for n in val_lengths)
    assert len(cut.val_dataset) + cut.dropped_val == len(cut.val_examples)


def test_a_fold_that_leaves_no_training_poems_is_named(tokenizer, tmp_path):
    one = tmp_path / "one.json"
    poem = {"title": "静夜思", "content": "床前明月光，疑是地上霜。", "keywords": {},
            "trans": "床前洒满月光，好像地上结了霜。", "emotion": "思乡"}
    one.write_text(json.dumps([poem], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"no training poems left after the validation split \(data.folds=2, "
                                        r"data.fold=0\)"):
        TaskData(DataConfig(train=str(one), folds=2, fold=0), PromptFormat(tokenizer), seed=0)
