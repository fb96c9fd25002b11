"""train.choice_loss_weight: T-Few's rank-classification loss on emotion examples. Its value and gradients equal a
hand computation from the model's own logits; it makes a model pick by a cue in the poem where the LM loss alone
learns the options' prior; the collator builds its option rows; the config refuses it without emotion examples."""
from dataclasses import replace

import pytest
import torch
from test_loss import lora_model

from poetry.choice import option_logliks
from poetry.config import ConfigError, LoraConfig, ModelConfig, load_config
from poetry.data import Answer, Example
from poetry.feed import Collator, choice_examples, target_tokens
from poetry.loss import TargetOnlyLoss
from poetry.model import add_lora, load_model
from poetry.prompt import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def emotion_example(question, letter: str) -> Example:
    return Example(question, Answer(question.idx, {}, {}, letter), emotion_only=True)


def columns(fmt, examples: list[Example]) -> dict[str, list]:
    """What `dataset[indices]` gives the collator for these examples."""
    rows = [fmt.encode(example) for example in examples]
    return {key: [row[key] for row in rows] for key in rows[0]}


def by_hand(model, fmt, examples: list[Example]) -> torch.Tensor:
    """Each option scored alone through the model's own full logits, then the loss written out term by term."""
    total = 0.0
    for example in examples:
        question, prompt = example.question, fmt.emotion_prompt_ids(example.question)
        right = list(question.choose).index(example.answer.choose_id)
        scores, unlikely = [], []
        for k, text in enumerate(question.choose.values()):
            option = fmt.text_ids(text)
            logits = model(input_ids=torch.tensor([prompt + option])).logits[0].float().log_softmax(-1)
            token_logprobs = torch.stack([logits[len(prompt) - 1 + i, t] for i, t in enumerate(option)])
            scores.append(token_logprobs.sum() / len(text))
            if k != right:
                unlikely += [-torch.log(1 - p.exp()) for p in token_logprobs]
        total = total - torch.stack(scores).log_softmax(0)[right] + torch.stack(unlikely).mean()
    return total


def test_the_collator_adds_four_option_rows_per_emotion_example(fmt, sample_questions):
    examples = [Example(sample_questions[0], Answer(0, {}, {}, "B")), emotion_example(sample_questions[1], "C"),
                emotion_example(sample_questions[2], "A")]
    batch = Collator(fmt.tokenizer.pad_token_id, choice=True)(columns(fmt, examples))
    assert batch["input_ids"].shape[0] == 3 + 8 and choice_examples(batch) == 2
    assert batch["choice_right"].tolist() == [2, 0]
    assert batch["choice_chars"].tolist() == [[len(t) for t in q.choose.values()] for q in sample_questions[1:]]
    assert (batch["labels"][3:] == IGNORE_INDEX).all() and (batch["choice_labels"][:3] == IGNORE_INDEX).all()
    prompt = fmt.emotion_prompt_ids(sample_questions[2])
    for k, text in enumerate(sample_questions[2].choose.values()):  # the second example's rows, in letter order
        row = 3 + 4 + k
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == prompt + fmt.text_ids(text)
        learned = batch["choice_labels"][row][batch["choice_labels"][row] != IGNORE_INDEX].tolist()
        assert learned == fmt.text_ids(text)
    plain = Collator(fmt.tokenizer.pad_token_id)(columns(fmt, examples))
    assert plain["input_ids"].shape[0] == 3 and "choice_labels" not in plain
    assert target_tokens(plain) == target_tokens(batch)  # the option rows carry no LM targets


def test_choice_loss_and_gradients_equal_the_hand_computation(tiny_model_dir, fmt, sample_questions):
    model = lora_model(tiny_model_dir)
    examples = [Example(sample_questions[0], Answer(0, {}, {}, "B")), emotion_example(sample_questions[1], "C"),
                emotion_example(sample_questions[2], "A")]
    batch = Collator(fmt.tokenizer.pad_token_id, choice=True)(columns(fmt, examples))
    trained = [p for p in model.parameters() if p.requires_grad]

    _, _, got = TargetOnlyLoss(model, chunk_rows=7)(**batch)
    got_grads = torch.autograd.grad(got, trained)
    expected = by_hand(model, fmt, examples[1:])
    expected_grads = torch.autograd.grad(expected, trained)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert any(b.abs().sum() > 0 for b in expected_grads)


def test_the_lm_loss_is_the_same_with_option_rows_in_the_batch(tiny_model_dir, fmt, sample_questions):
    model = lora_model(tiny_model_dir)
    examples = [Example(sample_questions[0], Answer(0, {}, {}, "B")), emotion_example(sample_questions[1], "C")]
    with torch.no_grad():
        plain = TargetOnlyLoss(model)(**Collator(fmt.tokenizer.pad_token_id)(columns(fmt, examples)))
        with_options = TargetOnlyLoss(model)(**Collator(fmt.tokenizer.pad_token_id, choice=True)(
            columns(fmt, examples)))
    assert len(plain) == 2 and len(with_options) == 3
    assert with_options[1] == plain[1] and with_options[0].item() == pytest.approx(plain[0].item(), rel=1e-5)


# One option text is right in 80% of the training poems, and which one is right is told by the poem's first word.
FREQUENT, RARE = "离别的愁绪", "丰收的喜悦"
DISTRACTORS = ("边塞的豪情", "隐居的闲适")


def cued(question, rare: bool, n: int):
    """A poem whose first word says which of the two texts is right; the options in a fixed order, the rest equal."""
    cue = "稻熟" if rare else "柳别"
    options = dict(zip("ABCD", (FREQUENT, RARE, *DISTRACTORS), strict=True))
    return replace(question, idx=n, title=f"诗{n}", content=f"{cue}，{question.content}", choose=options)


def picks_by_the_cue(model, fmt, question) -> tuple[float, float]:
    """Held-out poems (half of each kind): (share answered with the frequent text, accuracy), as likelihood_norm."""
    held_out = [cued(question, rare=n % 2 == 1, n=100 + n) for n in range(8)]
    scores = option_logliks(model, fmt, held_out, batch_size=4)
    picked = [max(per, key=lambda k: per[k] / len(q.choose[k])) for q, per in zip(held_out, scores, strict=True)]
    right = ["B" if n % 2 else "A" for n in range(8)]
    return picked.count("A") / 8, sum(p == r for p, r in zip(picked, right, strict=True)) / 8


def trained(tiny_model_dir, fmt, question, choice_weight: float, steps: int = 15):
    torch.manual_seed(0)
    model = add_lora(load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32")),
                     LoraConfig(r=16, alpha=32, dropout=0.0))
    loss = TargetOnlyLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    examples = [emotion_example(cued(question, rare=n % 5 == 0, n=n), "B" if n % 5 == 0 else "A")
                for n in range(10)]  # 8 of 10 frequent
    batch = Collator(fmt.tokenizer.pad_token_id, choice=True)(columns(fmt, examples))
    for _ in range(steps):
        lm_sum, targets, choice_sum = loss(**batch)
        (lm_sum / targets + choice_weight * choice_sum / len(examples)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_the_choice_loss_teaches_the_cue_where_the_lm_loss_learns_the_prior(tiny_model_dir, fmt, sample_questions):
    """15 full-batch steps: the LM loss alone has learnt the frequent text (by 20 steps it reads the cue too, on
    these ten poems); with the choice loss the same steps already pick by the cue."""
    lm_only = picks_by_the_cue(trained(tiny_model_dir, fmt, sample_questions[0], 0.0), fmt, sample_questions[0])
    with_choice = picks_by_the_cue(trained(tiny_model_dir, fmt, sample_questions[0], 1.0), fmt, sample_questions[0])
    assert lm_only[0] >= 7 / 8  # the frequent text, whatever the cue
    assert with_choice[1] >= 7 / 8 and with_choice[1] - lm_only[1] >= 3 / 8


def test_the_choice_loss_needs_emotion_examples():
    assert load_config(None, ["data.emotion_examples=true", "train.choice_loss_weight=1"]).train.choice_loss_weight == 1
    with pytest.raises(ConfigError, match="train.choice_loss_weight: the choice loss trains on emotion examples"):
        load_config(None, ["train.choice_loss_weight=1"])  # emotion examples are off by default
    with pytest.raises(ConfigError, match="train.choice_loss_weight: must be 0 .off. or positive"):
        load_config(None, ["train.choice_loss_weight=-1"])


def test_an_unlikelihood_term_never_takes_the_log_of_zero(tiny_model_dir, fmt, sample_questions):
    model = lora_model(tiny_model_dir)
    batch = Collator(fmt.tokenizer.pad_token_id, choice=True)(columns(fmt, [emotion_example(sample_questions[0], "A")]))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e4)  # near-certain tokens: p rounds to 1 in fp32
        _, _, value = TargetOnlyLoss(model)(**batch)
    assert torch.isfinite(value)
