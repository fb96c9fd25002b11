"""Writing in a form on a tiny random Qwen3: the form, the rhyme and the tones hold by construction, whatever the
model; greedy and sampled poems are reproducible; the reported log-probability is the model's."""
import importlib.util
import json

import pytest
import torch

from poetry.decode import token_texts
from poetry.prompt import PromptFormat
from poetry.prosody import FORMS, form_named, rhyme_table
from poetry.write import Sampling, char_vocab, write_poems

from conftest import ROOT


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fmt(tokenizer):
    return PromptFormat(tokenizer)


SAMPLED = Sampling(temperature=1.0, top_p=0.95, seed=3)


@pytest.mark.parametrize("tones", ["strict", "loose"])
def test_every_form_comes_out_with_its_lines_rhyme_and_tones_by_construction(model, fmt, tones):
    results = write_poems(model, fmt, [(form, "秋思") for form in FORMS], tones=tones, sampling=SAMPLED,
                          batch_size=len(FORMS))
    for form, (written,) in zip(FORMS, results, strict=True):
        check = written.check
        assert check.lines_ok and check.rhyme_ok, (form.name, written.text, check.violations)
        assert check.ok, (form.name, written.text, [str(v) for v in check.violations])  # no 孤平, no 三平尾 either
        assert written.positions == sum(form.line_lengths) - sum(  # 叠句 are forced, not written
            len(line) for line in form.patterns[0].lines if line.repeats is not None)
    rumengling = results[FORMS.index(form_named("如梦令"))][0].text.replace("。", "，").split("，")
    assert rumengling[4] == rumengling[5]  # the 叠句, forced


def test_without_tones_lines_and_the_even_lines_rhymes_still_hold(model, fmt):
    (written,), = write_poems(model, fmt, [(form_named("七言律诗"), "")], tones="off", sampling=SAMPLED)
    assert written.check.lines_ok
    assert not [v for v in written.check.violations if v.kind == "rhyme" and v.line != 1]  # the first line is free
    assert written.check.tones_right < written.check.tones_checked  # a random model keeps no tone pattern


def test_a_named_rhyme_group_holds_every_rhyme(model, fmt):
    (written,), = write_poems(model, fmt, [(form_named("五言律诗"), "登楼")], rhyme="十一尤", sampling=SAMPLED)
    assert written.check.rhymes == ("十一尤",) and written.check.rhyme_ok
    lines = [line for line in written.text.replace("。", "，").split("，") if line]
    table = rhyme_table()
    assert all("十一尤" in {g.short for g in table.groups_of(line[-1])} for line in lines[1::2])
    with pytest.raises(ValueError, match="上声二十五有 is 仄, but 五言律诗 rhymes 平"):
        write_poems(model, fmt, [(form_named("五言律诗"), "")], rhyme="二十五有")
    (ci,), = write_poems(model, fmt, [(form_named("如梦令"), "")], rhyme="二十五有", sampling=SAMPLED)
    assert ci.check.rhymes == ("第12部",)  # 有 and 宥 rhyme together in a 词


@pytest.mark.parametrize("tones", ["loose", "off"])
def test_regulated_verse_never_rhymes_twice_on_the_character_the_model_prefers(model, fmt, tokenizer, tones):
    preferred = "愁秋楼舟流"  # 十一尤, each a single token; the model wants 愁 most, then 秋, and so on
    bias = torch.zeros(model.get_output_embeddings().out_features)
    for rank, char in enumerate(preferred):
        [token] = tokenizer.encode(char, add_special_tokens=False)
        bias[token] = 100.0 - 10 * rank
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        (written,), = write_poems(model, fmt, [(form_named("七言律诗"), "")], rhyme="十一尤", tones=tones)
    finally:
        hook.remove()
    lines = [line for line in written.text.replace("。", "，").split("，") if line]
    rhymes = [line[-1] for index, line in enumerate(lines) if index % 2 or index == 0 and line[-1] in preferred]
    assert rhymes == list(preferred[:len(rhymes)]) and len(rhymes) >= 4  # each the preferred one not yet used
    assert not [str(v) for v in written.check.violations if v.kind == "重韵"]
    if tones == "loose":
        assert written.check.ok, [str(v) for v in written.check.violations]


def test_only_single_character_tokens_are_written(fmt, model):
    texts = token_texts(model, fmt)
    chars = char_vocab(tuple(texts), model.get_output_embeddings().out_features, "cpu")
    single = chars.single.nonzero().flatten().tolist()
    assert single and all(len(texts[i]) == 1 for i in single)
    assert not (chars.single & chars.several).any() and chars.several.any()
    (written,), = write_poems(model, fmt, [(form_named("五绝"), "")], sampling=SAMPLED)
    written_chars = [i for i in written.ids if chars.single[i]]
    assert "".join(texts[i] for i in written_chars) == written.text.replace("，", "").replace("。", "")


def test_the_reported_log_probability_is_the_models_own(model, fmt):
    (written,), = write_poems(model, fmt, [(form_named("七绝"), "春日")], sampling=SAMPLED)
    prompt = fmt.writing_prompt_ids("七言绝句", "春日")
    sequence = torch.tensor([prompt + list(written.ids)])
    with torch.no_grad():
        logprobs = model(sequence).logits[0].float().log_softmax(-1)
    chars = char_vocab(tuple(token_texts(model, fmt)), model.get_output_embeddings().out_features, "cpu")
    picked = [logprobs[len(prompt) + i - 1, token] for i, token in enumerate(written.ids) if chars.single[token]]
    assert len(picked) == written.positions == 28
    assert written.mean_logprob == pytest.approx(float(torch.stack(picked).mean()), abs=1e-4)


def test_greedy_is_deterministic_and_independent_of_its_batch(model, fmt):
    alone = write_poems(model, fmt, [(form_named("五言绝句"), "月")], batch_size=1)
    together = write_poems(model, fmt, [(form_named("七言律诗"), "风"), (form_named("五言绝句"), "月"),
                                        (form_named("浣溪沙"), "")], batch_size=3)
    assert alone[0][0].text == together[1][0].text and alone[0][0].ids == together[1][0].ids


def test_sampled_candidates_are_reproducible_distinct_and_ranked(model, fmt):
    request = [(form_named("五言绝句"), "月")]
    first = write_poems(model, fmt, request, n=3, sampling=SAMPLED)[0]
    again = write_poems(model, fmt, request, n=3, sampling=SAMPLED)[0]
    assert [w.text for w in first] == [w.text for w in again]
    assert len({w.text for w in first}) == 3
    assert [w.mean_logprob for w in first] == sorted((w.mean_logprob for w in first), reverse=True)
    other_seed = write_poems(model, fmt, request, n=3, sampling=Sampling(1.0, 0.95, seed=4))[0]
    assert {w.text for w in other_seed} != {w.text for w in first}
    with pytest.raises(ValueError, match="several candidates need sampling"):
        write_poems(model, fmt, request, n=2)


@pytest.fixture(scope="module")
def infer():
    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_write_prints_each_poem_with_its_check_and_writes_a_file(infer, tiny_model_dir, tmp_path, capsys):
    base = ["write", "--model", str(tiny_model_dir), "--dtype", "fp32"]
    assert infer.main([*base, "--form", "七绝", "--title", "秋思", "--rhyme", "十一尤", "--tones", "strict"]) == 0
    out = capsys.readouterr().out
    assert "《秋思》 七言绝句\n1. " in out and "rhyme 十一尤 right" in out
    assert "one character a token: the model's most likely token held several characters at" in out
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"form": "如梦令", "title": ""}, {"form": "五律", "title": "山居"}],
                                   ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "poems.json"
    assert infer.main([*base, "--input", str(requests), "--output", str(output), "--n", "2",
                       "--temperature", "0.9", "--seed", "1"]) == 0
    assert "writing: 4 poems (candidates counted)" in capsys.readouterr().out  # not "4 questions"
    rows = json.loads(output.read_text(encoding="utf-8"))
    assert [(r["form"], r["title"], len(r["poems"])) for r in rows] == [("如梦令", "", 2), ("五言律诗", "山居", 2)]
    assert all(p["lines_ok"] and p["rhyme_ok"] for r in rows for p in r["poems"])


def test_infer_write_input_errors_name_the_record_and_field(infer, tiny_model_dir, tmp_path, capsys):
    base = ["write", "--model", str(tiny_model_dir)]
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"form": "七绝", "title": "a"}, {"form": "八绝", "title": "b"}],
                                   ensure_ascii=False), encoding="utf-8")
    assert infer.main([*base, "--input", str(requests), "--output", str(tmp_path / "o.json")]) == 2
    assert f"error: {requests}:1: field 'form': unknown form '八绝'" in capsys.readouterr().err
    requests.write_text(json.dumps([{"title": "a"}]), encoding="utf-8")
    assert infer.main([*base, "--input", str(requests), "--output", str(tmp_path / "o.json")]) == 2
    assert "record 0: field 'form': missing field" in capsys.readouterr().err
    assert infer.main([*base, "--form", "七绝", "--n", "2"]) == 2
    assert "several candidates need sampling" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main([*base, "--form", "七绝", "--input", str(requests)])
    assert "give --form (and --title), or --input with --output" in capsys.readouterr().err


@pytest.mark.slow  # 108 sampled poems: over the CI budget (make test-slow)
def test_a_hundred_seeds_of_every_form_keep_form_rhyme_and_tones(model, fmt):
    for tones in ("strict", "loose"):  # 12 candidates a form, each from its own generator
        results = write_poems(model, fmt, [(form, "") for form in FORMS], n=12, tones=tones,
                              sampling=Sampling(1.0, 1.0, seed=7), batch_size=16)
        for form, candidates in zip(FORMS, results, strict=True):
            assert len({w.text for w in candidates}) == 12
            for written in candidates:
                assert written.check.ok, (form.name, written.text, [str(v) for v in written.check.violations])


def test_infer_write_refuses_a_bad_rhyme_before_loading_the_model(infer, tmp_path, capsys):
    absent = str(tmp_path / "no-model")  # loading it would fail: the rhyme must be refused first
    assert infer.main(["write", "--model", absent, "--form", "七绝", "--rhyme", "二十五有"]) == 2
    assert "上声二十五有 is 仄, but 七言绝句 rhymes 平" in capsys.readouterr().err
