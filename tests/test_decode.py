"""Constrained decoding: forced ids equal the training target's, batched KV-cache decoding equals a naive reference
(every model family, base, LoRA and merged models), forced runs cost no forward of their own, every answer
schema-valid; the free-text parser repairs broken outputs."""
import functools
import json
import random
from dataclasses import replace

import pytest
import torch

from poetry import decode
from poetry.builtin.tiny import ARCHITECTURES
from poetry.config import LoraConfig, ModelConfig
from poetry.data import Answer, Question, check_submission, load_answers, load_questions
from poetry.decode import (
    Skeleton,
    UnsupportedTokenizer,
    _AnswerState,
    _batches,
    _vocab,
    closing_quote,
    decode_constrained,
    decode_naive,
    option_letter_ids,
    parse_free_answer,
    pick_most_likely_letter,
)
from poetry.model import add_lora, load_model
from poetry.prompt import PromptFormat, render_target

from conftest import SAMPLE, WINDOW

OPTIONS = {"A": "惜别的怅惘", "B": "欢快的重逢", "C": "豪迈的报国之志", "D": "闲适的田园之乐"}
# Keys with a half-width comma and space, and a quote that json.dumps escapes
KEYS_WORDS = ("柴扉", 'say "hi", ok')
KEYS_SENTS = ("春草明年绿, 王孙归不归？",)
QUESTION = Question(0, "送别", "山中相送罢，日暮掩柴扉。", KEYS_WORDS, KEYS_SENTS, OPTIONS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)


@pytest.fixture(scope="module")
def sample_questions():
    return load_questions(SAMPLE / "eval.json").records


def answer_with(question: Question, value: str, letter: str | None = "C") -> Answer:
    return Answer(question.idx, {w: value for w in question.qa_words}, {s: value for s in question.qa_sents},
                  letter if question.choose else None)


def run_state(fmt, question: Question, logits_for, max_new_tokens: int = 10_000) -> _AnswerState:
    """Runs the decoder's state machine alone, with `logits_for(state)` as the model."""
    vocab = _vocab(fmt.tokenizer, len(fmt.tokenizer), "cpu", tuple(fmt.end_ids))
    state = _AnswerState(question, fmt, vocab, option_letter_ids(fmt) if question.choose else [], max_new_tokens,
                         functools.partial(pick_most_likely_letter, 0))
    state.start()
    while not state.done:
        state.advance(logits_for(state))
    return state


def teacher_forced(fmt, answer: Answer, question: Question) -> _AnswerState:
    """The state machine fed logits that favour the gold target's token at each position."""
    target = fmt.target_ids(answer)

    def gold(state):
        logits = torch.zeros(len(fmt.tokenizer))
        logits[target[len(state.emitted)]] = 1.0
        return logits

    return run_state(fmt, question, gold)


def test_skeleton_is_the_target_with_values_cut_out():
    questions = (QUESTION, Question(1, "t", "c", (), ("句一，", "句二。"), {}), Question(2, "t", "c", ("词",), (), {}))
    for question in questions:
        skeleton = Skeleton.of(question)
        answer = answer_with(question, "VALUE", "B")
        # one piece more than slots: the text after the last value
        filled = "".join(p + ("B" if key is None else "VALUE")
                         for p, key in zip(skeleton.pieces[:-1], skeleton.slots, strict=True))
        assert filled + skeleton.pieces[-1] == render_target(answer)


VALUES = ["柴门。", "贵族子弟，这里指友人", "ok.", "wow!", "问？", "“引号”内容", "「甲」", '他说"好"', "末尾反斜杠\\",
          "两行\n文字", "1998年", "…", 'end."', "中文。。", "中文...", "省略……", "（注）"]


@pytest.mark.parametrize("value", VALUES)
def test_forced_ids_equal_the_target_ids(fmt, value):
    state = teacher_forced(fmt, answer_with(QUESTION, value), QUESTION)
    assert state.ids == fmt.target_ids(answer_with(QUESTION, value))
    assert state.decoded().answer == answer_with(QUESTION, value)


def test_forced_ids_equal_the_target_ids_on_sample_gold(fmt, sample_questions):
    gold = load_answers(SAMPLE / "eval_gold.json")
    for question, answer in list(zip(sample_questions, gold, strict=True))[:4]:
        state = teacher_forced(fmt, answer, question)
        assert state.ids == fmt.target_ids(answer) and state.decoded().answer == answer


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma-3-270M's tokenizer (SentencePiece, no chat template) where its converted directory is cached."""
    from poetry.builtin.gemma270m import MODEL_SUBDIR, default_cache_dir, is_complete
    from poetry.model import load_tokenizer

    model_dir = default_cache_dir() / MODEL_SUBDIR
    if not is_complete(model_dir):
        pytest.skip(f"Gemma-3-270M not built at {model_dir} (python -m poetry.builtin.gemma270m)")
    return load_tokenizer(str(model_dir))


def test_forced_ids_equal_the_target_ids_with_gemma3s_tokenizer(sample_questions, gemma_tokenizer):
    """Gemma-3 (SentencePiece, no chat template: the plain format) where its converted directory is cached."""
    fmt = PromptFormat(gemma_tokenizer)
    gold = load_answers(SAMPLE / "eval_gold.json")
    pairs = [*zip(sample_questions[:2], gold[:2], strict=True), (QUESTION, answer_with(QUESTION, "wow!"))]
    for question, answer in pairs:
        state = teacher_forced(fmt, answer, question)
        assert state.ids == fmt.target_ids(answer) and state.decoded().answer == answer


@pytest.mark.parametrize("name", ["tokenizer", "gemma_tokenizer"])
def test_the_vocabularys_texts_are_what_decode_gives_each_id(name, request):
    """The fast tokenizer's own batch decoding gives each id the text `decode` gives it, on the whole vocabulary
    (byte pieces of a character, special and added tokens included): Qwen3's and Gemma-3's."""
    tokenizer = request.getfixturevalue(name)
    known = len(tokenizer)
    assert decode._id_texts(tokenizer, known) == tokenizer.batch_decode(
        [[i] for i in range(known)], clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("value", ["(括号)", "<标签>", '"开头引号'])
def test_ascii_punctuation_opening_a_value_is_the_one_exception(fmt, value):
    """Qwen3's BPE merges ASCII punctuation at a value's start with the opening quote (` "(`, ` "<`, ` "\\"`; 197
    such tokens), while the decoder has already forced ` "` by then. The ids differ at that token (and the gold
    teacher-forcing here drifts after it); no value of the 656 targets built from the sample and official data
    opens so."""
    answer = answer_with(QUESTION, value)
    state = teacher_forced(fmt, answer, QUESTION)
    target = fmt.target_ids(answer)
    first_difference = next(i for i, (a, b) in enumerate(zip(state.ids, target, strict=True)) if a != b)
    assert fmt.tokenizer.decode(state.ids[first_difference]) == ' "'
    merged = fmt.tokenizer.decode(target[first_difference])
    assert merged.startswith(' "' + json.dumps(value, ensure_ascii=False)[1]) and len(merged) > 2


def test_closing_quote_skips_escaped_quotes():
    assert closing_quote('",') == 0
    assert closing_quote('。"},') == 1
    assert closing_quote('\\"') is None
    assert closing_quote('"', before="a\\") is None
    assert closing_quote('"', before="a\\\\") == 0


def favouring(fmt, *texts: str) -> torch.Tensor:
    """Logits ranking the given tokens first, in order."""
    logits = torch.zeros(len(fmt.tokenizer))
    for rank, text in enumerate(texts):
        ids = fmt.tokenizer.convert_tokens_to_ids(text) if text.startswith("<|") else fmt.text_ids(text)
        assert len(ids if isinstance(ids, list) else [ids]) == 1, text
        logits[ids] = 100.0 - rank
    return logits


def test_values_are_never_empty_never_special_and_cut_at_the_budget(fmt):
    question = Question(0, "t", "c", ("甲", "乙"), (), {})
    # the model wants to close at once, then end the turn: the first token can be neither, and no special token
    # enters a value; the fused `。"` text before the quote stays in the value
    first = favouring(fmt, '",', "<|im_end|>", " ", "好")
    later = favouring(fmt, "<|im_end|>", "<|endoftext|>", '."')
    state = run_state(fmt, question, lambda s: first if not s.value_ids else later)
    assert state.decoded().answer.ans_qa_words == {"甲": "好.", "乙": "好."}
    assert fmt.tokenizer.decode(state.ids) == '{"ans_qa_words": {"甲": "好.", "乙": "好."}}<|im_end|>'
    endless = favouring(fmt, "好")
    state = run_state(fmt, question, lambda s: endless, max_new_tokens=3)
    assert state.decoded().answer.ans_qa_words == {"甲": "好好好", "乙": "好好好"}


def test_letters_must_be_single_tokens(fmt):
    class SplitLetters:
        tokenizer = fmt.tokenizer

        @staticmethod
        def text_ids(text):
            return [ord(c) for c in text] + ([0] if text in "ABCD" else [])

    with pytest.raises(UnsupportedTokenizer, match="option letter A is not a single token"):
        option_letter_ids(SplitLetters())
    assert len(option_letter_ids(fmt)) == 4


def assert_same(got, expected):
    assert [d.answer for d in got] == [d.answer for d in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.option_logprobs == pytest.approx(b.option_logprobs, abs=1e-4)


def test_batched_kv_cache_decoding_equals_the_naive_reference(model, fmt, sample_questions):
    questions = sample_questions[:6]
    model.train()
    batched = decode_constrained(model, fmt, questions, batch_size=3, max_new_tokens=6)
    assert model.training  # the caller's mode comes back
    assert_same(batched, decode_naive(model, fmt, questions, max_new_tokens=6))
    assert [d.answer.idx for d in batched] == [q.idx for q in questions]
    for d in batched:
        assert sum(torch.tensor(list(d.option_logprobs.values())).exp()) == pytest.approx(1.0)
        assert d.answer.choose_id == max(d.option_logprobs, key=d.option_logprobs.get)


def mixed_questions(sample: list[Question]) -> list[Question]:
    """Prompts of different lengths, different numbers and lengths of keys (so rows wait for each other), and
    several questions on one poem (they share its prompt)."""
    first, second, third = sample[:3]
    return [first, replace(first, idx=100, qa_words=first.qa_words[:1], qa_sents=(), choose={}),
            second, replace(second, idx=101, qa_words=()), replace(second, idx=102, qa_words=(), qa_sents=()),
            third, QUESTION]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_decoding_equals_the_naive_reference_in_every_family(family_models, fmt, sample_questions, arch,
                                                                    monkeypatch):
    model, questions = family_models[arch], mixed_questions(sample_questions)
    followers = []

    def recorded(rows):
        followers.extend(found := share(rows))
        return found

    share = decode._shared_prompts
    monkeypatch.setattr(decode, "_shared_prompts", recorded)
    batched = decode_constrained(model, fmt, questions, batch_size=4, max_new_tokens=4)
    assert_same(batched, decode_naive(model, fmt, questions, max_new_tokens=4))
    assert len(followers) == 3  # both other questions on the second poem, the one on the first


def test_gemmas_window_is_shorter_than_the_prompts_and_counts_cache_slots(family_models, fmt, sample_questions):
    """Why a row never has padding in its middle: masked slots still count toward Gemma's sliding window (it is
    measured in cache slots, not positions), so a row with a hole would see fewer real tokens than alone."""
    model = family_models["gemma3"]
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids = fmt.prompt_ids(sample_questions[0])
    assert len(ids) > 5 * WINDOW
    hole = 8  # masked slots, WINDOW - 4 tokens before the end
    holed = ids[:-WINDOW + 4] + [0] * hole + ids[-WINDOW + 4:]
    mask = [1] * (len(ids) - WINDOW + 4) + [0] * hole + [1] * (WINDOW - 4)

    def last_logits(tokens, attention):
        attention = torch.tensor([attention])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=torch.tensor([tokens]), attention_mask=attention, position_ids=positions,
                     logits_to_keep=1).logits[0, -1]

    with torch.no_grad():
        alone, with_hole = last_logits(ids, [1] * len(ids)), last_logits(holed, mask)
        assert not torch.allclose(alone, with_hole, atol=1e-4)
        model.config.sliding_window = 4 * len(ids)
        try:  # with a window longer than the row, the hole is invisible: the window alone made the difference
            assert torch.allclose(last_logits(ids, [1] * len(ids)), last_logits(holed, mask), atol=1e-4)
        finally:
            model.config.sliding_window = WINDOW


def test_a_forced_run_costs_no_forward_of_its_own(model, fmt, sample_questions, monkeypatch):
    """One forward per choice the model makes (a value's token, the letter), whatever the length of the forced
    skeleton between choices."""
    forwards, choices = [], []
    hook = model.get_decoder().register_forward_pre_hook(lambda module, args: forwards.append(1))
    advance = _AnswerState.advance
    monkeypatch.setattr(_AnswerState, "advance", lambda state, logits: choices.append(1) or advance(state, logits))
    try:
        decode_constrained(model, fmt, sample_questions[:1], batch_size=1, max_new_tokens=3)
    finally:
        hook.remove()
    forced = len(fmt.text_ids("".join(Skeleton.of(sample_questions[0]).pieces)))
    assert len(forwards) == len(choices) < forced


class _Scripted:
    """An engine state that is due a forced run of 12 tokens after every `period`-th choice and one token after
    the others, until it has made `choices` choices."""

    def __init__(self, period: int, choices: int):
        self.period, self.choices, self.made = period, choices, 0
        self.prompt_key = object()  # a poem of its own

    def start(self) -> list[int]:
        return []

    def drafts(self, sequence: list[int], max_tokens: int) -> list[int]:
        return []

    def advance(self, logits: torch.Tensor) -> list[int]:
        self.made += 1
        if self.made == self.choices:
            return []
        return [7, 8, 9] * 4 if self.made % self.period == 0 else [7]


def test_rows_due_a_forced_run_share_the_forward_of_rows_due_a_token(model, fmt):
    """Rows whose runs fall at different choices still make one choice each per forward, whatever a run's length:
    as many forwards as the row with the most choices makes, where rounds of a forward for the long runs and one for
    the tokens took more."""
    forwards = []
    hook = model.get_decoder().register_forward_pre_hook(lambda module, args: forwards.append(1))
    states = [_Scripted(2, 12), _Scripted(3, 12), _Scripted(5, 9)]
    try:
        decode.drive(model, fmt, states, [[11, 12, 13, 14, 15, 16]] * 3, batch_size=3)
    finally:
        hook.remove()
    assert [state.made for state in states] == [12, 12, 9] and len(forwards) == 12


def test_a_row_writes_fed_keys_after_its_slots_in_buffers_that_grow_by_doubling():
    """Each row keeps its keys and values in buffers of its own: a forward writes the fed tokens' states after the
    row's slots (over drafts it rejected) and attends over the view up to them; nothing else is copied, except when
    a buffer doubles. A prompt-learning prefix, the same tensors for every row, is never written into."""
    prefix_keys = torch.arange(4.0).reshape(1, 2, 2)  # (heads, slots, dim): two virtual slots
    row = decode._Row(None, [5], [(prefix_keys, -prefix_keys)])
    fed = torch.full((1, 3, 2), 7.0)
    keys, values = row.attend(0, fed, -fed)
    assert torch.equal(keys, torch.cat([prefix_keys, fed], 1)) and torch.equal(values, -keys)
    assert torch.equal(prefix_keys, torch.arange(4.0).reshape(1, 2, 2)) and row.kv[0][0].shape[1] == 5
    row.ids = [decode.VIRTUAL_ID] * 2 + [5, 6]  # the third fed token was a rejected draft
    buffer = row.kv[0][0]
    keys, _ = row.attend(0, torch.full((1, 1, 2), 9.0), torch.zeros(1, 1, 2))
    assert keys.shape[1] == 5 and keys[0, 4].tolist() == [9.0, 9.0] and row.kv[0][0] is buffer  # room: in place
    row.ids.append(9)
    keys, _ = row.attend(0, torch.full((1, 2, 2), 3.0), torch.zeros(1, 2, 2))
    assert row.kv[0][0].shape[1] == 10 and keys.shape[1] == 7 and keys[0, 4].tolist() == [9.0, 9.0]
    assert keys.data_ptr() == row.kv[0][0].data_ptr()  # a view of the buffer


def test_each_rows_queries_see_its_slots_up_to_their_own_within_the_sliding_window():
    """Row by row, the mask over a row's slots: a single query sees them all, a prompt fed alone follows causal
    order (SDPA's own rule, no mask); tokens fed after cached slots see the slots up to their own, and a sliding
    window (counted in slots) drops the slots it has passed, from the first one no query needs."""
    packing = decode._RowsAttention([None] * 3, [1, 3, 4])
    assert packing._seen(0, 6, None, "cpu") == (0, None) and packing._seen(0, 9, 4, "cpu") == (5, None)
    assert packing._seen(2, 4, None, "cpu") == (0, None)  # row 2's prompt: its 4 slots are all fed now
    first, mask = packing._seen(1, 5, None, "cpu")  # 2 cached slots, then 3 fed tokens
    assert first == 0 and mask[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                                  [True, True, True, True, True]]
    first, mask = packing._seen(1, 5, 2, "cpu")  # slot 2 sees slots 1-2, slot 3 slots 2-3, slot 4 slots 3-4
    assert first == 1 and mask[0, 0].tolist() == [[True, True, False, False], [False, True, True, False],
                                                  [False, False, True, True]]
    first, mask = packing._seen(2, 4, 3, "cpu")  # a prompt longer than the window: the window needs a mask
    assert first == 0 and mask[0, 0, 3].tolist() == [False, True, True, True]


def test_the_engine_gives_the_decoder_its_attention_back_whatever_happens(model, fmt, sample_questions):
    before = model.config._attn_implementation

    def broken(position, letter_logprobs):
        assert model.config._attn_implementation == decode.ROWS_ATTENTION
        raise KeyError("a picker failing mid-batch")

    with pytest.raises(KeyError):
        decode_constrained(model, fmt, sample_questions[:2], batch_size=2, max_new_tokens=2, pick=broken)
    assert model.config._attn_implementation == before != decode.ROWS_ATTENTION
    assert decode_constrained(model, fmt, sample_questions[:1], max_new_tokens=2)  # and it decodes again


def test_attention_with_soft_capped_logits_is_refused():
    query = torch.zeros(1, 2, 1, 4)
    with pytest.raises(decode.UnsupportedModel, match="soft-capping"):
        decode._rows_attention(None, query, query, query, None, softcap=50.0, poetry_rows=None)


def test_a_batchs_rows_let_their_keys_and_values_go_once_it_is_done(model, fmt, sample_questions, monkeypatch):
    """drive makes every row first and keeps them all until the last batch: a row's buffers (on Gemma-3-270M in
    fp32, 11 MB for a 300-token prompt, twice that once they double) must go with its batch, or a few hundred
    questions would hold gigabytes."""
    finished, batch = [], decode._decode_batch

    def recorded(lm, rows, *rest):
        batch(lm, rows, *rest)
        finished.extend(rows)

    monkeypatch.setattr(decode, "_decode_batch", recorded)
    decode_constrained(model, fmt, sample_questions[:3], batch_size=2, max_new_tokens=2)
    assert len(finished) == 3 and all(row.kv == [] for row in finished)


def test_questions_on_one_poem_share_a_batch():
    assert _batches([5, 9, 7, 8], 2) == [[1, 3], [2, 0]]
    assert _batches([5, 9, 7, 8], 2, ["a", "b", "b", "a"]) == [[1, 2], [3, 0]]  # the poem of the longest first


def test_lora_and_merged_models_decode_alike(tiny_model_dir, fmt, sample_questions):
    questions = sample_questions[:4]
    base = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    plain = decode_constrained(base, fmt, questions, batch_size=2, max_new_tokens=4)
    lora = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)  # LoRA B starts at zero: make the adapter change the model
    adapted = decode_constrained(lora, fmt, questions, batch_size=2, max_new_tokens=4)
    assert [d.answer for d in adapted] != [d.answer for d in plain]
    assert_same(adapted, decode_naive(lora, fmt, questions, max_new_tokens=4))
    merged = lora.merge_and_unload()
    assert_same(decode_constrained(merged, fmt, questions, batch_size=2, max_new_tokens=4), adapted)


def test_every_answer_is_schema_valid_for_a_random_model(model, fmt, sample_questions):
    decoded = decode_constrained(model, fmt, sample_questions, batch_size=8, max_new_tokens=3)
    answers = [d.answer for d in decoded]
    check_submission(sample_questions, answers, "decoded")
    for answer in answers:
        assert all(v.strip() for v in [*answer.ans_qa_words.values(), *answer.ans_qa_sents.values()])


# ---- the free-text parser ----

GOOD = {"ans_qa_words": {"柴扉": "柴门。", 'say "hi", ok': "打招呼。"},
        "ans_qa_sents": {KEYS_SENTS[0]: "明年春草再绿时，友人能否回来？"}, "choose_id": "A"}
GOOD_TEXT = json.dumps(GOOD, ensure_ascii=False)


def parsed(text):
    answer, repairs = parse_free_answer(QUESTION, text)
    assert tuple(answer.ans_qa_words) == KEYS_WORDS and tuple(answer.ans_qa_sents) == KEYS_SENTS
    assert all(v.strip() for v in [*answer.ans_qa_words.values(), *answer.ans_qa_sents.values()])
    return answer, repairs


def test_parser_reads_a_clean_answer_without_repairs():
    answer, repairs = parsed(GOOD_TEXT)
    assert repairs == () and answer == Answer(0, GOOD["ans_qa_words"], GOOD["ans_qa_sents"], "A")


@pytest.mark.parametrize("text", [f"<think>先想想{{}}</think>\n{GOOD_TEXT}", f"嗯……</think>{GOOD_TEXT}"])
def test_parser_drops_thinking(text):
    answer, repairs = parsed(text)
    assert repairs == ("think",) and answer.ans_qa_words == GOOD["ans_qa_words"]


def test_parser_drops_an_unclosed_think_block_and_falls_back():
    answer, repairs = parsed('<think>格式是 {"ans_qa_words": {"词语": "解释"')
    assert answer.ans_qa_words == {k: k for k in KEYS_WORDS} and answer.choose_id == "A"
    assert repairs[:2] == ("think", "invalid_json") and "missing_value" in repairs


def test_parser_strips_code_fences():
    answer, repairs = parsed(f"好的：\n```json\n{GOOD_TEXT}\n```")
    assert repairs == ("fence",) and answer.ans_qa_sents == GOOD["ans_qa_sents"]


def test_parser_salvages_truncated_json_by_position():
    answer, repairs = parsed('{"ans_qa_words": {"柴门": "柴门。", "say hi": "问候"}, "ans_qa_sents": {"春草": "明年')
    assert answer.ans_qa_words == {"柴扉": "柴门。", 'say "hi", ok': "问候"}
    assert answer.ans_qa_sents == {KEYS_SENTS[0]: KEYS_SENTS[0]}  # unreadable: the sentence itself
    assert set(repairs) == {"invalid_json", "missing_value", "choose_id"}


def test_parser_maps_mangled_keys_and_sections_by_position():
    text = '{"words": {"柴": "柴门。", "hi": "问候"}, "sents": {"春草": "译文"}, "choose_id": "选项B"}'
    answer, repairs = parsed(text)
    assert list(answer.ans_qa_words.values()) == ["柴门。", "问候"] and answer.ans_qa_sents == {KEYS_SENTS[0]: "译文"}
    assert answer.choose_id == "B" and set(repairs) == {"section_name", "keys", "choose_id"}


@pytest.mark.parametrize("choose, letter, repair", [("-1", "A", "choose_id"), ('"-1"', "A", "choose_id"),
                                                    ("B", "B", "invalid_json"), ('"c"', "C", "choose_id"),
                                                    ('"选项D"', "D", "choose_id"), ('""', "A", "choose_id")])
def test_parser_accepts_choose_id_variants(choose, letter, repair):
    answer, repairs = parsed(GOOD_TEXT.replace('"choose_id": "A"', f'"choose_id": {choose}'))
    assert answer.choose_id == letter and repairs == (repair,)
    assert answer.ans_qa_words == GOOD["ans_qa_words"]  # bare B breaks the JSON: the values are salvaged


def test_parser_fills_missing_and_empty_values():
    answer, repairs = parsed('{"ans_qa_words": {"柴扉": "  "}, "ans_qa_sents": {}, "choose_id": "D"}')
    assert answer.ans_qa_words == {"柴扉": "柴扉", 'say "hi", ok': 'say "hi", ok'}
    assert answer.ans_qa_sents == {KEYS_SENTS[0]: KEYS_SENTS[0]} and answer.choose_id == "D"
    assert set(repairs) == {"keys", "missing_value"}
    answer, repairs = parsed("我不知道。")
    assert answer.choose_id == "A" and set(repairs) == {"invalid_json", "missing_value", "choose_id"}


# ---- speculative decoding: prompt-lookup drafts, verified ----

def test_prompt_lookup_proposes_what_followed_the_longest_latest_match():
    assert decode.prompt_lookup([1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3], 2) == [9, 2]  # 1 2 3 ends it: the longest match
    assert decode.prompt_lookup([5, 2, 3, 4, 6, 3, 7, 3], 3) == [7, 3]  # only 3 matches: its latest occurrence
    assert decode.prompt_lookup([1, 2, 3, 4], 3) == []
    assert decode.prompt_lookup([4, 4], 3) == [4]
    assert decode.prompt_lookup([7], 3) == []


def record_states(monkeypatch) -> list[_AnswerState]:
    """The answer states of the decodings that follow, in creation order."""
    created = []
    make = decode._states
    monkeypatch.setattr(decode, "_states", lambda *args: created.extend(states := make(*args)) or states)
    return created


def oracle_drafts(monkeypatch, fmt, questions, states, wrong_every: int | None = 2) -> list[tuple[int, int]]:
    """prompt_lookup replaced by the tokens that plain decoding chose next (`states`: its answers); when
    `wrong_every` is given, about one draft in that many has a token replaced, by another or by one the constraint
    forbids in a value (end of turn), so that verification accepts every number of drafts from none to all.
    Returns (accepted, drafted) per verification, filled as decoding goes; a right draft that runs past its value's
    closing quote is cut there, since the state forces the canonical closing tokens."""
    answers = [fmt.prompt_ids(q) + state.emitted for q, state in zip(questions, states, strict=True)]

    def lookup(sequence: list[int], max_tokens: int) -> list[int]:
        [answer] = [a for a in answers if a[:len(sequence)] == sequence]  # a wrong pick would match no answer
        draft = answer[len(sequence):len(sequence) + max_tokens]
        chance = random.Random(len(sequence))
        if wrong_every and draft and chance.randrange(wrong_every) == 0:
            at = chance.randrange(len(draft))
            draft[at] = fmt.end_ids[0] if chance.random() < 0.5 else (draft[at] + 1) % len(fmt.tokenizer)
        return draft

    monkeypatch.setattr(decode, "prompt_lookup", lookup)
    return count_accepted(monkeypatch)


def count_accepted(monkeypatch) -> list[tuple[int, int]]:
    """(drafts accepted, drafts) of each verification that follows."""
    verify, accepted = decode._verify, []

    def counted(state, logits, draft):
        result = verify(state, logits, draft)
        accepted.append((result[0], len(draft)))
        return result

    monkeypatch.setattr(decode, "_verify", counted)
    return accepted


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_speculative_decoding_equals_plain_decoding_in_every_family(family_models, fmt, sample_questions, arch,
                                                                   monkeypatch):
    """Rows of different lengths in a batch, each accepting its own number of drafts (Gemma-3: a sliding window
    shorter than the prompts), and values cut at the budget: the answers and letter scores of plain decoding."""
    model, questions = family_models[arch], mixed_questions(sample_questions)
    states = record_states(monkeypatch)
    plain = decode_constrained(model, fmt, questions, batch_size=4, max_new_tokens=6)
    accepted = oracle_drafts(monkeypatch, fmt, questions, list(states))
    assert_same(decode_constrained(model, fmt, questions, batch_size=4, max_new_tokens=6, draft_tokens=3), plain)
    assert {n for n, _ in accepted} == {0, 1, 2, 3}
    assert any(n < drafted for n, drafted in accepted) and any(n == drafted > 0 for n, drafted in accepted)


def test_right_drafts_save_forwards_and_natural_ones_change_nothing(model, fmt, sample_questions, monkeypatch):
    questions = sample_questions[:4]
    forwards = []
    hook = model.get_decoder().register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        states = record_states(monkeypatch)
        plain = decode_constrained(model, fmt, questions, batch_size=2, max_new_tokens=8)
        plain_forwards = len(forwards)
        natural = decode_constrained(model, fmt, questions, batch_size=2, max_new_tokens=8, draft_tokens=4)
        assert_same(natural, plain)  # prompt lookup's own guesses, mostly wrong for a random model
        accepted = oracle_drafts(monkeypatch, fmt, questions, states[:len(questions)], wrong_every=None)
        forwards.clear()
        assert_same(decode_constrained(model, fmt, questions, batch_size=2, max_new_tokens=8, draft_tokens=4), plain)
    finally:
        hook.remove()
    assert sum(n for n, _ in accepted) > 0.8 * sum(drafted for _, drafted in accepted)
    assert len(forwards) < 0.6 * plain_forwards
    with pytest.raises(ValueError, match="draft_tokens"):
        decode_constrained(model, fmt, questions, draft_tokens=-1)


@pytest.mark.slow
def test_speculative_decoding_on_gemma270m_answers_as_plain_decoding_in_fp32(sample_questions, monkeypatch):
    """The real model, whose answers restate the questions as prompt lookup guesses: drafts are accepted, and every
    answer and letter score is plain decoding's."""
    from poetry.builtin import resolve_model_path
    from poetry.builtin.gemma270m import GemmaAssetError
    from poetry.model import load_tokenizer

    try:
        path = resolve_model_path("builtin:gemma-3-270m")
    except GemmaAssetError as error:
        pytest.skip(f"the demo extra is not installed: {error}")
    model = load_model(ModelConfig(path=path, dtype="fp32"), for_training=False)
    fmt = PromptFormat(load_tokenizer(path))
    plain = decode_constrained(model, fmt, sample_questions, batch_size=7, max_new_tokens=16)
    accepted = count_accepted(monkeypatch)
    assert_same(decode_constrained(model, fmt, sample_questions, batch_size=7, max_new_tokens=16, draft_tokens=4),
                plain)
    assert sum(n for n, _ in accepted) > 0
