"""The prompt the model reads and the target it learns: one fixed, documented format.

User message (parts present only; numbering follows them):

    请阅读下面这首古典诗词，完成以下任务。
    标题：<title>
    作者：<author>                      (when known)
    内容：<content>
    一、解释下列词语在诗中的含义：
    - <word>
    二、把下列句子翻译成现代汉语：
    - <sentence>
    三、选出最符合这首诗词情感的一项：
    A. <option>  ...  D. <option>
    请只输出一个 JSON 对象，格式为：{"ans_qa_words": {"词语": "解释"},
        "ans_qa_sents": {"句子": "译文"}, "choose_id": "选项字母"}     (one line in the prompt)

Target: `json.dumps(answer, ensure_ascii=False)` with the default separators `", "` and `": "`, keys verbatim and
in the question's order (the official scorer reads by position), parts in the order ans_qa_words, ans_qa_sents,
choose_id, followed by the end-of-turn token. The constrained decoder forces exactly this skeleton, so any change
here must keep `tests/test_prompt.py` green.

With a chat template (Qwen's ChatML) the user message is rendered by it, with `enable_thinking=False` so Qwen3
gets its empty think block; without one (base models such as Gemma-3-270M) the plain template is
`<bos>` + user message + "\n\n答案：" and the target ends with EOS.

The emotion prompt (`emotion_prompt_ids`) is the poem's lines alone, ending in `EMOTION_CUE`: the context in which
poetry.choice scores each option's text, and which an emotion example (data.emotion_examples) trains, its target
being the right option's text and the end of the turn.

The channel pair (`channel_ids`) turns the emotion question around, as noisy-channel classification does (Min et
al., ACL 2022): `CHANNEL_HEAD` naming an option, then the poem's title and text, whose likelihood poetry.choice
scores. It is plain text with the tokenizer's own leading tokens, with or without a chat template: what is scored is
how well the option explains the poem's text, not a reply.

The writing prompt (`writing_prompt_ids`, data.writing_examples) is a user message `写一首<form>，题为《<title>》。`
(`写一首<form>。` without a title), answered as a question is; its target is the poem, whitespace removed, and the
end of the turn.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from .data.records import Answer, Example, Question

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PLAIN_ANSWER_CUE = "\n\n答案："
EMOTION_CUE = "这首诗表达的情感是："
CHANNEL_HEAD = "这首诗表达了{option}。\n"
_NUMERALS = "一二三"
_FORMAT_HINT = ('请只输出一个 JSON 对象，格式为：{"ans_qa_words": {"词语": "解释"}, '
                '"ans_qa_sents": {"句子": "译文"}, "choose_id": "选项字母"}')


def _render_poem(question: Question, head: str) -> list[str]:
    lines = [head]
    if question.title:  # an imported line (CCPM) has none
        lines.append(f"标题：{question.title}")
    if question.author:
        lines.append(f"作者：{question.author}")
    lines.append(f"内容：{question.content}")
    return lines


def render_emotion_prompt(question: Question) -> str:
    """The poem alone, then the cue after which an option's text is scored (poetry.choice, by likelihood)."""
    return "\n".join([*_render_poem(question, "请阅读下面这首古典诗词。"), EMOTION_CUE])


def render_writing_prompt(form: str, title: str) -> str:
    return f"写一首{form}，题为《{title}》。" if title else f"写一首{form}。"


def render_user(question: Question) -> str:
    lines = _render_poem(question, "请阅读下面这首古典诗词，完成以下任务。")
    tasks = []
    if question.qa_words:
        tasks.append(["解释下列词语在诗中的含义：", *(f"- {w}" for w in question.qa_words)])
    if question.qa_sents:
        tasks.append(["把下列句子翻译成现代汉语：", *(f"- {s}" for s in question.qa_sents)])
    if question.choose:
        tasks.append(["选出最符合这首诗词情感的一项：", *(f"{k}. {v}" for k, v in question.choose.items())])
    for numeral, (head, *items) in zip(_NUMERALS, tasks, strict=False):  # as many numerals as parts
        lines += [f"{numeral}、{head}", *items]
    lines.append(_FORMAT_HINT)
    return "\n".join(lines)


def answer_dict(answer: Answer) -> dict:
    """The target object: only the parts the question asks, in canonical order."""
    target: dict = {}
    if answer.ans_qa_words:
        target["ans_qa_words"] = answer.ans_qa_words
    if answer.ans_qa_sents:
        target["ans_qa_sents"] = answer.ans_qa_sents
    if answer.choose_id is not None:
        target["choose_id"] = answer.choose_id
    return target


def render_target(answer: Answer) -> str:
    return json.dumps(answer_dict(answer), ensure_ascii=False)


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5 and a list before."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


@dataclass
class PromptFormat:
    """Token-level rendering of questions and targets for one tokenizer."""

    tokenizer: object
    system_prompt: str = ""

    def __post_init__(self) -> None:
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.end_ids = self._end_of_turn()

    def _messages(self, question_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question_text}]

    def _end_of_turn(self) -> list[int]:
        """What closes the assistant turn: read off the template itself (`<|im_end|>` for ChatML,
        `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3); EOS for plain models."""
        if self.chat:
            marker = "答"
            rendered = self.tokenizer.apply_chat_template(
                [*self._messages("问"), {"role": "assistant", "content": marker}], tokenize=False,
                enable_thinking=False)
            suffix = rendered[rendered.rindex(marker) + len(marker):]
            suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            if suffix_ids:
                return suffix_ids[:1]
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a chat template nor an EOS token to end an answer with")
        return [self.tokenizer.eos_token_id]

    def prompt_ids(self, question: Question) -> list[int]:
        return self._user_ids(render_user(question))

    def writing_prompt_ids(self, form: str, title: str) -> list[int]:
        return self._user_ids(render_writing_prompt(form, title))

    def _user_ids(self, text: str) -> list[int]:
        if self.chat:
            return _ids(self.tokenizer.apply_chat_template(
                self._messages(text), add_generation_prompt=True, tokenize=True, enable_thinking=False))
        return self.tokenizer(text + PLAIN_ANSWER_CUE, add_special_tokens=True)["input_ids"]

    def emotion_prompt_ids(self, question: Question) -> list[int]:
        """The context an option's text is scored after: as a user turn answered by the option with a chat
        template, as plain text ending in the cue without one."""
        return self._emotion_ids(render_emotion_prompt(question))

    def emotion_cue_ids(self) -> list[int]:
        """The emotion prompt without a poem, the cue alone, rendered as every emotion prompt is: the context of an
        option's prior (poetry.choice, likelihood_pmi)."""
        return self._emotion_ids(EMOTION_CUE)

    def _emotion_ids(self, text: str) -> list[int]:
        if self.chat:
            return _ids(self.tokenizer.apply_chat_template(
                self._messages(text), add_generation_prompt=True, tokenize=True, enable_thinking=False))
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def channel_ids(self, question: Question, option: str) -> tuple[list[int], list[int]]:
        """(a sentence naming `option`, the poem's title and text after it): the poem's ids are what is scored."""
        head = self.tokenizer(CHANNEL_HEAD.format(option=option), add_special_tokens=True)["input_ids"]
        poem = f"{question.title}\n{question.content}" if question.title else question.content
        return head, self.text_ids(poem)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation (`{"role": "system"|"user"|"assistant", "content": text}` turns) rendered as training
        renders a question, ending where the assistant speaks next: with the chat template, or as plain text where
        each user turn ends in the answer cue. A lone user turn holding `render_user(q)` gives `prompt_ids(q)`.
        With a chat template, `system_prompt` opens a conversation that brings no system turn of its own."""
        if self.chat:
            if self.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return _ids(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, enable_thinking=False))
        ends = {"system": "\n\n", "user": PLAIN_ANSWER_CUE, "assistant": "\n\n"}
        text = "".join(m["content"] + ends[m["role"]] for m in messages)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def target_ids(self, answer: Answer) -> list[int]:
        return self.text_ids(render_target(answer)) + self.end_ids

    def encode(self, example: Example) -> dict:
        """input_ids and labels (the prompt masked); an emotion example also carries its four options' ids, their
        lengths in characters and the right one's index, which the choice loss scores (others carry none, -1). A
        writing example's target is its poem."""
        options = {"choice_ids": [], "choice_chars": [], "choice_right": -1}
        if example.emotion_only:
            question = example.question
            prompt = self.emotion_prompt_ids(question)
            target = self.text_ids(question.choose[example.answer.choose_id]) + self.end_ids
            options = {"choice_ids": [self.text_ids(text) for text in question.choose.values()],
                       "choice_chars": [len(text) for text in question.choose.values()],
                       "choice_right": list(question.choose).index(example.answer.choose_id)}
        elif example.form:
            prompt = self.writing_prompt_ids(example.form, example.question.title)
            target = self.text_ids(example.question.content) + self.end_ids
        else:
            prompt, target = self.prompt_ids(example.question), self.target_ids(example.answer)
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
                "length": len(prompt) + len(target), **options}


def tokenize_examples(examples: list[Example], fmt: PromptFormat, max_len: int):
    """Tokenise once with `datasets.map`; keep `length` for the length-bucketing sampler.

    Examples longer than max_len are dropped, never truncated (a cut target teaches a half answer): the dataset
    is `len(examples) - len(dataset)` rows short of the examples.
    """
    import datasets

    rows = [{"example": i} for i in range(len(examples))]
    fingerprint = hashlib.sha1(repr(examples).encode()).hexdigest()
    ids = datasets.Sequence(datasets.Value("int64"))
    # given, not inferred: a first batch whose rows have no options would type choice_ids as lists of nothing
    features = datasets.Features({"example": datasets.Value("int64"), "input_ids": ids, "labels": ids,
                                  "length": datasets.Value("int64"), "choice_ids": datasets.Sequence(ids),
                                  "choice_chars": ids, "choice_right": datasets.Value("int64")})
    encoded = datasets.Dataset.from_list(rows).map(
        lambda row: fmt.encode(examples[row["example"]]),  # `example` stays: which example a row is
        features=features, new_fingerprint=f"{fingerprint[:16]}-{type(fmt.tokenizer).__name__}", desc="tokenizing")
    kept = encoded.filter(lambda row: row["length"] <= max_len, new_fingerprint=f"{fingerprint[:16]}-{max_len}")
    if len(kept) < len(encoded):
        log.warning("dropped %d of %d examples longer than data.max_len=%d tokens (targets are never cut)",
                    len(encoded) - len(kept), len(encoded), max_len)
    return kept
