"""The run's data: questions longer than data.max_len are left out and counted, for the run's start line."""
from poetry.config import DataConfig
from poetry.dataset import TaskData
from poetry.prompt import PromptFormat


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
