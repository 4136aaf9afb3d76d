"""The OpenAI-compatible ASGI app over one Engine: routes, request checks, prompts x n choices, responses and SSE streams."""

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
from moeflow.serve.choices import Choice, Merged, Piece, pieces, sampling_args
from moeflow.serve.logprobs import TokenText
from moeflow.serve.protocol import APIError, CompletionRequest, bad, parse_request
from moeflow.serve.responses import ChoiceView, ToolUse
from moeflow.serve.tools import parser_for, special_marker

if TYPE_CHECKING:
    from moeflow.api import Engine

_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


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
        self._merged = Merged()
        self._token_text: TokenText | None = None

    # ---- checks ----------------------------------------------------------------------------
    def _chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise bad("messages", f"{self.model_name} has no chat template (no chat_template in "
                                  f"tokenizer_config.json, no chat_template.jinja): use /v1/completions")
        return self.template

    def _tool_use(self, req: CompletionRequest) -> ToolUse | None:
        """How the request's tools are used: None when it offers none or tool_choice is "none" (the
        template still shows them, as vLLM does; the output is plain content)."""
        if req.tools is None or req.tools.choice == "none":
            return None
        template = self._chat_template()
        parser = parser_for(template.source)
        if parser is None or not template.takes_tools:
            raise bad("tools", f"the chat template of {self.model_name} does not "
                               f"{'render tools' if not template.takes_tools else 'teach a tool-call format moeflow parses'}"
                               " (moeflow reads Hermes/Qwen <tool_call> and Mistral [TOOL_CALLS] calls)")
        tokenizer = self.engine.session.tokenizer
        marker = None if tokenizer is None else special_marker(tokenizer, parser)
        return ToolUse(parser, req.tools.function, req.tools.parallel, marker)

    def _encode(self, text: str, param: str, *, special: bool) -> list[int]:
        try:
            ids = self.engine.encode(text, add_special_tokens=special)
        except InvalidRequest as e:
            raise bad(param, str(e)) from None
        if not ids:
            raise bad(param, "encodes to no tokens")
        return ids

    def _prompt_ids(self, req: CompletionRequest, tools: ToolUse | None) -> list[list[int]]:
        """The token ids of each prompt (chat: the rendered conversation, one prompt)."""
        engine = self.engine
        if engine.session.tokenizer is None:  # the API answers in text
            raise APIError(400, f"{self.model_name} has no tokenizer.json, which the server needs to return text")
        if req.chat:
            assert req.messages is not None
            try:
                text = self._chat_template().render(
                    req.messages, tools=None if req.tools is None else list(req.tools.specs))
            except TemplateError as e:
                raise bad("messages", f"the chat template refused them: {e}") from None
            # the template wrote the BOS it wants; the tokenizer must not add another
            return [self._encode(text + (tools.prefix if tools else ""), "messages", special=False)]
        out = []
        vocab = engine.session.arch.vocab_size
        for p, prompt in enumerate(req.prompts):
            where = "prompt" if len(req.prompts) == 1 else f"prompt[{p}]"
            if isinstance(prompt, str):
                out.append(self._encode(prompt, "prompt", special=True))
                continue
            for pos, i in enumerate(prompt):
                if not 0 <= i < vocab:
                    raise bad("prompt", f"{where}: token id {i} at position {pos} is out of range [0, {vocab})")
            out.append(prompt)
        return out

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

    def _choices(self, req: CompletionRequest, prompts: list[list[int]]) -> list[Choice]:
        """prompts x n choices, each seed checked now (choice i of every prompt draws with seed + i)."""
        seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]
        defaults = self.engine.generation_config
        for seed in seeds:
            args = sampling_args(req, seed, defaults)
            try:
                SamplingParams(**{k: v for k, v in args.items() if v is not None}, logprobs=req.logprobs)
            except InvalidRequest as e:
                name = str(e).split("=", 1)[0]
                raise bad(name if name in args else "seed", str(e)) from None
        return [Choice(p * req.n + i, p, ids, seed, self._max_tokens(req, len(ids)))
                for p, ids in enumerate(prompts) for i, seed in enumerate(seeds)]

    # ---- generation ------------------------------------------------------------------------
    def _runs(self, req: CompletionRequest, choices: list[Choice], tools: ToolUse | None
              ) -> tuple[list[ChoiceView], AsyncGenerator[tuple[int, Piece | None], None]]:
        """Each choice's view, and its pieces merged across choices (closing the merge cancels them)."""
        tokenizer = self.engine.session.tokenizer
        assert tokenizer is not None
        if req.logprobs is not None and (self._token_text is None or self._token_text.tokenizer is not tokenizer):
            self._token_text = TokenText(tokenizer)  # one per server: its cache of token texts serves every request
        token_text = None if req.logprobs is None else self._token_text
        views = [ChoiceView(c, chat=req.chat, token_text=token_text, tools=tools, whole_only=not req.stream)
                 for c in choices]
        stop = req.stop + (tools.stop if tools else ())
        marker = tools.marker if tools else None
        runs = [pieces(self.engine, c, req, self.metrics, stop, marker) for c in choices]
        return views, self._merged(runs)

    def _usage(self, choices: list[Choice]) -> dict[str, int]:
        """Each prompt's tokens once (not once per choice), every choice's generated tokens."""
        prompt = sum({c.prompt_index: len(c.ids) for c in choices}.values())
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _complete(self, req: CompletionRequest, choices: list[Choice], tools: ToolUse | None) -> dict[str, Any]:
        views, merged = self._runs(req, choices, tools)
        async with contextlib.aclosing(merged):
            async for index, piece in merged:
                if piece is not None:
                    views[index].add(piece)
        return {"id": self._id(req), "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [v.whole() for v in views],
                "usage": self._usage(choices)}

    async def _stream(self, req: CompletionRequest, choices: list[Choice], tools: ToolUse | None) -> AsyncGenerator[str, None]:
        """The SSE events of a streamed request; closing it (client gone) cancels every choice."""
        rid, created = self._id(req), int(time.time())
        kind = "chat.completion.chunk" if req.chat else "text_completion"
        usage_field: dict[str, Any] = {"usage": None} if req.include_usage else {}

        def event(body: dict[str, Any]) -> str:
            return _sse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                         "choices": [body], **usage_field})

        views, merged = self._runs(req, choices, tools)
        if req.chat:
            for view in views:
                yield event(view.role())
        try:
            async with contextlib.aclosing(merged):
                async for index, piece in merged:
                    if piece is not None:
                        if (body := views[index].add(piece)) is not None:
                            yield event(body)
                        continue
                    for body in views[index].ending():
                        yield event(body)
        except (InvalidRequest, EngineClosed) as e:  # after the 200 went out: the error is an event
            yield _sse(APIError(503 if isinstance(e, EngineClosed) else 400, str(e)).body())
            yield "data: [DONE]\n\n"
            return
        if req.include_usage:
            yield _sse({"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                        "usage": self._usage(choices)})
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
            tools = self._tool_use(req)
            choices = self._choices(req, self._prompt_ids(req, tools))
            if self.max_queue is not None and self.in_flight >= self.max_queue:
                raise APIError(503, f"server busy: {self.in_flight} requests in flight, --max-queue is "
                                    f"{self.max_queue}; retry later", kind="server_error", code="queue_full")
        except APIError as e:
            return self._error(endpoint, e)
        except EngineClosed as e:
            return self._error(endpoint, APIError(503, str(e), kind="server_error"))
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.prompt_tokens.inc(self._usage(choices)["prompt_tokens"])
        if req.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return _Tracked(self._stream(req, choices, tools), self._release)
        try:
            result = await _unless_disconnected(request, self._complete(req, choices, tools))
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
        """The model card, with the memory plan (Session.plan_report: budget, slots per tier, KV
        capacity, and what auto fitting saw) in the manner of llama.cpp's --fit report."""
        try:
            session = self.engine.session
            plan = session.plan
            report = session.plan_report()
        except EngineClosed as e:
            return self._error("/v1/models", APIError(503, str(e), kind="server_error"))
        card = {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "moeflow",
            "max_model_len": session.arch.max_position_embeddings,
            "plan": {**report, "expert_slots": plan.slots},
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
