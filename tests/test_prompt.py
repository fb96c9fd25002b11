"""Prompt masking exactness and the canonical target, on the real Qwen3 tokenizer and ChatML template."""
import json

from poetry.data import Answer, Example, Question
from poetry.prompt import (
    EMOTION_CUE,
    IGNORE_INDEX,
    PLAIN_ANSWER_CUE,
    PromptFormat,
    render_emotion_prompt,
    render_target,
    render_user,
    tokenize_examples,
)

QUESTION = Question(idx=0, title="送别", author="王维", content="山中相送罢，日暮掩柴扉。春草明年绿，王孙归不归？",
                    qa_words=("柴扉", "王孙"), qa_sents=("山中相送罢，日暮掩柴扉。", "春草明年绿, 王孙归不归？"),
                    choose={"A": "惜别的怅惘", "B": "欢快的重逢", "C": "豪迈的报国之志", "D": "闲适的田园之乐"})
ANSWER = Answer(idx=0, ans_qa_words={"柴扉": "柴门。", "王孙": "贵族子弟，这里指友人。"},
                ans_qa_sents={"山中相送罢，日暮掩柴扉。": "在山中送走了友人，黄昏时关上柴门。",
                              "春草明年绿, 王孙归不归？": "明年春草再绿时，友人能否回来？"}, choose_id="A")
EXAMPLE = Example(QUESTION, ANSWER)


def test_target_is_canonical_json_in_input_order():
    target = render_target(ANSWER)
    assert target == json.dumps({"ans_qa_words": ANSWER.ans_qa_words, "ans_qa_sents": ANSWER.ans_qa_sents,
                                 "choose_id": "A"}, ensure_ascii=False)
    assert list(json.loads(target)["ans_qa_sents"]) == list(QUESTION.qa_sents)  # half-width comma kept verbatim


def test_target_omits_absent_parts():
    assert render_target(Answer(0, {"a": "b"}, {}, None)) == '{"ans_qa_words": {"a": "b"}}'


def test_user_message_shows_every_part():
    text = render_user(QUESTION)
    parts = ("标题：送别", "作者：王维", QUESTION.content, "- 柴扉", "- 春草明年绿, 王孙归不归？", "D. 闲适的田园之乐")
    for part in parts:
        assert part in text
    assert "一、解释" in text and "二、把下列句子" in text and "三、选出" in text
    no_author = render_user(Question(0, "t", "c", (), ("c",), {}))
    assert "作者" not in no_author and "一、把下列句子" in no_author


def test_labels_mask_exactly_the_prompt(tokenizer):
    fmt = PromptFormat(tokenizer)
    encoded = fmt.encode(EXAMPLE)
    prompt = fmt.prompt_ids(QUESTION)
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert encoded["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    learned = encoded["labels"][len(prompt):]
    assert IGNORE_INDEX not in learned and learned == encoded["input_ids"][len(prompt):]
    assert tokenizer.decode(learned) == render_target(ANSWER) + "<|im_end|>"
    assert encoded["length"] == len(encoded["input_ids"])


def test_an_emotion_example_learns_the_right_options_text_after_the_poem_alone(tokenizer):
    fmt = PromptFormat(tokenizer)
    encoded = fmt.encode(Example(QUESTION, ANSWER, emotion_only=True))
    prompt = fmt.emotion_prompt_ids(QUESTION)
    assert encoded["input_ids"][:len(prompt)] == prompt and encoded["labels"][:len(prompt)] == [IGNORE_INDEX] * len(
        prompt)
    assert tokenizer.decode(encoded["labels"][len(prompt):]) == "惜别的怅惘<|im_end|>"
    text = render_emotion_prompt(QUESTION)
    assert text.endswith(EMOTION_CUE) and QUESTION.content in text and "柴扉\n" not in text and "A." not in text
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    assert plain.decode(PromptFormat(plain).emotion_prompt_ids(QUESTION)).endswith(EMOTION_CUE)


def test_chatml_prompt_ends_with_assistant_turn(tokenizer):
    text = tokenizer.decode(PromptFormat(tokenizer).prompt_ids(QUESTION))
    assert text.startswith("<|im_start|>user\n请阅读")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_system_prompt_goes_into_the_template(tokenizer):
    text = tokenizer.decode(PromptFormat(tokenizer, system_prompt="你是诗词专家。").prompt_ids(QUESTION))
    assert text.startswith("<|im_start|>system\n你是诗词专家。<|im_end|>")


def test_plain_template_without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    fmt = PromptFormat(plain)
    assert not fmt.chat and fmt.end_ids == [plain.eos_token_id]
    assert plain.decode(fmt.prompt_ids(QUESTION)).endswith(PLAIN_ANSWER_CUE)


def test_overlong_examples_are_dropped_not_cut(tokenizer):
    fmt = PromptFormat(tokenizer)
    short = Example(Question(1, "t", "c", ("c",), (), {}), Answer(1, {"c": "x"}, {}, None))
    limit = fmt.encode(short)["length"]
    assert fmt.encode(EXAMPLE)["length"] > limit
    dataset = tokenize_examples([EXAMPLE, short, EXAMPLE], fmt, max_len=limit)
    assert len(dataset) == 1 and dataset[0]["input_ids"] == fmt.encode(short)["input_ids"]
    full = tokenize_examples([EXAMPLE, short], fmt, max_len=10_000)
    assert len(full) == 2 and full[0]["input_ids"] == fmt.encode(EXAMPLE)["input_ids"]


def test_a_chat_turn_holding_the_question_is_the_training_prompt(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    turn = [{"role": "user", "content": render_user(QUESTION)}]
    for fmt in (PromptFormat(tokenizer), PromptFormat(tokenizer, system_prompt="你是诗词专家。"), PromptFormat(plain)):
        assert fmt.chat_ids(turn) == fmt.prompt_ids(QUESTION)


def test_a_conversation_renders_every_turn_and_ends_where_the_assistant_speaks(tokenizer):
    turns = [{"role": "user", "content": "写一首七言绝句。"}, {"role": "assistant", "content": "春眠不觉晓"},
             {"role": "user", "content": "再写一首。"}]
    text = tokenizer.decode(PromptFormat(tokenizer, system_prompt="你是诗人。").chat_ids(turns))
    assert text.startswith("<|im_start|>system\n你是诗人。<|im_end|>") and "春眠不觉晓" in text
    assert text.endswith("再写一首。<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    own_system = [{"role": "system", "content": "你是学者。"}, *turns]
    text = tokenizer.decode(PromptFormat(tokenizer, system_prompt="你是诗人。").chat_ids(own_system))
    assert "你是学者。" in text and "你是诗人。" not in text
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    text = plain.decode(PromptFormat(plain).chat_ids(turns), skip_special_tokens=True)
    assert text == f"写一首七言绝句。{PLAIN_ANSWER_CUE}春眠不觉晓\n\n再写一首。{PLAIN_ANSWER_CUE}"


def test_a_writing_example_asks_for_the_form_and_title_and_learns_the_poem(tokenizer):
    poem = "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"
    example = Example(Question(0, "早发白帝城", poem, (), (), {}), Answer(0, {}, {}, None), form="七言绝句")
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    for fmt, end in ((PromptFormat(tokenizer), "<|im_end|>"), (PromptFormat(plain), plain.eos_token)):
        encoded = fmt.encode(example)
        prompt = fmt.writing_prompt_ids("七言绝句", "早发白帝城")
        assert encoded["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert fmt.tokenizer.decode(encoded["labels"][len(prompt):]) == poem + end
        assert "写一首七言绝句，题为《早发白帝城》。" in fmt.tokenizer.decode(prompt)
    untitled = plain.decode(PromptFormat(plain).writing_prompt_ids("如梦令", ""))
    assert untitled.endswith("写一首如梦令。" + PLAIN_ANSWER_CUE)
