"""python -m poetry.export: check-vllm on real PEFT adapters (LoRA, DoRA, modules_to_save, prompt tuning) and on
configs varied one constraint at a time; the answer's JSON Schema against real and broken answers; the batch
requests and the collection of their results into a submission."""
import json

import jsonschema
import pytest

from poetry import export
from poetry.config import LoraConfig, ModelConfig
from poetry.data import Answer, check_submission, load_answers, load_questions
from poetry.model import add_lora, load_model
from poetry.prompt import render_user

from conftest import SAMPLE

EVAL = SAMPLE / "eval.json"
GOLD = SAMPLE / "eval_gold.json"
LAYER = "base_model.model.model.layers.0"


def run(capsys, *argv):
    code = export.main([str(a) for a in argv])
    return code, capsys.readouterr()


def saved(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return lambda: load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)


def test_a_plain_lora_adapter_passes_and_gets_the_serve_command(base, tiny_model_dir, tmp_path, capsys):
    adapter = saved(add_lora(base(), LoraConfig(r=12, alpha=24)), tmp_path / "lora")
    code, printed = run(capsys, "check-vllm", adapter)
    assert code == 0, printed.out
    assert "FAIL" not in printed.out and "ok   rank: r=12: serve with --max-lora-rank 16" in printed.out
    assert f"vllm serve {tiny_model_dir} --enable-lora --lora-modules poetry={adapter.resolve()} --max-lora-rank 16" \
        in printed.out


def test_dora_fails_naming_the_switch_and_its_extra_tensors(base, tmp_path, capsys):
    adapter = saved(add_lora(base(), LoraConfig(r=4, alpha=8, use_dora=True)), tmp_path / "dora")
    code, printed = run(capsys, "check-vllm", adapter)
    assert code == 1
    assert "FAIL dora: use_dora is set: vLLM does not serve DoRA" in printed.out
    assert "FAIL targets:" in printed.out and "lora_magnitude_vector" in printed.out
    assert "vLLM cannot serve this adapter as it is (2 of 8 checks failed)" in printed.out


def test_modules_to_save_fails(base, tmp_path, capsys):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(base(), PeftLoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    code, printed = run(capsys, "check-vllm", saved(model, tmp_path / "saved"))
    assert code == 1 and "FAIL modules_to_save: modules_to_save=['lm_head']" in printed.out


def test_prompt_tuning_is_not_a_lora(base, tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(base(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    code, printed = run(capsys, "check-vllm", saved(model, tmp_path / "prompt"))
    assert code == 1 and "FAIL method: peft_type is 'PROMPT_TUNING': vLLM serves LoRA adapters only" in printed.out


LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "use_dora": False,
        "target_modules": ["q_proj", "v_proj"]}
SHAPES = {f"{LAYER}.self_attn.q_proj.lora_A.weight": (8, 64), f"{LAYER}.self_attn.q_proj.lora_B.weight": (64, 8),
          f"{LAYER}.self_attn.v_proj.lora_A.weight": (8, 64), f"{LAYER}.self_attn.v_proj.lora_B.weight": (32, 8)}


@pytest.mark.parametrize("config, shapes, failed, words", [
    ({"r": 600}, {name: (600, 64) if ".lora_A." in name else (64, 600) for name in SHAPES}, "rank",
     "r=600 is above vLLM's largest --max-lora-rank (512)"),
    ({"r": 16}, {}, "rank", "lora_A tensors have ranks [8] but r is 16"),
    ({"bias": "all"}, {}, "bias", "refuses adapter biases"),
    ({"lora_bias": True}, {}, "bias", "refuses adapter biases"),
    ({"alpha_pattern": {"q_proj": 64}}, {}, "one rank and alpha", "alpha_pattern set"),
    ({"trainable_token_indices": [5, 6]}, {}, "trainable tokens", "no trainable-token deltas"),
    ({}, {f"{LAYER}.embed_tokens.lora_embedding_A": (8, 100)}, "targets", "embed_tokens: LoRA outside"),
    ({}, {"base_model.model.lm_head.weight": (100, 64)}, "targets", "1 tensors are not LoRA matrices"),
])
def test_each_constraint_fails_alone_and_says_why(config, shapes, failed, words):
    checks = export.vllm_checks(LORA | config, (SHAPES if not config.get("r") == 600 else {}) | shapes)
    failures = [check for check in checks if not check.ok]
    assert [check.name for check in failures] == [failed] and words in failures[0].detail


def test_the_serving_rank_is_the_smallest_vllm_value_that_holds_r():
    assert [export.serving_rank(r) for r in (1, 2, 8, 9, 300, 321, 512)] == [1, 8, 8, 16, 320, 512, 512]


@pytest.mark.parametrize("make", ["absent", "no_weights", "bad_json", "bad_weights"])
def test_a_directory_that_is_no_adapter_is_one_error_line(tmp_path, capsys, make):
    adapter = tmp_path / "adapter"
    if make != "absent":
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{" if make == "bad_json" else json.dumps(LORA))
        if make == "bad_weights":
            (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    code, printed = run(capsys, "check-vllm", adapter)
    assert code == 2 and printed.out == "" and printed.err.startswith(f"error: {adapter}")
    assert len(printed.err.strip().splitlines()) == 1


def test_the_answer_schema_takes_gold_answers_and_refuses_broken_ones():
    questions = load_questions(EVAL).records
    for question, gold in zip(questions, load_answers(GOLD), strict=True):
        schema = export.answer_schema(question)
        answer = {k: v for k, v in gold.to_json().items() if k != "idx"}
        jsonschema.validate(answer, schema)
        word = question.qa_words[0]
        for broken in ({**answer, "choose_id": "E"}, {**answer, "extra": 1},
                       {**answer, "ans_qa_words": {**answer["ans_qa_words"], word: ""}},
                       {**answer, "ans_qa_words": {k: v for k, v in answer["ans_qa_words"].items() if k != word}},
                       {k: v for k, v in answer.items() if k != "ans_qa_sents"}):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(broken, schema)


def test_requests_carry_the_training_prompt_and_the_schema(tmp_path, capsys):
    out = tmp_path / "requests.jsonl"
    code, printed = run(capsys, "vllm-requests", "--input", EVAL, "--output", out, "--model-name", "poet",
                        "--max-tokens", 300)
    questions = load_questions(EVAL).records
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert code == 0 and f"wrote {len(questions)} requests" in printed.out
    for question, line in zip(questions, lines, strict=True):
        body = line["body"]
        assert line["custom_id"] == f"idx-{question.idx}" and line["url"] == "/v1/chat/completions"
        assert body["model"] == "poet" and body["temperature"] == 0 and body["max_tokens"] == 300
        assert body["messages"] == [{"role": "user", "content": render_user(question)}]
        assert body["response_format"]["json_schema"]["schema"] == export.answer_schema(question)


def result_line(custom_id: str, content: str | None) -> str:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]} if content is not None \
        else None
    return json.dumps({"id": "batch-1", "custom_id": custom_id,
                       "response": {"status_code": 200 if body else 500, "body": body},
                       "error": None if body else {"message": "boom"}}, ensure_ascii=False)


def test_results_come_back_as_a_submission_read_by_key(tmp_path, capsys):
    questions = load_questions(EVAL).records
    golds = load_answers(GOLD)
    lines = []
    for question, gold in zip(questions[:-2], golds, strict=False):
        reordered = {"choose_id": gold.choose_id,  # keys in another order than the question's: read by key
                     "ans_qa_sents": dict(reversed(gold.ans_qa_sents.items())),
                     "ans_qa_words": dict(reversed(gold.ans_qa_words.items()))}
        lines.append(result_line(f"idx-{question.idx}", json.dumps(reordered, ensure_ascii=False)))
    mangled = {"words": golds[-2].ans_qa_words, "sents": golds[-2].ans_qa_sents, "choose_id": "B"}
    lines.append(result_line(f"idx-{questions[-2].idx}", json.dumps(mangled)))  # not the schema's object
    results, out = tmp_path / "results.jsonl", tmp_path / "submission.json"  # the last question has no result
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, printed = run(capsys, "vllm-collect", "--input", EVAL, "--results", results, "--output", out)
    assert code == 0, printed.err
    answers = load_answers(out)
    check_submission(questions, answers, str(out))
    assert answers[:-2] == golds[:-2]
    assert answers[-2] == Answer(questions[-2].idx, golds[-2].ans_qa_words, golds[-2].ans_qa_sents, "B")
    last = questions[-1]  # no reply: each key stands in for its value, and A for the letter
    assert answers[-1] == Answer(last.idx, {w: w for w in last.qa_words}, {s: s for s in last.qa_sents}, "A")
    assert f"wrote {len(questions)} answers" in printed.out and "2 needed repair" in printed.out
    assert "missing_reply 1" in printed.out


def test_a_failed_request_counts_as_missing_and_strangers_are_refused(tmp_path, capsys):
    questions = load_questions(EVAL).records
    results = tmp_path / "results.jsonl"
    results.write_text(result_line(f"idx-{questions[0].idx}", None) + "\n", encoding="utf-8")
    code, printed = run(capsys, "vllm-collect", "--input", EVAL, "--results", results, "--output", tmp_path / "s.json")
    assert code == 0 and f"{len(questions)} needed repair" in printed.out
    results.write_text(result_line("idx-99999", "{}") + "\n", encoding="utf-8")
    code, printed = run(capsys, "vllm-collect", "--input", EVAL, "--results", results, "--output", tmp_path / "s.json")
    assert code == 2 and "field 'custom_id': 1 results answer no question" in printed.err
    results.write_text("not json\n", encoding="utf-8")
    code, printed = run(capsys, "vllm-collect", "--input", EVAL, "--results", results, "--output", tmp_path / "s.json")
    assert code == 2 and f"{results}:line 1: not a batch result line" in printed.err


def test_lora_weights_are_float_tensors_of_the_checked_rank(base, tmp_path):
    """The rank check reads shapes from the file: they are what PEFT wrote."""
    adapter = saved(add_lora(base(), LoraConfig(r=4, alpha=8)), tmp_path / "lora")
    config, shapes = export.read_adapter(adapter)
    assert config["r"] == 4 and shapes
    assert {shape[0] for name, shape in shapes.items() if ".lora_A." in name} == {4}
    assert {shape[1] for name, shape in shapes.items() if ".lora_B." in name} == {4}
