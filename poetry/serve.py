"""Serving a model (+ adapter) over HTTP, as `infer.py serve` does: FastAPI on uvicorn.

- `POST /v1/answer`: official evaluation questions (a JSON list of them, or one object) in, the constrained answers
  out, as a list in the submission format and in order: what `infer.py predict` writes for the same questions.
  Requests that arrive together are decoded together (up to `max_batch` questions, after waiting at most
  `max_wait_s` for company when the model is idle), so a burst of one-question requests costs a few batched decodes.
- `POST /v1/chat/completions`: OpenAI's chat API, whole or streamed as server-sent events, so the `openai` package
  works unchanged. Greedy at temperature 0; the prompt is rendered as in training (`PromptFormat.chat_ids`).
- `POST /v1/poems`: `{form, title, rhyme?, tones?, n?, temperature?, top_p?, seed?, decode?}` in, the poems
  written in that form (poetry.write) out, best first, each with its prosody check: what `infer.py write` prints.
- `GET /health` (the queue, and the batch sizes formed so far), `GET /v1/models`.

With an API key (`infer.py serve --api-key`, or POETRY_API_KEY), every endpoint but /health answers 401 unless the
request carries `Authorization: Bearer <key>`, as OpenAI's and vLLM's servers do: the openai client's `api_key`
works unchanged.

One thread owns the model: batches and chat replies run on it one at a time in arrival order, while the event loop
keeps accepting and validating requests. At most `max_queue` questions wait (a chat counts as one); a request that
would exceed that gets 503 with Retry-After, the seconds the queue ahead of it is expected to take.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a body that is not JSON or
a question that does not validate (naming record and field, as the file loaders do), or a poem request naming an
unknown form or rhyme, 401 without the API key, 422 for a chat or poem request that does not fit the schema (naming
the field), 404 for another model's name, 503 when full, and 500, without a
traceback, only if decoding itself fails; a batch that fails is retried request by request, so one request's
failure never costs another its answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .data import Answer, DataError, Question, check_submission, parse_questions
from .data.io import loads
from .decode import Reply
from .prosody import form_named
from .write import Sampling, WritingError, Written, rhyme_group

log = logging.getLogger(__name__)

AnswerFn = Callable[[list[Question]], list[Answer]]


@dataclass
class ServeConfig:
    model_name: str = "poetry"  # what /v1/models lists and a chat request's `model` must name
    max_batch: int = 8  # questions decoded together
    max_wait_s: float = 0.01  # how long an idle model waits for more questions before it starts a batch
    max_queue: int = 256  # questions (a chat counts one) waiting or running; beyond it, 503
    max_chat_tokens: int = 512  # the largest max_tokens a chat request may ask for
    max_body_bytes: int = 8 << 20
    api_key: str | None = None  # when set, every endpoint but /health wants `Authorization: Bearer <key>`


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                    headers: dict | None = None, **extra) -> JSONResponse:
    body = {"message": message, "type": kind, "param": param, "code": status, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


@dataclass
class ServeStats:
    requests: int = 0
    questions: int = 0
    chats: int = 0
    poems: int = 0
    rejected: int = 0  # 503s
    failed: int = 0  # 500s
    batch_questions: Counter = field(default_factory=Counter)  # questions per decode -> decodes
    batch_requests: Counter = field(default_factory=Counter)  # requests per decode -> decodes

    def as_json(self) -> dict:
        def sizes(counter: Counter) -> dict:
            return {str(size): counter[size] for size in sorted(counter)}
        return {"requests": self.requests, "questions": self.questions, "chats": self.chats, "poems": self.poems,
                "rejected": self.rejected, "failed": self.failed, "decodes": sum(self.batch_questions.values()),
                "batch_questions": sizes(self.batch_questions), "batch_requests": sizes(self.batch_requests)}


class ModelWorker:
    """The one thread that touches the model, and the bounded count of work admitted for it."""

    def __init__(self, max_queue: int):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.max_queue = max_queue
        self.admitted = 0
        self.seconds_per_item = 1.0  # refined by every finished job; for Retry-After only

    def admit(self, items: int) -> None:
        if self.admitted + items > self.max_queue:
            retry = max(1, math.ceil(self.admitted * self.seconds_per_item))
            raise ApiError(503, f"the server is at capacity ({self.admitted} of {self.max_queue} questions queued); "
                                f"retry in {retry} s", kind="server_overloaded", headers={"Retry-After": str(retry)})
        self.admitted += items

    def release(self, items: int) -> None:
        self.admitted -= items

    async def run(self, items: int, fn: Callable, *args, **kwargs):
        started = time.monotonic()
        result = await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))
        self.seconds_per_item = 0.8 * self.seconds_per_item + 0.2 * (time.monotonic() - started) / max(items, 1)
        return result


@dataclass
class _Job:
    questions: list[Question]
    future: asyncio.Future


class AnswerBatcher:
    """Gathers the questions of concurrent requests into batches for `answer`."""

    def __init__(self, answer: AnswerFn, worker: ModelWorker, cfg: ServeConfig, stats: ServeStats):
        self.answer, self.worker, self.cfg, self.stats = answer, worker, cfg, stats
        self.pending: deque[_Job] = deque()
        self.arrived = asyncio.Event()

    async def submit(self, questions: list[Question]) -> list[Answer]:
        self.worker.admit(len(questions))
        job = _Job(questions, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.arrived.set()
        return await job.future

    def _waiting(self) -> int:
        return sum(len(job.questions) for job in self.pending)

    async def _arrival(self, timeout: float | None) -> bool:
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:  # TimeoutError's alias from Python 3.11
            return False
        return True

    async def _next_batch(self) -> list[_Job]:
        while not self.pending:
            await self._arrival(None)
        deadline = time.monotonic() + self.cfg.max_wait_s
        while self._waiting() < self.cfg.max_batch and await self._arrival(max(deadline - time.monotonic(), 0)):
            pass
        batch, size = [], 0
        while self.pending and (not batch or size + len(self.pending[0].questions) <= self.cfg.max_batch):
            job = self.pending.popleft()
            batch.append(job)
            size += len(job.questions)
        return batch

    async def run(self) -> None:
        """The batching loop, for the server's lifetime."""
        while True:
            batch = await self._next_batch()
            live = [job for job in batch if not job.future.done()]  # a client that hung up is not decoded for
            try:
                await self._decode(live)
            except Exception as err:  # a bug here must not stop the loop that every later request waits on
                log.exception("the batching loop failed")
                for job in live:
                    _settle(job.future, exception=ApiError(500, f"internal error: {type(err).__name__}",
                                                           kind="server_error"))
            finally:
                self.worker.release(sum(len(job.questions) for job in batch))

    async def _decode(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        questions = [q for job in jobs for q in job.questions]
        try:
            answers = await self.worker.run(len(questions), self.answer, questions)
        except Exception as err:
            if len(jobs) > 1:  # find the request that breaks it; the others still get their answers
                for job in jobs:
                    await self._decode([job])
                return
            log.exception("decoding failed for questions %s", [q.idx for q in questions])
            self.stats.failed += 1
            _settle(jobs[0].future, exception=ApiError(500, f"decoding failed: {type(err).__name__}: {err}",
                                                       kind="server_error"))
            return
        self.stats.batch_questions[len(questions)] += 1
        self.stats.batch_requests[len(jobs)] += 1
        start = 0
        for job in jobs:
            _settle(job.future, result=answers[start:start + len(job.questions)])
            start += len(job.questions)


def _settle(future: asyncio.Future, result=None, exception: Exception | None = None) -> None:
    if not future.done():
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


# ---- the chat request, as much of OpenAI's schema as a local model honours; unknown fields are ignored -------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_turn(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


# (turns, max_new_tokens, temperature, top_p, on_text, cancelled) -> Reply, as poetry.decode.chat with its model
ChatFn = Callable[..., Reply]


class PoemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option must not be silently ignored

    form: str
    title: str = ""
    rhyme: str | None = None
    tones: Literal["strict", "loose", "off"] = "loose"
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = 0
    decode: Literal["constrained", "free"] = "constrained"


# ([(form, title)], n, tones, rhyme, sampling, constrained) -> each request's candidates, as poetry.write.write_poems
WriteFn = Callable[..., list[list[Written]]]


def _first_issue(err: RequestValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return param, f"{param or 'body'}: {first.get('msg', 'invalid')}"


def create_app(answer: AnswerFn, chat: ChatFn, cfg: ServeConfig, info: dict | None = None,
               write: WriteFn | None = None) -> FastAPI:
    """The HTTP API over `answer` (questions -> answers, e.g. poetry.choice.answer_questions), `chat` (turns ->
    reply, e.g. poetry.decode.chat) and `write` (poems in a form, poetry.write.write_poems; without it /v1/poems
    is 404); `info` is shown by /health (model and adapter paths)."""
    worker = ModelWorker(cfg.max_queue)
    stats = ServeStats()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = AnswerBatcher(answer, worker, cfg, stats)
        app.state.batcher = batcher
        loop_task = asyncio.create_task(batcher.run())
        yield
        loop_task.cancel()
        worker.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="poetry-sft", lifespan=lifespan)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health" and not _authorized(request, cfg.api_key):
            return _error_response(401, "a valid API key is required: send the header Authorization: Bearer <key>",
                                   kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        if err.status == 503:
            stats.rejected += 1
        return _error_response(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        param, message = _first_issue(err)
        return _error_response(422, message, param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(500, f"internal error: {type(err).__name__}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, **(info or {}),
                "queue": {"admitted": worker.admitted, "max": cfg.max_queue, "max_batch": cfg.max_batch},
                "stats": stats.as_json()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "poetry-sft"}]}

    @app.post("/v1/answer")
    async def answer_questions(request: Request):
        questions = _questions(await _body(request, cfg.max_body_bytes), cfg.max_queue)
        answers = await request.app.state.batcher.submit(questions)
        check_submission(questions, answers, "response")  # what the official scorer enforces, before it leaves
        stats.requests += 1
        stats.questions += len(questions)
        return [a.to_json() for a in answers]

    @app.post("/v1/poems")
    async def poems(body: PoemRequest):
        if write is None:
            raise ApiError(404, "this server does not write poems", kind="not_found")
        try:
            form = form_named(body.form)
        except ValueError as err:
            raise ApiError(400, str(err), "form") from None
        sampling = Sampling(body.temperature, body.top_p, body.seed)
        try:
            rhyme_group([form], body.rhyme, body.n, sampling)  # before the queue: a bad request costs no wait
        except WritingError as err:
            raise ApiError(400, str(err), err.param) from None
        worker.admit(body.n)
        try:
            (candidates,) = await worker.run(body.n, write, [(form, body.title)], body.n, body.tones, body.rhyme,
                                             sampling, body.decode == "constrained")
        finally:
            worker.release(body.n)
        stats.poems += body.n
        return {"form": form.name, "title": body.title, "poems": [w.to_json() for w in candidates]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        if body.model != cfg.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                           "model", kind="model_not_found")
        max_tokens = body.max_completion_tokens or body.max_tokens or cfg.max_chat_tokens
        if max_tokens > cfg.max_chat_tokens:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {cfg.max_chat_tokens}",
                           "max_tokens")
        turns = [message.as_turn() for message in body.messages]
        worker.admit(1)
        stats.chats += 1
        job = _ChatJob(chat, worker, turns, max_tokens, body.temperature, body.top_p)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(job.events(cfg.model_name, include_usage), media_type="text/event-stream")
        reply = await job.start()
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": _usage(reply)}

    return app


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes; this server takes at most {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"the body is {len(raw)} bytes; this server takes at most {limit}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        return loads(text)  # objects remember repeated keys, which validation then names
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except ValueError as err:
        raise ApiError(400, f"the body is not JSON this server reads: {err}") from None


def _questions(data: object, max_questions: int) -> list[Question]:
    try:
        questions = parse_questions(data, "request")
    except DataError as err:
        raise ApiError(400, err.one_line(), err.issues[0].field) from None
    if len(questions) > max_questions:
        raise ApiError(400, f"the request holds {len(questions)} questions; this server takes at most "
                            f"{max_questions} at once (send them in parts)")
    return questions


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


class _ChatJob:
    """One admitted chat request on the model thread; its capacity is released when the model is done with it,
    which for a stream whose client hung up is at the next token (the generation polls `cancelled`)."""

    def __init__(self, chat: ChatFn, worker: ModelWorker, turns: list[dict], max_tokens: int, temperature: float,
                 top_p: float):
        self.chat, self.worker = chat, worker
        self.turns, self.max_tokens, self.temperature, self.top_p = turns, max_tokens, temperature, top_p
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.cancelled = False

    async def start(self, on_text: Callable[[str], None] | None = None) -> Reply:
        try:
            return await self.worker.run(1, self.chat, self.turns, self.max_tokens, self.temperature, self.top_p,
                                         on_text, lambda: self.cancelled)
        finally:
            self.worker.release(1)

    def _event(self, model: str, choices: list[dict], **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def _delta(self, model: str, delta: dict, finish_reason: str | None = None) -> str:
        return self._event(model, [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])

    async def events(self, model: str, include_usage: bool):
        """Server-sent events as OpenAI streams them: the role, the text piece by piece, the finish reason, (the
        usage), then `[DONE]`."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.start(lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)))
        def finished(done: asyncio.Future) -> None:
            if not done.cancelled():
                done.exception()  # marked as read: after a hang-up nobody else reads it
            pieces.put_nowait(None)  # after every piece the model thread queued

        task.add_done_callback(finished)
        try:
            yield self._delta(model, {"role": "assistant", "content": ""})
            while (text := await pieces.get()) is not None:
                yield self._delta(model, {"content": text})
            try:
                reply = task.result()
            except Exception as err:  # the headers are sent: the error travels as an event
                log.exception("chat generation failed")
                error = {"message": f"generation failed: {type(err).__name__}: {err}", "type": "server_error",
                         "code": 500}
                yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
                return
            yield self._delta(model, {}, reply.finish_reason)
            if include_usage:
                yield self._event(model, [], usage=_usage(reply))
            yield "data: [DONE]\n\n"
        finally:
            self.cancelled = True  # a client that hung up stops the generation at its next token
