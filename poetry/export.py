"""Taking a fine-tuned adapter to vLLM, for users who outgrow one `infer.py serve` process.

    python -m poetry.export check-vllm ADAPTER_DIR
    python -m poetry.export vllm-requests --input eval.json --output requests.jsonl [--model-name poetry]
                                          [--max-tokens N] [--system-prompt TEXT]
    python -m poetry.export vllm-collect --input eval.json --results results.jsonl --output submission.json

`check-vllm` reads `adapter_config.json` and the adapter's tensors and checks what vLLM's LoRA loader accepts
(vllm/lora/peft_helper.py and vllm/config/lora.py): a LoRA (not prompt or prefix tuning, not IA3), no DoRA, no
`modules_to_save`, no bias, a rank within vLLM's largest `--max-lora-rank`, one rank and alpha for every module, no
trainable tokens, and targets among the decoder's linear projections. It prints each check with the reason for a
failure and what to do instead, then the `vllm serve` command with the smallest `--max-lora-rank` that fits. Exit
code 0 when vLLM can serve the adapter, 1 when it cannot, 2 when the directory is not a readable adapter. These are
the constraints as of vLLM 0.11-0.33; nothing here imports or runs vLLM.

`vllm-requests` writes one request per question in the OpenAI batch format (`{custom_id, method, url, body}`, what
`python -m vllm.entrypoints.openai.run_batch` reads; each `body` also works as is against `vllm serve`): the user
message training used (`poetry.prompt.render_user`), greedy, with `response_format` carrying
`answer_schema(question)`, the JSON Schema of that question's answer (its own words and sentences as required keys,
non-empty values, `choose_id` one of A-D). vLLM's guided decoding then holds the model to our answer shape, as our
constrained decoder does. The requests need the model's chat template (Qwen's, Llama's); a base model without
one, such as the demo's Gemma-3-270M, is served by `infer.py serve`. `vllm-collect` turns the results back into a
submission in the questions' order: JSON Schema fixes which keys appear but not their order, so a reply is read by
key; a reply that is missing, failed or not the schema's object goes through `poetry.decode.parse_free_answer`'s
repairs, and the counts are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .data import Answer, DataError, Issue, Question, check_submission, load_questions, write_submission
from .data.records import OPTION_LETTERS
from .decode import parse_free_answer
from .prompt import render_user

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
# The decoder's linear layers, as the families this project trains name them (Qwen2/3, Llama, Gemma 3), and the
# fused names vLLM gives them: every LoRA-capable model in vLLM takes these.
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "qkv_proj", "gate_up_proj"})


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class NotAnAdapter(ValueError):
    """The directory holds no readable PEFT adapter."""


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(adapter_config.json, {tensor name: shape}) of a PEFT adapter directory."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise NotAnAdapter(f"{directory}: no adapter_config.json (is this a PEFT adapter directory?)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotAnAdapter(f"{config_file}: not a JSON file ({err})") from None
    if not isinstance(config, dict):
        raise NotAnAdapter(f"{config_file}: expected a JSON object")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise NotAnAdapter(f"{directory}: no adapter_model.safetensors (vLLM also reads adapter_model.bin, a "
                           f"pickle this project never writes or loads)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as tensors:
            shapes = {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise NotAnAdapter(f"{weights}: not a readable safetensors file ({err})") from None
    return config, shapes


def _module(tensor: str) -> str | None:
    """The adapted module's own name (`q_proj`) of a LoRA tensor (`...q_proj.lora_A.weight`); None otherwise."""
    parts = tensor.split(".")
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        if marker in parts:
            return parts[parts.index(marker) - 1]
    return None


def _rank_check(config: dict, shapes: dict[str, tuple[int, ...]]) -> Check:
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        return Check("rank", False, f"adapter_config.json's r is {rank!r}, not a positive integer")
    ranks = {shape[0] for name, shape in shapes.items() if ".lora_A." in name and shape}
    if ranks - {rank}:
        return Check("rank", False, f"lora_A tensors have ranks {sorted(ranks)} but r is {rank}: the config does not "
                                    f"describe these weights")
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        return Check("rank", False, f"r={rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                                    f"retrain with a smaller lora.r, or merge (infer.py merge) and serve the result")
    return Check("rank", True, f"r={rank}: serve with --max-lora-rank {serving_rank(rank)}")


def serving_rank(rank: int) -> int:
    """The smallest of vLLM's --max-lora-rank values that holds `rank`."""
    return next(allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank)


def vllm_checks(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[Check]:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [Check("method", False, f"peft_type is {peft_type!r}: vLLM serves LoRA adapters only (not prompt, "
                                       f"prefix or P-tuning, not IA3); serve it with infer.py serve instead")]
    checks = [Check("method", True, "LoRA")]
    checks.append(Check("dora", not config.get("use_dora"),
                        "use_dora is set: vLLM does not serve DoRA (its magnitude vectors would be dropped); merge "
                        "it (infer.py merge) and serve the merged model, or retrain with lora.use_dora=false"
                        if config.get("use_dora") else "no DoRA"))
    saved = config.get("modules_to_save") or []
    checks.append(Check("modules_to_save", not saved,
                        f"modules_to_save={saved}: vLLM loads no full copies of modules beside the adapter (trained "
                        f"embeddings or lm_head would be lost); merge the adapter and serve the merged model"
                        if saved else "none"))
    bias = config.get("bias", "none")
    has_bias = bias != "none" or bool(config.get("lora_bias"))
    checks.append(Check("bias", not has_bias,
                        f"bias={bias!r}, lora_bias={config.get('lora_bias')}: vLLM's LoRA loader refuses adapter "
                        f"biases; retrain with bias='none'" if has_bias else "none"))
    checks.append(_rank_check(config, shapes))
    patterns = {key: config.get(key) for key in ("rank_pattern", "alpha_pattern") if config.get(key)}
    checks.append(Check("one rank and alpha", not patterns,
                        f"{', '.join(patterns)} set: vLLM scales every module by one lora_alpha/r, so per-module "
                        f"ranks or alphas would be scaled wrongly; retrain without them" if patterns else
                        f"lora_alpha={config.get('lora_alpha')} for every module"
                        + (" (rsLoRA scaling, which vLLM applies)" if config.get("use_rslora") else "")))
    tokens = config.get("trainable_token_indices")
    checks.append(Check("trainable tokens", not tokens,
                        "trainable_token_indices is set: vLLM has no trainable-token deltas; merge instead"
                        if tokens else "none"))
    checks.append(_targets_check(shapes))
    return checks


def _targets_check(shapes: dict[str, tuple[int, ...]]) -> Check:
    modules = {_module(name) for name in shapes}
    strays = sorted(name for name in shapes if _module(name) is None)
    if strays:
        return Check("targets", False, f"{len(strays)} tensors are not LoRA matrices (e.g. {strays[0]}): vLLM "
                                       f"refuses them; a DoRA magnitude or a saved module is the usual cause")
    if not modules:
        return Check("targets", False, "the adapter holds no LoRA tensors")
    unsupported = sorted(modules - VLLM_LORA_MODULES)
    if unsupported:
        return Check("targets", False, f"{', '.join(unsupported)}: LoRA outside the decoder's linear projections "
                                       f"is not portable across vLLM versions (LoRA on embeddings and lm_head lost "
                                       f"its extra vocabulary in 2025); merge instead, or retrain with "
                                       f"lora.target_modules=[all-linear]")
    return Check("targets", True, ", ".join(sorted(modules)))


def vllm_command(config: dict, adapter: str | Path, name: str = "poetry") -> str:
    base = config.get("base_model_name_or_path") or "BASE_MODEL_DIR"
    return (f"vllm serve {base} --enable-lora --lora-modules {name}={adapter} "
            f"--max-lora-rank {serving_rank(config.get('r') or 1)}")


def answer_schema(question: Question) -> dict:
    """The JSON Schema of `question`'s answer: the parts it asks, its words and sentences as required keys with
    non-empty text, choose_id a letter; nothing else."""
    def keyed(keys: tuple[str, ...]) -> dict:
        return {"type": "object", "properties": {key: {"type": "string", "minLength": 1} for key in keys},
                "required": list(keys), "additionalProperties": False}

    properties: dict = {}
    if question.qa_words:
        properties["ans_qa_words"] = keyed(question.qa_words)
    if question.qa_sents:
        properties["ans_qa_sents"] = keyed(question.qa_sents)
    if question.choose:
        properties["choose_id"] = {"type": "string", "enum": list(OPTION_LETTERS)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def vllm_request(question: Question, model_name: str, max_tokens: int, system_prompt: str = "") -> dict:
    """An OpenAI chat-completions body for vLLM: the training prompt, greedy, held to `answer_schema`."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {"model": model_name, "messages": [*system, {"role": "user", "content": render_user(question)}],
            "temperature": 0, "max_tokens": max_tokens,
            "chat_template_kwargs": {"enable_thinking": False},  # as training rendered it; other templates ignore it
            "response_format": {"type": "json_schema", "json_schema": {
                "name": f"answer_{question.idx}", "schema": answer_schema(question), "strict": True}}}


def batch_line(question: Question, model_name: str, max_tokens: int, system_prompt: str = "") -> dict:
    """One line of an OpenAI batch file: the request for `question`, named by its idx."""
    return {"custom_id": f"idx-{question.idx}", "method": "POST", "url": "/v1/chat/completions",
            "body": vllm_request(question, model_name, max_tokens, system_prompt)}


def read_batch_results(path: str | Path) -> dict[str, str | None]:
    """{custom_id: the reply's text} from a batch results file; None for a request that failed."""
    replies: dict[str, str | None] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
            response = result.get("response") or {}
            # OpenAI nests the completion in `body` (null for a failed request); early vLLM did not nest it
            body = (response["body"] if "body" in response else response) or {}
            text = body["choices"][0]["message"]["content"] if body.get("choices") else None
            replies[result["custom_id"]] = text
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise DataError([Issue(str(path), number, None, f"not a batch result line ({type(err).__name__}: "
                                                            f"{err})", "line")]) from None
    return replies


def answer_from_reply(question: Question, reply: str | None) -> tuple[Answer, tuple[str, ...]]:
    """The answer a reply holds, read by key, and the repairs it took: none for the schema's object, else
    parse_free_answer's (plus `missing_reply` when there was no reply)."""
    if reply is None:
        answer, repairs = parse_free_answer(question, "")
        return answer, ("missing_reply", *repairs)
    try:
        parsed = json.loads(reply)
    except ValueError:
        parsed = None
    sections = [("ans_qa_words", question.qa_words), ("ans_qa_sents", question.qa_sents)]
    if isinstance(parsed, dict) and all(_has_texts(parsed.get(name), keys) for name, keys in sections if keys) \
            and (not question.choose or parsed.get("choose_id") in OPTION_LETTERS):
        words, sents = ({key: parsed[name][key].strip() for key in keys} if keys else {} for name, keys in sections)
        return Answer(question.idx, words, sents, parsed.get("choose_id") if question.choose else None), ()
    return parse_free_answer(question, reply)


def _has_texts(section: object, keys: tuple[str, ...]) -> bool:
    return isinstance(section, dict) and all(isinstance(section.get(k), str) and section[k].strip() for k in keys)


def _check_vllm(args: argparse.Namespace) -> int:
    config, shapes = read_adapter(args.adapter)
    checks = vllm_checks(config, shapes)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    if all(check.ok for check in checks):
        print(f"vLLM can serve this adapter:\n  {vllm_command(config, Path(args.adapter).resolve())}")
        return 0
    print(f"vLLM cannot serve this adapter as it is ({sum(not c.ok for c in checks)} of {len(checks)} checks "
          f"failed)")
    return 1


def _vllm_requests(args: argparse.Namespace) -> int:
    questions = load_questions(args.input).records
    lines = [json.dumps(batch_line(q, args.model_name, args.max_tokens, args.system_prompt), ensure_ascii=False)
             for q in questions]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} requests to {args.output}")
    return 0


def _vllm_collect(args: argparse.Namespace) -> int:
    questions = load_questions(args.input).records
    replies = read_batch_results(args.results)
    unknown = sorted(set(replies) - {f"idx-{q.idx}" for q in questions})
    if unknown:
        raise DataError([Issue(str(args.results), None, "custom_id", f"{len(unknown)} results answer no question of "
                                                                      f"{args.input} (e.g. {unknown[0]})")])
    answered = [answer_from_reply(q, replies.get(f"idx-{q.idx}")) for q in questions]
    answers = [answer for answer, _ in answered]
    check_submission(questions, answers, args.output)
    write_submission(answers, args.output)
    repaired = Counter(repair for _, repairs in answered for repair in repairs)
    needed = sum(bool(repairs) for _, repairs in answered)
    listed = ", ".join(f"{kind} {n}" for kind, n in repaired.most_common())
    print(f"wrote {len(answers)} answers to {args.output}; {needed} needed repair" + (f" ({listed})" if listed else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poetry.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-vllm", help="can vLLM serve this LoRA adapter, and with which flags")
    check.add_argument("adapter", help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    requests = commands.add_parser("vllm-requests", help="chat-completions bodies with the answer's JSON Schema")
    requests.add_argument("--input", required=True, help="evaluation questions: a JSON list or JSONL")
    requests.add_argument("--output", required=True, help="JSONL file of request bodies to write")
    requests.add_argument("--model-name", default="poetry", help="the --lora-modules name (default: %(default)s)")
    requests.add_argument("--max-tokens", type=int, default=512, help="reply budget (default: %(default)s)")
    requests.add_argument("--system-prompt", default="", help="the system message training used (default: none)")
    collect = commands.add_parser("vllm-collect", help="a submission from the results of vllm-requests' requests")
    collect.add_argument("--input", required=True, help="the evaluation questions the requests were made from")
    collect.add_argument("--results", required=True, help="JSONL batch results (run_batch's output)")
    collect.add_argument("--output", required=True, help="submission file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        command = {"check-vllm": _check_vllm, "vllm-requests": _vllm_requests, "vllm-collect": _vllm_collect}
        return command[args.command](args)
    except (NotAnAdapter, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
