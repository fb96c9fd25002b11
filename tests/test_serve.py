"""infer.py serve over real HTTP on 127.0.0.1: answers equal to predict's, alone and under concurrent load, the
OpenAI client whole and streamed, malformed bodies, capacity (503 + Retry-After), batching, and one request's
failure isolated from the others'. The model-backed tests run the tiny model through the same wiring as the CLI;
the queueing tests run the server over stand-in answer and chat functions, to hold the model thread at will."""
import asyncio
import contextlib
import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from poetry.data import Answer, check_submission, load_questions
from poetry.decode import Reply
from poetry.serve import ServeConfig, create_app

from conftest import ROOT, SAMPLE

_spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
infer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(infer)

EVAL = SAMPLE / "eval.json"
QUESTIONS = json.loads(EVAL.read_text(encoding="utf-8"))
MAX_NEW_TOKENS = "3"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def serving(app):
    """`app` on uvicorn in a thread, on a free port of 127.0.0.1: yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def predicted(tiny_model_dir, tmp_path_factory):
    """infer.py predict's answers to the sample questions: {idx: answer as JSON}."""
    out = tmp_path_factory.mktemp("predict") / "submission.json"
    code = infer.main(["--model", str(tiny_model_dir), "--input", str(EVAL), "--output", str(out), "--dtype", "fp32",
                       "--max-new-tokens", MAX_NEW_TOKENS, "--batch-size", "8"])
    assert code == 0
    return {answer["idx"]: answer for answer in json.loads(out.read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    args = infer._parse(["serve", "--model", str(tiny_model_dir), "--dtype", "fp32", "--max-new-tokens",
                         MAX_NEW_TOKENS, "--max-batch", "8", "--max-wait-ms", "50", "--max-chat-tokens", "16"])
    with serving(infer._app(args)) as base:
        yield base


def test_answers_equal_predicts_for_the_same_questions(url, predicted):
    response = httpx.post(f"{url}/v1/answer", json=QUESTIONS, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == [predicted[q["idx"]] for q in QUESTIONS]


def test_one_question_object_is_answered_as_a_list_of_one(url, predicted):
    response = httpx.post(f"{url}/v1/answer", json=QUESTIONS[3], timeout=60)
    assert response.status_code == 200 and response.json() == [predicted[QUESTIONS[3]["idx"]]]


def test_concurrent_requests_are_batched_and_answered_as_alone(url, predicted):
    """64 one-question requests from 16 clients: no errors, every answer valid and equal to predict's."""
    before = httpx.get(f"{url}/health").json()["stats"]
    requests = [QUESTIONS[i % len(QUESTIONS)] for i in range(64)]

    def client(part: list[dict]) -> list[httpx.Response]:
        with httpx.Client(base_url=url, timeout=120) as session:
            return [session.post("/v1/answer", json=question) for question in part]

    with ThreadPoolExecutor(16) as pool:
        responses = [r for part in pool.map(client, [requests[i::16] for i in range(16)]) for r in part]
    assert [r.status_code for r in responses] == [200] * 64
    questions = {q.idx: q for q in load_questions(EVAL).records}
    for response in responses:
        (answer,) = response.json()
        check_submission([questions[answer["idx"]]], [Answer(**answer)], "response")
        assert answer == predicted[answer["idx"]]
    after = httpx.get(f"{url}/health").json()["stats"]
    assert after["requests"] - before["requests"] == 64 and after["failed"] == 0
    formed = {int(size): n for size, n in after["batch_requests"].items()}
    assert max(formed) > 1 and max(formed) <= 8  # requests shared decodes, never more than --max-batch questions
    assert after["decodes"] - before["decodes"] < 64


def test_openai_client_whole_and_streamed_equals_the_decoder(url, tiny_model_dir):
    openai = pytest.importorskip("openai")
    from poetry.config import ModelConfig
    from poetry.decode import chat
    from poetry.model import load_model, load_tokenizer
    from poetry.prompt import PromptFormat

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["poetry"]
    messages = [{"role": "user", "content": "写一首七言绝句，题为《秋思》。"}]
    whole = client.chat.completions.create(model="poetry", messages=messages, temperature=0, max_tokens=12)
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="fp32"), for_training=False)
    expected = chat(model, PromptFormat(load_tokenizer(str(tiny_model_dir))), messages, 12)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == expected.completion_tokens

    stream = client.chat.completions.create(model="poetry", messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [expected.finish_reason]
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    sampled = client.chat.completions.create(model="poetry", messages=messages, temperature=0.9, top_p=0.8,
                                             max_tokens=4)
    assert sampled.choices[0].message.content is not None


def test_the_stream_is_server_sent_events_ending_in_done(url):
    body = {"model": "poetry", "messages": [{"role": "user", "content": "你好"}], "stream": True, "max_tokens": 4,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in events[:-1])


TOO_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("body, field, words", [
    (b"{not json", None, "not JSON: Expecting property name"),
    (b"\xff\xfe[]", None, "not UTF-8"),
    (TOO_DEEP.encode(), None, "nested too deeply"),
    (b'"a question"', None, "expected a question object or a list of them, got a string"),
    (b"[]", None, "empty list"),
    (json.dumps([{k: v for k, v in QUESTIONS[0].items() if k != "qa_words"}]).encode(), "qa_words",
     "request:record 0: field 'qa_words': missing field"),
    (json.dumps([QUESTIONS[0], QUESTIONS[1] | {"choose": {"A": "x", "B": "y", "C": "z", "E": "w"}}]).encode(),
     "choose", "request:record 1: field 'choose': expected exactly the options A, B, C, D"),
    (json.dumps([QUESTIONS[0], QUESTIONS[0]]).encode(), "idx", "duplicate idx"),
    (json.dumps([QUESTIONS[0] | {"idx": "7"}]).encode(), "idx", "expected an integer, got a string"),
    (json.dumps([QUESTIONS[0] | {"idx": i} for i in range(300)]).encode(), None, "at most 256"),
])
def test_a_malformed_answer_request_is_400_naming_the_field(url, body, field, words):
    response = httpx.post(f"{url}/v1/answer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == field and "Traceback" not in response.text


@pytest.mark.parametrize("change, status, param", [
    ({"messages": None}, 422, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 422, "messages.0.content"),
    ({"temperature": 5}, 422, "temperature"),
    ({"n": 2}, 422, "n"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": 17}, 400, "max_tokens"),
    ({"model": "gpt-4o"}, 404, "model"),
])
def test_a_malformed_chat_request_names_the_field(url, change, status, param):
    body = {"model": "poetry", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2} | change
    response = httpx.post(f"{url}/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param and "Traceback" not in response.text


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b"{", 422),
    ("POST", "/v1/chat/completions", TOO_DEEP.encode(), 400),
    ("GET", "/v1/answer", None, 405),
    ("POST", "/v2/nothing", b"{}", 404),
])
def test_other_bad_requests_get_an_error_object(url, method, path, body, status):
    response = httpx.request(method, f"{url}{path}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and "message" in response.json()["error"]


def test_health_and_models(url):
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "poetry" and health["queue"]["max"] == 256
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["poetry"]


# ---- queueing, over stand-ins that hold the model thread until released ----------------------------------------

def stand_in_answers(questions) -> list[Answer]:
    return [Answer(q.idx, dict.fromkeys(q.qa_words, "释义"), dict.fromkeys(q.qa_sents, "译文"), "A")
            for q in questions]


class HeldModel:
    """Answers only after `release`; records the questions of each batch; fails any batch holding idx 666."""

    def __init__(self):
        self.gate = threading.Event()
        self.batches: list[list[int]] = []

    def answer(self, questions):
        self.gate.wait(30)
        self.batches.append([q.idx for q in questions])
        if any(q.idx == 666 for q in questions):
            raise RuntimeError("a stand-in failure")
        return stand_in_answers(questions)

    def chat(self, turns, max_tokens, temperature, top_p, on_text, cancelled):
        while not cancelled() and not self.gate.wait(0.01):
            if on_text:
                on_text("字")
        return Reply("字", "cancelled" if cancelled() else "stop", 1, 1)


def question(idx: int) -> dict:
    return QUESTIONS[0] | {"idx": idx}


async def post_all(base: str, bodies: list, path: str = "/v1/answer") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as session:
        return await asyncio.gather(*(session.post(path, json=body) for body in bodies))


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_over_capacity_gets_503_with_retry_after_and_the_admitted_still_answer():
    held = HeldModel()
    app = create_app(held.answer, held.chat, ServeConfig(max_batch=4, max_queue=3, max_wait_s=0.0))
    with serving(app) as base, ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(asyncio.run, post_all(base, [[question(1), question(2)], question(3)]))
        wait_for(lambda: httpx.get(f"{base}/health").json()["queue"]["admitted"] == 3)
        refused = httpx.post(f"{base}/v1/answer", json=question(4))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "at capacity" in refused.json()["error"]["message"]
        chat_refused = httpx.post(f"{base}/v1/chat/completions",
                                  json={"model": "poetry", "messages": [{"role": "user", "content": "x"}]})
        assert chat_refused.status_code == 503
        held.gate.set()
        assert [r.status_code for r in admitted.result()] == [200, 200]
        assert httpx.post(f"{base}/v1/answer", json=question(5)).status_code == 200  # room again
        assert httpx.get(f"{base}/health").json()["stats"]["rejected"] == 2


def test_requests_waiting_together_share_a_batch_of_at_most_max_batch():
    held = HeldModel()
    app = create_app(held.answer, held.chat, ServeConfig(max_batch=4, max_wait_s=0.0))
    with serving(app) as base:
        later = behind_a_held_request(base, held, [question(i) for i in range(1, 7)])
    assert [r.status_code for r in later] == [200] * 6
    assert [r.json()[0]["idx"] for r in later] == list(range(1, 7))  # each its own answer
    assert held.batches[0] == [0] and sorted(map(len, held.batches[1:])) == [2, 4]


def behind_a_held_request(base: str, held: HeldModel, bodies: list) -> list[httpx.Response]:
    """The responses to `bodies`, posted while the model thread is held on one request (idx 0) and released once all
    of them are admitted: they wait together for the next batch."""
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(asyncio.run, post_all(base, [question(0)]))
        wait_for(lambda: httpx.get(f"{base}/health").json()["queue"]["admitted"] == 1)
        later = asyncio.run(_post_while_held(base, held, bodies))
        assert first.result()[0].status_code == 200
    return later


async def _post_while_held(base: str, held: HeldModel, bodies: list) -> list[httpx.Response]:
    async def release_when_admitted():
        async with httpx.AsyncClient(base_url=base) as session:
            while (await session.get("/health")).json()["queue"]["admitted"] < 1 + len(bodies):
                await asyncio.sleep(0.01)
        held.gate.set()

    responses, _ = await asyncio.gather(post_all(base, bodies), release_when_admitted())
    return responses


def test_a_request_that_breaks_decoding_fails_alone():
    held = HeldModel()
    app = create_app(held.answer, held.chat, ServeConfig(max_batch=8, max_wait_s=0.0))
    with serving(app) as base:
        good, bad, other = behind_a_held_request(base, held, [question(1), question(666), question(2)])
        stats = httpx.get(f"{base}/health").json()["stats"]
    assert good.status_code == other.status_code == 200 and [good.json()[0]["idx"], other.json()[0]["idx"]] == [1, 2]
    assert bad.status_code == 500 and "a stand-in failure" in bad.json()["error"]["message"]
    assert sorted(held.batches[1]) == [1, 2, 666] and len(held.batches) == 5  # together first, then one by one
    assert stats["failed"] == 1 and stats["requests"] == 3


def test_a_stream_whose_client_hangs_up_stops_the_generation():
    held = HeldModel()
    app = create_app(held.answer, held.chat, ServeConfig())
    body = {"model": "poetry", "messages": [{"role": "user", "content": "你好"}], "stream": True}
    with serving(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
            assert json.loads(next(line for line in lines if line)[6:])["choices"][0]["delta"]["content"] == "字"
        # the model thread is free again without the gate ever opening: the next request is answered
        wait_for(lambda: httpx.get(f"{base}/health").json()["queue"]["admitted"] == 0)
        held.gate.set()
        assert httpx.post(f"{base}/v1/answer", json=question(1)).status_code == 200


# ---- poems, and the API key ----------------------------------------------------------------------------------------

def test_poems_are_written_in_their_form_with_their_check(url):
    response = httpx.post(f"{url}/v1/poems", json={"form": "七绝", "title": "秋思", "rhyme": "十一尤", "n": 2,
                                                   "temperature": 0.9, "seed": 1}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["form"] == "七言绝句" and body["title"] == "秋思" and len(body["poems"]) == 2
    assert all(p["lines_ok"] and p["rhyme_ok"] and p["rhymes"] == ["十一尤"] for p in body["poems"])
    assert body["poems"][0]["mean_logprob"] >= body["poems"][1]["mean_logprob"]
    assert httpx.get(f"{url}/health").json()["stats"]["poems"] >= 2


@pytest.mark.parametrize("body, status, param, words", [
    ({"form": "八绝"}, 400, "form", "unknown form '八绝'"),
    ({"form": "七绝", "rhyme": "十一犹"}, 400, "rhyme", "not a 平水韵 group"),
    ({"form": "七绝", "rhyme": "二十五有"}, 400, "rhyme", "is 仄, but 七言绝句 rhymes 平"),
    ({"form": "七绝", "n": 2}, 400, "n", "several candidates need sampling"),
    ({"form": "七绝", "n": 17}, 422, "n", "less than or equal to 16"),
    ({"form": "七绝", "tones": "exact"}, 422, "tones", "'strict', 'loose' or 'off'"),
    ({"form": "七绝", "tone": "strict"}, 422, "tone", "Extra inputs are not permitted"),
    ({"title": "秋思"}, 422, "form", "Field required"),
])
def test_a_malformed_poem_request_names_the_field(url, body, status, param, words):
    response = httpx.post(f"{url}/v1/poems", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and "Traceback" not in response.text


def test_without_a_writer_the_poem_endpoint_is_404():
    held = HeldModel()
    held.gate.set()
    with serving(create_app(held.answer, held.chat, ServeConfig())) as base:
        response = httpx.post(f"{base}/v1/poems", json={"form": "七绝"})
    assert response.status_code == 404 and "does not write poems" in response.json()["error"]["message"]


def stand_in_poems(requests, n, tones, rhyme, sampling, constrained):
    from poetry.prosody import check_poem
    from poetry.write import Written

    text = "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"
    return [[Written(title, text, (), -1.0, check_poem(text, form), 0.0, 0, 28) for _ in range(n)]
            for form, title in requests]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/answer", [QUESTIONS[0]]),
    ("POST", "/v1/chat/completions", {"model": "poetry", "messages": [{"role": "user", "content": "你好"}]}),
    ("POST", "/v1/poems", {"form": "七绝"}),
    ("GET", "/v1/models", None),
])
def test_with_an_api_key_every_endpoint_but_health_wants_it(method, path, body):
    held = HeldModel()
    held.gate.set()
    app = create_app(held.answer, held.chat, ServeConfig(api_key="s3cret", max_wait_s=0.0), write=stand_in_poems)
    with serving(app) as base:
        def call(headers: dict) -> httpx.Response:
            return httpx.request(method, f"{base}{path}", json=body, headers=headers, timeout=30)

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            refused = call(headers)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            assert refused.json()["error"]["type"] == "authentication_error"
        assert call({"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # for load balancers, without the key


def test_the_openai_client_passes_its_api_key_unchanged():
    import openai

    held = HeldModel()
    held.gate.set()
    app = create_app(held.answer, held.chat, ServeConfig(api_key="s3cret"))
    with serving(app) as base:
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        reply = good.chat.completions.create(model="poetry", messages=[{"role": "user", "content": "你好"}])
        assert reply.choices[0].message.content == "字"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_serving_beyond_loopback_without_a_key_warns(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr(infer, "_app", lambda args: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: None)
    monkeypatch.delenv("POETRY_API_KEY", raising=False)
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("::1", False), ("localhost", False)):
        assert infer.main(["serve", "--model", str(tiny_model_dir), "--host", host]) == 0
        assert ("warning: serving on" in capsys.readouterr().err) == warned, host
    monkeypatch.setenv("POETRY_API_KEY", "s3cret")
    assert infer.main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "an API key is required" in captured.out
