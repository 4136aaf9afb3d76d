"""The OpenAI-compatible ASGI app over one Engine: routes, request checks, choices, SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from moeflow.errors import EngineClosed, InvalidRequest
from moeflow.runtime.sampling import SamplingParams
from moeflow.serve.chat_template import ChatTemplate, TemplateError, load_chat_template
from moeflow.serve.metrics import ServerMetrics
from moeflow.serve.protocol import APIError, CompletionRequest, bad, parse_request
from moeflow.serve.text import TextStream

if TYPE_CHECKING:
    from moeflow.api import Engine

_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class _Choice:
    """One of a request's n generations: its token count and how it ended (None while running)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.tokens = 0
        self.finish_reason: str | None = None


class _Tracked(StreamingResponse):
    """A stream that releases its in-flight slot however it ends, even if never iterated."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _sse(payload: object) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """The request handling of one app; the Engine is shared, not owned: whoever opened it closes it."""

    def __init__(self, engine: Engine, model_name: str | None, max_queue: int | None) -> None:
        self.engine = engine
        self.model_name = model_name or engine.path.name
        self.max_queue = max_queue
        self.in_flight = 0
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        # read now, so a broken tokenizer_config.json fails at start-up rather than per request
        self.template: ChatTemplate | None = load_chat_template(engine.path)
        self._tasks: set[asyncio.Task[None]] = set()  # n > 1 pumps: kept alive until they end

    # ---- checks ----------------------------------------------------------------------------
    def _chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise bad("messages", f"{self.model_name} has no chat template (no chat_template in "
                                  f"tokenizer_config.json, no chat_template.jinja): use /v1/completions")
        return self.template

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        engine = self.engine
        param = "messages" if req.chat else "prompt"
        if engine.session.tokenizer is None:  # the API answers in text
            raise APIError(400, f"{self.model_name} has no tokenizer.json, which the server needs to return text")
        if req.chat:
            assert req.messages is not None
            try:
                prompt: str | list[int] = self._chat_template().render(req.messages)
            except TemplateError as e:
                raise bad("messages", f"the chat template refused them: {e}") from None
        else:
            assert req.prompt is not None
            prompt = req.prompt
        if isinstance(prompt, list):
            vocab = engine.session.arch.vocab_size
            for pos, i in enumerate(prompt):
                if not 0 <= i < vocab:
                    raise bad("prompt", f"token id {i} at position {pos} is out of range [0, {vocab})")
            return prompt
        try:
            ids = engine.encode(prompt)
        except InvalidRequest as e:
            raise bad(param, str(e)) from None
        if not ids:
            raise bad(param, "encodes to no tokens")
        return ids

    def _max_tokens(self, req: CompletionRequest, prompt: int) -> int:
        """max_tokens, or what the context leaves; 400 naming both lengths if they pass it."""
        limit = self.engine.session.arch.max_position_embeddings
        param = "messages" if req.chat else "prompt"
        if req.max_tokens is None:
            if prompt >= limit:
                raise bad(param, f"the prompt is {prompt} tokens, the model's context {limit} tokens: "
                                 f"no room to generate")
            return limit - prompt
        if prompt + req.max_tokens > limit:
            raise bad("max_tokens", f"a prompt of {prompt} tokens + max_tokens={req.max_tokens} = "
                                    f"{prompt + req.max_tokens} tokens exceeds the model's context of {limit} tokens")
        return req.max_tokens

    def _seeds(self, req: CompletionRequest) -> list[int | None]:
        """One seed per choice (seed + index), so n choices differ yet repeat; checked now."""
        seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]
        for seed in seeds:
            try:
                SamplingParams(req.temperature, req.top_k, req.top_p, seed)
            except InvalidRequest as e:
                name = str(e).split("=", 1)[0]
                raise bad(name if name in ("temperature", "top_k", "top_p", "seed") else "seed", str(e)) from None
        return seeds

    # ---- generation ------------------------------------------------------------------------
    async def _deltas(self, choice: _Choice, ids: list[int], req: CompletionRequest, max_tokens: int,
                      seed: int | None) -> AsyncGenerator[str, None]:
        """The text of one choice as it is generated, cut at a stop string (which ends the request)."""
        engine = self.engine
        tokenizer = engine.session.tokenizer
        assert tokenizer is not None
        text = TextStream(tokenizer, req.stop)
        eos = set(engine.session.arch.eos_token_ids)
        ended_by_eos = False
        tokens = engine.stream(ids, max_tokens, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, seed=seed)
        try:
            async with contextlib.aclosing(tokens):  # type: ignore[type-var]  # leaving early (stop string, cancel) ends the request
                async for tok in tokens:
                    choice.tokens += 1
                    if tok in eos:
                        ended_by_eos = True
                        break
                    if piece := text.push(tok):
                        yield piece
                    if text.stopped:
                        break
            if rest := text.flush():
                yield rest
            choice.finish_reason = "stop" if text.stopped or ended_by_eos else "length"
        finally:
            self.metrics.completion_tokens.inc(choice.tokens)
            self.metrics.finished.labels(choice.finish_reason or "cancelled").inc()

    async def _merged(self, runs: list[AsyncGenerator[str, None]]) -> AsyncGenerator[tuple[int, str | None], None]:
        """(choice index, text delta) as any choice produces it; (index, None) when it ends."""
        if len(runs) == 1:
            async with contextlib.aclosing(runs[0]) as run:
                async for delta in run:
                    yield 0, delta
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, str | None | Exception]] = asyncio.Queue()

        async def pump(index: int, run: AsyncGenerator[str, None]) -> None:
            try:
                async with contextlib.aclosing(run):
                    async for delta in run:
                        queue.put_nowait((index, delta))
                queue.put_nowait((index, None))
            except Exception as e:  # handed to the reader, which raises it
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                running -= item is None
                yield index, item
        finally:
            for task in tasks:  # a cancelled pump closes its engine stream, freeing KV and pins
                task.cancel()

    def _runs(self, req: CompletionRequest, ids: list[int], max_tokens: int) -> tuple[list[_Choice], list[AsyncGenerator[str, None]]]:
        choices = [_Choice(i) for i in range(req.n)]
        runs = [self._deltas(c, ids, req, max_tokens, seed) for c, seed in zip(choices, self._seeds(req), strict=True)]
        return choices, runs

    def _usage(self, prompt: int, choices: list[_Choice]) -> dict[str, int]:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _complete(self, req: CompletionRequest, ids: list[int], max_tokens: int) -> dict[str, Any]:
        choices, runs = self._runs(req, ids, max_tokens)
        texts: list[list[str]] = [[] for _ in choices]
        merged = self._merged(runs)
        async with contextlib.aclosing(merged):
            async for index, delta in merged:
                if delta is not None:
                    texts[index].append(delta)
        out = []
        for c in choices:
            text = "".join(texts[c.index])
            out.append({"index": c.index, "logprobs": None, "finish_reason": c.finish_reason,
                        **({"message": {"role": "assistant", "content": text}} if req.chat else {"text": text})})
        return {"id": self._id(req), "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": out,
                "usage": self._usage(len(ids), choices)}

    async def _stream(self, req: CompletionRequest, ids: list[int], max_tokens: int) -> AsyncGenerator[str, None]:
        """The SSE events of a streamed request; closing it (client gone) cancels every choice."""
        rid, created = self._id(req), int(time.time())
        kind = "chat.completion.chunk" if req.chat else "text_completion"
        usage_field: dict[str, Any] = {"usage": None} if req.include_usage else {}

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if req.chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if text is None else {"content": text})
                body: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                body = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                         "choices": [body], **usage_field})

        choices, runs = self._runs(req, ids, max_tokens)
        if req.chat:
            for c in choices:
                yield chunk(c.index, None, None, role=True)
        merged = self._merged(runs)
        try:
            async with contextlib.aclosing(merged):
                async for index, delta in merged:
                    yield chunk(index, delta, None if delta is not None else choices[index].finish_reason)
        except (InvalidRequest, EngineClosed) as e:  # after the 200 went out: the error is an event
            yield _sse(APIError(503 if isinstance(e, EngineClosed) else 400, str(e)).body())
            yield "data: [DONE]\n\n"
            return
        if req.include_usage:
            yield _sse({"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                        "usage": self._usage(len(ids), choices)})
        yield "data: [DONE]\n\n"

    def _id(self, req: CompletionRequest) -> str:
        return f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"

    # ---- endpoints -------------------------------------------------------------------------
    def _error(self, endpoint: str, error: APIError) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    async def completions(self, request: Request, *, chat: bool) -> Response:
        endpoint = _CHAT if chat else _COMPLETIONS
        try:
            try:
                body = await request.json()
            except ValueError as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None
            req = parse_request(body, chat=chat)
            if req.model is not None and req.model != self.model_name:
                raise APIError(404, f"model {req.model!r} does not exist: this server serves {self.model_name!r}",
                               param="model", code="model_not_found")
            ids = self._prompt_ids(req)
            max_tokens = self._max_tokens(req, len(ids))
            self._seeds(req)
            if self.max_queue is not None and self.in_flight >= self.max_queue:
                raise APIError(503, f"server busy: {self.in_flight} requests in flight, --max-queue is "
                                    f"{self.max_queue}; retry later", kind="server_error", code="queue_full")
        except APIError as e:
            return self._error(endpoint, e)
        except EngineClosed as e:
            return self._error(endpoint, APIError(503, str(e), kind="server_error"))
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.prompt_tokens.inc(len(ids))
        if req.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return _Tracked(self._stream(req, ids, max_tokens), self._release)
        try:
            result = await _unless_disconnected(request, self._complete(req, ids, max_tokens))
        except InvalidRequest as e:
            return self._error(endpoint, APIError(400, str(e)))
        except EngineClosed as e:
            return self._error(endpoint, APIError(503, str(e), kind="server_error"))
        finally:
            self._release()
        if result is None:  # the client left; nobody reads this
            self.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(result)

    async def models(self, request: Request) -> Response:
        try:
            plan = self.engine.plan
        except EngineClosed as e:
            return self._error("/v1/models", APIError(503, str(e), kind="server_error"))
        card = {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "moeflow",
            "max_model_len": self.engine.session.arch.max_position_embeddings,
            "plan": {"budget_bytes": plan.budget_bytes, "expert_slots": plan.slots,
                     "experts_total": plan.experts_total, "block_bytes": plan.block_bytes},
        }
        self.metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        ready = self.engine.state.value == "ready"
        return JSONResponse({"status": "ok" if ready else self.engine.state.value}, status_code=200 if ready else 503)

    async def metrics_text(self, request: Request) -> Response:
        engine = self.engine
        try:
            snapshot = (await engine.call(engine.stats)).as_dict()
            batcher = engine._batcher
            depth = batcher.waiting if batcher is not None else 0
        except EngineClosed:
            snapshot, depth = {}, 0
        return Response(self.metrics.render(snapshot, depth), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    """`work`'s result, or None (work cancelled: its KV and pins freed) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                 kind="invalid_request_error").body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(APIError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body(), status_code=500)


def create_app(engine: Engine, *, model_name: str | None = None, max_queue: int | None = None) -> Starlette:
    """The OpenAI-compatible app over a started `engine` (which the caller closes). Mount it in
    another Starlette/FastAPI app or serve it with uvicorn. `max_queue`: completion requests in
    flight beyond which new ones get 503."""
    if max_queue is not None and max_queue < 1:
        raise ValueError(f"max_queue={max_queue}: must be >= 1 (or None for no limit)")
    server = OpenAIServer(engine, model_name, max_queue)

    async def completions(request: Request) -> Response:
        return await server.completions(request, chat=False)

    async def chat(request: Request) -> Response:
        return await server.completions(request, chat=True)

    app = Starlette(
        routes=[
            Route(_COMPLETIONS, completions, methods=["POST"]),
            Route(_CHAT, chat, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics_text, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.openai_server = server
    return app
