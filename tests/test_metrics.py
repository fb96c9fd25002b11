"""Metrics: BLEU and ROUGE against hand-derived values, the total's arithmetic, BERTScore on a tiny random BERT."""
import json
import math

import pytest

from poetry.data import Answer
from poetry.metrics import BertScore, MetricUnavailable, char_bleu, char_rouge, score_answers

# Hand-made set. Every answer is either identical to its gold (>= 4 characters, so BLEU 1) or shares no character
# with it (BLEU 0), so the aggregates can be derived by hand.
GOLD = [
    Answer(0, {"疑": "好像是这样", "举头": "抬起头来"},
           {"床前明月光，疑是地上霜。": "床前洒满月光，好像地上结了霜。"}, "A"),
    Answer(1, {"明月": "明亮的月光"}, {"低头思故乡。": "低头思念故乡", "举头望明月，": "抬头望着明月"}, "B"),
]
PRED = [
    Answer(0, {"疑": "好像是这样", "举头": "完全不同"},
           {"床前明月光，疑是地上霜。": "床前洒满月光，好像地上结了霜。"}, "A"),
    Answer(1, {"明月": "明亮的月光"}, {"低头思故乡。": "向下看", "举头望明月，": "抬头望着明月"}, "C"),
]


def build_tiny_bert(directory, model_max_length=None):
    """A random 2-layer BERT with a CJK vocabulary: enough for bert-score's code path, no download."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    characters = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    characters += list("，。！？；：、“”《》春风又绿江南岸吹好像是这样抬起头来"
                       "完全不同明亮的月光床前洒满结了霜低思念故乡向下看望着")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(characters)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # Saved without model_max_length unless asked, as many hand-made folders are: BertScore must cope with 1e30
    options = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), **options)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return BertScore(build_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert"), layer=2)


# Keys differ from the gold's and the second word answer is missing: pairing is by position, the gap scores 0
RENAMED_AND_SHORT = Answer(0, {"别的词": "好像是这样"}, {"别的句": "床前洒满月光，好像地上结了霜。"}, "A")


class FakeBertScore:
    """1.0 for identical pairs, 0.5 otherwise."""

    def f1(self, candidates, references):
        return [1.0 if c == r else 0.5 for c, r in zip(candidates, references, strict=True)]


def test_identical_long_answers_score_one():
    assert char_bleu("春风又绿江南岸", "春风又绿江南岸") == pytest.approx(1.0)
    assert char_bleu("抬起头来", "抬起头来", reweigh=True) == pytest.approx(1.0)


@pytest.mark.parametrize("text, expected", [
    # n characters have n n-gram orders at precision 1; each of the 4 - n missing orders is 0/1, which method1
    # smooths to 0.1. With weights 1/4: exp(sum(log p) / 4) = 0.1 ** ((4 - n) / 4), and the brevity penalty is 1.
    ("疑", 0.1 ** 0.75),   # 0.1778
    ("好像", 0.1 ** 0.5),  # 0.3162
    ("好像。", 0.1 ** 0.25),  # 0.5623
])
def test_identical_short_answers(text, expected):
    assert char_bleu(text, text) == pytest.approx(expected, rel=1e-9)
    assert char_bleu(text, text, reweigh=True) == pytest.approx(1.0)


def test_partial_overlap_by_hand():
    # reference 春风又绿江南岸 (7 characters), hypothesis 春风吹绿江南 (6):
    #   1-grams 春 风 吹 绿 江 南: all but 吹 in the reference  -> 5/6
    #   2-grams 春风 风吹 吹绿 绿江 江南: 春风 绿江 江南        -> 3/5
    #   3-grams 春风吹 风吹绿 吹绿江 绿江南: 绿江南             -> 1/4
    #   4-grams 春风吹绿 风吹绿江 吹绿江南: none, smoothed      -> 0.1/3
    #   brevity penalty exp(1 - 7/6)
    expected = math.exp(1 - 7 / 6) * (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert char_bleu("春风又绿江南岸", "春风吹绿江南") == pytest.approx(expected, rel=1e-9)  # 0.2150
    # 6 characters reach all four orders, so reweighing changes nothing
    assert char_bleu("春风又绿江南岸", "春风吹绿江南", reweigh=True) == pytest.approx(expected, rel=1e-9)


def test_short_partial_answer_by_hand():
    # reference 好像。, hypothesis 好像: precisions 2/2 and 1/1, brevity penalty exp(1 - 3/2).
    # Default weights add two smoothed orders (0.1 each); reweighing uses weights 1/2 over the two orders it has.
    penalty = math.exp(1 - 3 / 2)
    assert char_bleu("好像。", "好像") == pytest.approx(penalty * 0.1 ** 0.5, rel=1e-9)  # 0.1918
    assert char_bleu("好像。", "好像", reweigh=True) == pytest.approx(penalty, rel=1e-9)  # 0.6065


def test_empty_hypothesis_scores_zero_without_nltk(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nltk called on an empty hypothesis")

    monkeypatch.setattr("poetry.metrics.sentence_bleu", refuse)
    assert char_bleu("好像", "") == 0.0
    assert char_bleu("好像", "  \n", reweigh=True) == 0.0


def test_aggregates_average_over_answers_not_items():
    scores = score_answers(GOLD, PRED)
    # words 1, 0 | 1 -> 2/3 (per-item means would give 0.75); sentences 1 | 0, 1 -> 2/3; one letter of two right
    assert scores.bleu_words == pytest.approx(2 / 3)
    assert scores.bleu_sents == pytest.approx(2 / 3)
    assert scores.acc == pytest.approx(0.5)
    assert scores.proxy_total == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert [item.correct for item in scores.items] == [True, False]
    assert [w.bleu for w in scores.items[0].words] == pytest.approx([1.0, 0.0])


def test_total_is_none_without_bertscore():
    scores = score_answers(GOLD, PRED)
    assert scores.total is None and scores.incomplete
    assert scores.bertscore_words is None and scores.bertscore_sents is None
    assert scores.bertscore_off == "no BERTScore model given"
    report = json.loads(json.dumps(scores.to_dict(), ensure_ascii=False))
    assert report["total"] is None and report["incomplete"] is True
    assert report["proxy_total"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_total_with_bertscore():
    scores = score_answers(GOLD, PRED, FakeBertScore())
    # BERTScore 1, 0.5 | 1 -> 5/6 for words, 1 | 0.5, 1 -> 5/6 for sentences
    assert scores.bertscore_words == pytest.approx(5 / 6) and scores.bertscore_sents == pytest.approx(5 / 6)
    assert scores.total == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3 + 2 / 3 + 5 / 6 + 5 / 6) / 4)  # 0.625
    assert not scores.incomplete and scores.bertscore_off is None


def test_pairs_by_position_and_missing_answers_score_zero():
    item = score_answers(GOLD[:1], [RENAMED_AND_SHORT], FakeBertScore()).items[0]
    assert [w.key for w in item.words] == ["疑", "举头"]  # gold keys; the prediction's keys are not consulted
    assert [(w.pred, w.bleu, w.bleu_reweighed) for w in item.words] == [("好像是这样", 1.0, 1.0), ("", 0.0, 0.0)]
    assert item.sents[0].bleu == pytest.approx(1.0)


def test_items_without_gold_letter_are_left_out_of_accuracy():
    gold = [GOLD[0], Answer(1, GOLD[1].ans_qa_words, GOLD[1].ans_qa_sents, None)]
    scores = score_answers(gold, PRED)
    assert scores.acc == 1.0 and scores.items[1].correct is None


def test_mismatched_item_counts_raise():
    with pytest.raises(ValueError, match="1 predicted items for 2 gold items"):
        score_answers(GOLD, PRED[:1])


def test_bertscore_identical_and_different(tiny_bert):
    f1 = tiny_bert.f1(["春风又绿江南岸", "好像是这样", "抬起头来"], ["春风又绿江南岸", "好像是这样", "完全不同"])
    assert f1[0] == pytest.approx(1.0, abs=1e-5) and f1[1] == pytest.approx(1.0, abs=1e-5)
    assert f1[2] < 0.99


def test_bertscore_empty_candidate_is_zero_and_never_scored(tiny_bert):
    # bert-score itself crashes on an empty candidate with a BertTokenizer; the guard must keep it away
    assert tiny_bert.f1(["", "  ", "好像"], ["好像", "好像", "好像"]) == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)
    assert tiny_bert.f1([], []) == []


def test_score_answers_with_real_bertscore(tiny_bert):
    scores = score_answers(GOLD, PRED, tiny_bert)
    assert scores.total is not None and not scores.incomplete
    assert scores.items[0].words[0].bertscore == pytest.approx(1.0, abs=1e-5)
    assert scores.items[0].words[1].bertscore < 0.99
    # a missing answer reaches BertScore as "", which must score 0 rather than crash the tokenizer
    item = score_answers(GOLD[:1], [RENAMED_AND_SHORT], tiny_bert).items[0]
    assert [w.bertscore for w in item.words] == pytest.approx([1.0, 0.0], abs=1e-5)


def test_missing_or_broken_model_is_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="does not exist"):
        BertScore(tmp_path / "absent", layer=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricUnavailable, match="cannot load a BERTScore model"):
        BertScore(tmp_path / "empty", layer=8)


def test_layer_beyond_the_model_is_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="num_layers"):
        BertScore(build_tiny_bert(tmp_path / "bert", model_max_length=128), layer=5)


def by_hand_f1(model_dir, layer: int, candidate: str, reference: str) -> float:
    """BERTScore F1 computed directly, as bert-score does for BERT: the first `layer` layers over the framed text;
    each real token takes its best match among all the other side's tokens (frame included, like [CLS]/[SEP]), and
    only real tokens are averaged."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    model.layers = model.layers[:layer]
    frame = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]

    def embed(text):
        ids = frame + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.float(), dim=-1)

    similarity = embed(candidate) @ embed(reference).T
    precision, recall = similarity.max(1).values[1:-1].mean(), similarity.max(0).values[1:-1].mean()
    return float(2 * precision * recall / (precision + recall))


def test_bertscore_frames_a_decoder_tokenizer_like_bert(tiny_model_dir, capfd):
    """The tiny model's Qwen tokenizer adds no special tokens: unframed, bert-score zeroes every two-token answer
    as 'empty' (and a <bos>-only tokenizer would count <bos> as a perfect match)."""
    scorer = BertScore(tiny_model_dir, layer=1)
    pairs = [("月", "日"), ("明月", "月光"), ("床前明月光", "床前明月光"), ("低头思故乡", "举头望明月")]
    f1 = scorer.f1([c for c, _ in pairs], [r for _, r in pairs])
    assert f1 == pytest.approx([by_hand_f1(tiny_model_dir, 1, c, r) for c, r in pairs], abs=1e-5)
    assert f1[2] == pytest.approx(1.0, abs=1e-5) and all(0 < value < 0.999 for value in (f1[0], f1[1], f1[3]))
    assert "Empty candidate" not in capfd.readouterr().err


def lcs(a: str, b: str) -> int:
    """Longest common subsequence, by the textbook dynamic programme."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def f_measure(overlap: int, hypothesis: int, reference: int) -> float:
    precision, recall = overlap / hypothesis, overlap / reference
    return 0.0 if overlap == 0 else 2 * precision * recall / (precision + recall)


def ngram_overlap(reference: str, hypothesis: str, n: int) -> tuple[int, int, int]:
    from collections import Counter

    def grams(text):
        return Counter(text[i:i + n] for i in range(len(text) - n + 1))

    ref, hyp = grams(reference), grams(hypothesis)
    return sum((ref & hyp).values()), sum(hyp.values()), sum(ref.values())


@pytest.mark.parametrize("reference, hypothesis", [
    ("床前洒满月光，好像地上结了霜。", "床前的月光好像地上的霜。"),
    ("抬头望着明月", "低头思念故乡"),
    ("明亮的月光", "月光明亮"),
    ("在山中送走了友人，黄昏时关上柴门。", "送走友人以后，我在黄昏关上了柴门。"),
])
def test_rouge_on_chinese_characters_equals_a_hand_computed_lcs_and_overlap(reference, hypothesis):
    scores = char_rouge(reference, hypothesis)
    assert scores["rougeL"] == pytest.approx(f_measure(lcs(reference, hypothesis), len(hypothesis), len(reference)))
    assert scores["rouge1"] == pytest.approx(f_measure(*ngram_overlap(reference, hypothesis, 1)))
    assert scores["rouge2"] == pytest.approx(f_measure(*ngram_overlap(reference, hypothesis, 2)))


def test_rouge_ignores_whitespace_and_scores_empty_answers_zero():
    assert char_rouge("明亮的 月光", "明亮的月光") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert char_rouge("明亮的月光", "  ") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_scores_default_tokenizer_would_score_chinese_zero():
    """Why poetry.metrics gives rouge-score a tokenizer: its default keeps [a-z0-9] only."""
    from rouge_score.rouge_scorer import RougeScorer

    assert RougeScorer(["rougeL"]).score("床前明月光", "床前明月光")["rougeL"].fmeasure == 0.0
    assert char_rouge("床前明月光", "床前明月光")["rougeL"] == 1.0


def test_rouge_aggregates_average_over_answers():
    scores = score_answers(GOLD, PRED)
    words = [char_rouge(g, p)["rougeL"] for g, p in (("好像是这样", "好像是这样"), ("抬起头来", "完全不同"),
                                                      ("明亮的月光", "明亮的月光"))]
    assert scores.rouge("words", "rougeL") == pytest.approx(sum(words) / 3) == pytest.approx(2 / 3)
    assert scores.to_dict()["rougeL_words"] == scores.rouge("words", "rougeL")
