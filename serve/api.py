"""The OpenAI-compatible HTTP API over the scheduler (FastAPI; uvicorn runs it).

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics            (Prometheus text)

Each HTTP request becomes one scheduler request per prompt and choice (n). The scheduler's
thread hands events to the request's asyncio queue (call_soon_threadsafe); a client that goes
away cancels its requests, which frees their slots before the next step. Bad input is a 400
with OpenAI's error body, a full queue a 429 with Retry-After, and nothing a request does
stops the server from serving the others.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from arx.errors import ArxError
from arx.serve import protocol as proto
from arx.serve.scheduler import Overloaded, Request
from arx.serve.scheduler import Scheduler  # noqa: F401 - the type Server holds

POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class Server:
    """What the routes share: the scheduler, the names and the text side of the bundle."""

    scheduler: "Scheduler"
    model: str
    defaults: object  # the manifest's GenerationDefaults
    metrics: object
    tokenizer: object = None
    chat: object = None  # serve.chat.ChatTemplate, or None: the bundle has no template
    chat_missing: str = "this bundle has no chat template"


class Failed(Exception):
    """A request refused with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="arx serve", docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app, server)

    @app.get("/health")
    async def health():
        if not server.scheduler.alive:
            raise Failed(503, "the scheduler is not running", "server_error")
        return {"status": "ok", **server.scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model, "object": "model",
                                            "created": 0, "owned_by": "arx"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.scheduler.stats()),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: proto.CompletionRequest, http: HTTPRequest):
        return await _respond(server, http, body, _completion_prompts(server, body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: proto.ChatRequest, http: HTTPRequest):
        if server.chat is None:
            raise Failed(400, f"{server.chat_missing}, so /v1/chat/completions cannot build a "
                              f"prompt; use /v1/completions with the prompt text or ids",
                         param="messages")
        prompt = server.chat.encode([m.as_template_input() for m in body.messages])
        return await _respond(server, http, body, [prompt], chat=True)

    return app


def _error_handlers(app: FastAPI, server: Server) -> None:
    def reply(status, message, kind="invalid_request_error", param=None, headers=None):
        server.metrics.reject(status)
        return JSONResponse(proto.error_body(message, kind, status, param), status_code=status,
                            headers=headers)

    @app.exception_handler(Failed)
    async def failed(_, e: Failed):
        return reply(e.status, str(e), e.kind, e.param, e.headers)

    @app.exception_handler(ArxError)
    async def bad_input(_, e: ArxError):
        return reply(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        what = "unknown field (not an OpenAI parameter arx serve takes)" \
            if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
        if first.get("type") == "json_invalid":
            return reply(400, "the request body is not valid JSON")
        return reply(400, f"{where or 'body'}: {what}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return reply(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                     else "invalid_request_error")


def _completion_prompts(server: Server, body: proto.CompletionRequest) -> list[list[int]]:
    p = body.prompt
    texts = [p] if isinstance(p, str) else p if p and isinstance(p[0], str) else None
    if texts is not None:
        if server.tokenizer is None:
            raise Failed(400, "this bundle has no tokenizer: send the prompt as token ids "
                              "(a list of integers)", param="prompt")
        return [server.tokenizer.encode(t) for t in texts]
    if not p:
        raise Failed(400, "the prompt is empty", param="prompt")
    return [list(p)] if isinstance(p[0], int) else [list(x) for x in p]


def _requests(server: Server, body, prompts, on_event) -> list[Request]:
    if body.model != server.model:
        raise Failed(404, f"model {body.model!r} is not served here; this server serves "
                          f"{server.model!r} (GET /v1/models)", "not_found_error", "model")
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    stops, sched, logprobs = body.stops(), server.scheduler, body.logprob_count()
    out = []
    for i, prompt in enumerate(prompts):
        # without max_tokens: the bundle's default, cut to the room the context leaves
        n = asked or max(1, min(server.defaults.max_new_tokens, sched.max_len - len(prompt)))
        for j in range(body.n):
            index = i * body.n + j
            out.append(Request(prompt, n, body.sampling(server.defaults, j), stops,
                               not body.ignore_eos, (lambda k: lambda ev: on_event(k, ev))(index),
                               logprobs=logprobs))
    for r in out:
        sched.check(r)  # all or nothing: no request of a refused batch runs
    return out


class _Batch:
    """The scheduler requests of one HTTP request and their events, as an asyncio queue."""

    def __init__(self, server: Server, body, prompts):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda k, ev: loop.call_soon_threadsafe(self.queue.put_nowait, (k, ev))  # noqa: E731
        self.server = server
        self.requests = _requests(server, body, prompts, put)
        self.open = set(range(len(self.requests)))

    def submit(self) -> None:
        sched = self.server.scheduler
        for k, r in enumerate(self.requests):
            try:
                sched.submit(r)
            except Overloaded as e:
                for done in self.requests[:k]:
                    sched.cancel(done.id)
                self.open.clear()
                raise Failed(429, str(e), "rate_limit_exceeded",
                             headers={"Retry-After": str(e.retry_after)}) from None

    def cancel(self) -> None:
        for k in self.open:
            self.server.scheduler.cancel(self.requests[k].id)
        self.open.clear()

    async def events(self, http: HTTPRequest | None = None):
        """(choice index, Event) until every request is done; polls `http` for a disconnect
        every POLL_S (also while tokens keep coming: the client may be gone all the same)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while self.open:
            if http is not None and loop.time() - checked >= POLL_S:
                checked = loop.time()
                if await http.is_disconnected():
                    self.cancel()
                    return
            try:
                k, ev = await asyncio.wait_for(self.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                continue
            if ev.kind != "token":
                self.open.discard(k)
            yield k, ev


async def _respond(server: Server, http: HTTPRequest, body, prompts, chat: bool):
    batch = _Batch(server, body, prompts)
    batch.submit()
    shape = proto.Shape(chat, server.model)
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(batch, shape, prompt_tokens, include),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    n = len(batch.requests)
    texts, tokens, reasons = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
    logprobs = [[] for _ in range(n)]
    try:
        async for k, ev in batch.events(http):
            _fail_on_error(ev)
            texts[k].append(ev.text)
            if ev.kind == "token":
                tokens[k].append(ev.token)
                logprobs[k] += _logprob_entry(server, ev)
            reasons[k] = ev.finish_reason
    finally:
        batch.cancel()  # a handler cancelled mid-way leaves nothing running
    choices = [shape.choice(k, _whole_text(server, body, tokens[k], reasons[k], texts[k]),
                            tokens[k], reasons[k], chunk=False,
                            logprobs=shape.logprobs(logprobs[k])) for k in range(n)]
    return shape.whole(choices, proto.usage(prompt_tokens, sum(map(len, tokens))))


def _whole_text(server: Server, body, tokens: list[int], reason: str | None,
                pieces: list[str]) -> str:
    """The text of a whole response: the tokens decoded at once, as `arx generate --json` does
    (streamed pieces differ where a random model emits invalid UTF-8), cut at a stop string."""
    if server.tokenizer is None:
        return "".join(pieces)
    text = server.tokenizer.decode(tokens)
    hits = [i for i in (text.find(s) for s in body.stops()) if i >= 0] if reason == "stop" else []
    return text[: min(hits)] if hits else text


def _logprob_entry(server: Server, ev) -> list[tuple]:
    """[(token text, logprob, [(text, logprob)] most likely first)] for a token event of a
    request that asked for logprobs, else []. Without a tokenizer a token reads "token_id:N"
    (vLLM's spelling)."""
    if ev.logprob is None:
        return []
    tok = server.tokenizer
    text = (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else \
        (lambda t: f"token_id:{t}")
    return [(text(ev.token), ev.logprob, [(text(t), lp) for t, lp in ev.top_logprobs])]


def _fail_on_error(ev) -> None:
    if ev.kind == "error":
        closing = "shutting down" in ev.message
        raise Failed(503 if closing else 500, ev.message, "server_error")


async def _stream(batch: _Batch, shape: proto.Shape, prompt_tokens: int, include_usage: bool):
    """Server-sent events: a chunk per token (per choice), the finish reason, [DONE]. A client
    that disconnects closes this generator, which cancels what is still running."""
    completion, offsets = 0, [0] * len(batch.requests)  # text_offset per choice
    try:
        if shape.chat:
            roles = [shape.choice(k, "", [], None, chunk=True, role=True)
                     for k in range(len(batch.requests))]
            yield _sse(shape.chunk(roles))
        async for k, ev in batch.events():
            if ev.kind == "error":
                yield _sse(proto.error_body(ev.message, "server_error", 500))
                break
            toks = [ev.token] if ev.kind == "token" else []
            completion += len(toks)
            entry = _logprob_entry(batch.server, ev) if toks else []
            logprobs = shape.logprobs(entry, offsets[k])
            offsets[k] += sum(len(e[0]) for e in entry)
            if ev.text or toks or ev.finish_reason:
                yield _sse(shape.chunk([shape.choice(k, ev.text, toks, ev.finish_reason,
                                                     chunk=True, logprobs=logprobs)]))
        if include_usage:
            yield _sse(shape.chunk([], proto.usage(prompt_tokens, completion)))
        yield "data: [DONE]\n\n"
    finally:
        batch.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
