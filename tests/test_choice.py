"""Picking choose_id: option likelihoods and channel scores equal a plain full-sequence computation in every family;
a model trained to prefer an option gets it picked; calibration, length normalisation, PMI and the channel term do
what they say; the answer's format and values do not depend on the method."""
import copy
from dataclasses import replace

import pytest
import torch

from poetry import choice
from poetry.builtin.tiny import ARCHITECTURES
from poetry.choice import answer_questions, letter_pick, option_logliks
from poetry.config import ModelConfig
from poetry.data import OPTION_LETTERS, Question, check_submission
from poetry.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = {"A": "惜别的怅惘", "B": "欢快的重逢", "C": "豪迈的报国之志", "D": "闲适"}


def full_sequence_logliks(model, fmt, question: Question) -> dict[str, float]:
    """Each option scored alone: prompt and option in one sequence, no cache, no padding."""
    prompt = fmt.emotion_prompt_ids(question)
    scores = {}
    with torch.no_grad():
        for letter, text in question.choose.items():
            option = fmt.text_ids(text)
            logits = model(input_ids=torch.tensor([prompt + option])).logits[0].float().log_softmax(-1)
            scores[letter] = sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(option))
    return scores


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_option_logliks_equal_the_full_sequence_computation(family_models, fmt, sample_questions, arch, batch_size):
    """Several questions' options in one forward, rows of different lengths padded on the right; Gemma's sliding
    window (24 slots) is far shorter than the prompt. A question without options gets none."""
    model = family_models[arch]
    one_token = {**OPTIONS, "D": "悲"}
    assert len(fmt.text_ids("悲")) == 1
    asked = [*sample_questions, replace(sample_questions[0], choose=OPTIONS), replace(sample_questions[1], choose={}),
             replace(sample_questions[1], choose=one_token)]
    got = option_logliks(model, fmt, asked, batch_size)
    assert len(got) == len(asked) and got[4] == {}
    for question, scores in zip(asked, got, strict=True):
        if question.choose:
            assert list(scores) == list(OPTION_LETTERS)
            assert scores == pytest.approx(full_sequence_logliks(model, fmt, question), abs=1e-4)


def test_a_questions_prompt_is_fed_once_for_its_four_options(family_models, fmt, sample_questions):
    """Its options follow the prompt's keys and values, one forward for the four: not four rows of prompt and
    option."""
    model, question = family_models["qwen3"], sample_questions[0]
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: fed.append(args[0].numel()))
    try:
        option_logliks(model, fmt, [question], batch_size=1)
    finally:
        hook.remove()
    longest = max(len(fmt.text_ids(text)) for text in question.choose.values())
    assert len(fed) == 2 and sum(fed) <= len(fmt.emotion_prompt_ids(question)) + len(OPTION_LETTERS) * longest


def test_option_priors_score_each_distinct_text_once_after_the_cue_alone(family_models, fmt, sample_questions,
                                                                          monkeypatch):
    model, scored = family_models["gemma3"], []
    continuation_logliks = choice.continuation_logliks

    def counting(model, fmt, pairs, rows):
        scored.extend(pairs)
        return continuation_logliks(model, fmt, pairs, rows)

    monkeypatch.setattr(choice, "continuation_logliks", counting)
    twice = [*sample_questions, sample_questions[0]]  # the first poem's options twice
    texts = [text for q in twice for text in q.choose.values()]
    priors = choice.option_priors(model, fmt, texts, batch_size=2)
    assert sorted(priors) == sorted(set(texts)) and len(scored) == len(set(texts)) < len(texts)
    cue = fmt.emotion_cue_ids()
    blank = replace(sample_questions[0], choose={"A": texts[0], "B": texts[5]})
    monkeypatch.setattr(fmt, "emotion_prompt_ids", lambda question: cue)  # the full computation after the cue
    expected = full_sequence_logliks(model, fmt, blank)
    assert priors[texts[0]] == pytest.approx(expected["A"], abs=1e-4)
    assert priors[texts[5]] == pytest.approx(expected["B"], abs=1e-4)


def test_pmi_takes_each_options_prior_away_per_character(family_models, fmt, sample_questions, monkeypatch):
    """(log P(o | poem, cue) - λ log P(o | cue)) / characters: the option likely whatever the poem loses its lead."""
    question = replace(sample_questions[0], choose={"A": "思乡之情", "B": "喜悦", "C": "孤独寂寞", "D": "闲适"})
    monkeypatch.setattr(choice, "option_logliks", lambda *args: [{"A": -4.0, "B": -3.0, "C": -6.0, "D": -5.0}])
    monkeypatch.setattr(choice, "option_priors",
                        lambda *args: {"思乡之情": -2.0, "喜悦": -6.0, "孤独寂寞": -3.0, "闲适": -4.0})
    model = family_models["qwen3"]

    def pick(method, weight=1.0):
        return letter_pick(model, fmt, [question], method, 4, prior_weight=weight)(0, {})

    assert pick("likelihood_norm") == "A"  # -1.0 a character, against B's -1.5
    assert pick("likelihood_pmi") == "B"  # (-3 + 6) / 2 = 1.5 against A's (-4 + 2) / 4 = -0.5
    assert pick("likelihood_pmi", 0.0) == pick("likelihood_norm")
    assert pick("likelihood_pmi", 0.1) == "A"  # (-4 + 0.2) / 4 = -0.95 against B's (-3 + 0.6) / 2 = -1.2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_channel_scores_equal_the_full_sequence_computation(family_models, fmt, sample_questions, arch):
    """log P(title and poem | a sentence naming the option), four rows of different contexts and one long
    continuation each, several questions' rows in one forward; Gemma's window (24 slots) is shorter than the poem."""
    model = family_models[arch]
    asked = [*sample_questions[:2], replace(sample_questions[1], choose={}), replace(sample_questions[0], title="")]
    got = choice.option_channel_logliks(model, fmt, asked, batch_size=2)
    assert got[2] == {} and len(got) == len(asked)
    with torch.no_grad():
        for question, scores in zip(asked, got, strict=True):
            for letter, text in question.choose.items():
                head, poem = fmt.channel_ids(question, text)
                assert len(poem) > 24
                logits = model(input_ids=torch.tensor([head + poem])).logits[0].float().log_softmax(-1)
                expected = sum(float(logits[len(head) - 1 + i, t]) for i, t in enumerate(poem))
                assert scores[letter] == pytest.approx(expected, abs=1e-4)
    assert len({round(s, 3) for s in got[0].values()}) == 4  # each option explains the poem differently
    assert fmt.channel_ids(asked[3], "喜悦")[1] == fmt.text_ids(asked[3].content)  # no title: the poem alone


def test_pmi_channel_adds_the_weighted_channel_score_to_pmi(family_models, fmt, sample_questions, monkeypatch):
    """(log P(o | poem, cue) - λ log P(o | cue)) / characters + β log P(poem | o): the option that explains the poem
    best can overturn PMI's pick."""
    question = replace(sample_questions[0], choose={"A": "思乡之情", "B": "喜悦", "C": "孤独寂寞", "D": "闲适"})
    monkeypatch.setattr(choice, "option_logliks", lambda *args: [{"A": -4.0, "B": -3.0, "C": -6.0, "D": -5.0}])
    monkeypatch.setattr(choice, "option_priors",
                        lambda *args: {"思乡之情": -2.0, "喜悦": -6.0, "孤独寂寞": -3.0, "闲适": -4.0})
    monkeypatch.setattr(choice, "option_channel_logliks",
                        lambda *args: [{"A": -100.0, "B": -110.0, "C": -104.0, "D": -120.0}])
    model = family_models["qwen3"]

    def pick(channel_weight):
        return letter_pick(model, fmt, [question], "likelihood_pmi_channel", 4, prior_weight=1.0,
                           channel_weight=channel_weight)(0, {})

    assert pick(0.0) == letter_pick(model, fmt, [question], "likelihood_pmi", 4)(0, {}) == "B"  # 1.5 against -0.5
    assert pick(0.1) == "B"  # 1.5 - 11 = -9.5 against A's -0.5 - 10 = -10.5
    assert pick(0.3) == "A"  # -0.5 - 30 = -30.5 against B's 1.5 - 33 = -31.5


def trained_to_prefer(model, fmt, question: Question, letter: str, steps: int = 25):
    """A copy of `model` whose only training was to write option `letter`'s text after the emotion prompt."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = fmt.emotion_prompt_ids(question) + fmt.text_ids(question.choose[letter])
    labels = [-100] * len(fmt.emotion_prompt_ids(question)) + ids[len(fmt.emotion_prompt_ids(question)):]
    for _ in range(steps):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", ["likelihood", "likelihood_norm"])
def test_likelihood_picks_the_option_a_model_was_trained_to_prefer(tiny_model_dir, fmt, sample_questions, method):
    base = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    question = replace(sample_questions[0], choose=OPTIONS)
    for letter in ("B", "D"):
        model = trained_to_prefer(base, fmt, question, letter)
        (decoded,) = answer_questions(model, fmt, [question], max_new_tokens=4, method=method)
        assert decoded.answer.choose_id == letter


def test_the_method_changes_choose_id_only(family_models, fmt, sample_questions):
    model = family_models["qwen3"]
    answers = {method: [d.answer for d in answer_questions(model, fmt, sample_questions, 2, 4, method=method)]
               for method in choice.METHODS}
    for method, got in answers.items():
        check_submission(sample_questions, got, f"<{method}>")
        assert [replace(a, choose_id=None) for a in got] == [replace(a, choose_id=None) for a in answers["letter"]]


def test_calibration_subtracts_the_content_free_prior(family_models, fmt, sample_questions, monkeypatch):
    prior = {"A": -0.1, "B": -3.0, "C": -3.0, "D": -3.0}
    monkeypatch.setattr(choice, "content_free_prior", lambda *args: prior)
    pick = letter_pick(family_models["qwen3"], fmt, sample_questions, "letter_calibrated", 4)
    assert pick(0, {"A": -0.5, "B": -1.5, "C": -2.5, "D": -3.5}) == "B"  # A's lead is its prior
    assert letter_pick(family_models["qwen3"], fmt, sample_questions, "letter", 4)(0, {"A": -0.5, "B": -1.5}) == "A"


def test_the_content_free_prior_is_a_distribution_over_the_letters(family_models, fmt):
    prior = choice.content_free_prior(family_models["qwen3"], fmt, 4)
    assert list(prior) == list(OPTION_LETTERS)
    assert sum(torch.tensor(list(prior.values())).exp()) == pytest.approx(1.0, abs=1e-5)


def test_length_normalisation_is_per_character(family_models, fmt, sample_questions, monkeypatch):
    question = replace(sample_questions[0], choose={"A": "悲", "B": "欢快的重逢", "C": "豪迈", "D": "闲适之乐"})
    monkeypatch.setattr(choice, "option_logliks", lambda *args: [{"A": -3.0, "B": -5.0, "C": -4.0, "D": -6.0}])
    model = family_models["qwen3"]
    assert letter_pick(model, fmt, [question], "likelihood", 4)(0, {}) == "A"
    assert letter_pick(model, fmt, [question], "likelihood_norm", 4)(0, {}) == "B"  # -1.0 a character


def test_an_unknown_method_is_refused(family_models, fmt, sample_questions):
    with pytest.raises(ValueError, match="unknown choice method 'vote'"):
        letter_pick(family_models["qwen3"], fmt, sample_questions, "vote", 4)
