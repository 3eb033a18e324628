"""
The HTTP ingress (FastAPI, built on the replica): upstream's chat API, an OpenAI-compatible API, health and stats.

    POST /chat/completions      upstream's body {messages, temperature?, top_k?, max_tokens?, model?}; SSE stream of
                                `data: {"token": "...", "gpu": 0}` chunks, then `data: {"done": true}`
    POST /v1/chat/completions   OpenAI chat completions: stream, n, seed, temperature, top_p, top_k, max_tokens,
                                stop, logprobs + top_logprobs, stream_options.include_usage; usage in the reply
    POST /v1/completions        OpenAI (legacy) completions on a raw prompt (text or token ids, one or several):
                                the same fields, plus echo and logprobs 0..20 (with echo: the prompt's tokens too)
    GET  /v1/models[/{model}]   the served models (serve.models: sft, base:d20, sft:d20@650, ...)
    GET  /tokenizer_info        vLLM's tokenizer endpoints, which lm-evaluation-harness's remote tokenizer uses
    POST /tokenize, /detokenize   ({"prompt"} -> {"tokens"}, {"tokens"} -> {"prompt"}; optional "model")
    GET  /health                {"status": "ok", "ready": bool, ...} (never needs the API key)
    GET  /stats                 engine counters of the replica that answers (per model) + ingress counters

Every request is validated whole (serve.protocol) before any engine work starts; each choice is one engine
request, routed by model name (`multiplexed_model_id`), and every path out of a handler (error, disconnect,
finished) cancels whatever engine streams it opened, so no batch slot outlives its HTTP request. Errors: 400 for
bad input (naming the field), 404 for an unknown model (listing the served ones), 413/401 (serve.guard), 503 +
Retry-After when the engines are saturated or not ready. OpenAI's error shape everywhere except upstream's
/chat/completions (`{"detail": ...}`). Logging: request metadata (id, model, token counts, timings) at INFO,
message content only at DEBUG. The Gradio UI (serve.ui) is mounted at "/" by serve.app after these routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from serve.guard import error_response, harden
from serve.models import ModelNotFound, ServedModels
from serve.openai_format import Choices, sse
from serve.protocol import (
    ApiError,
    ChatRequest,
    Defaults,
    engine_requests,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    parse_tokenize_request,
)

logger = logging.getLogger("ray.serve")
_REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class Opened:
    """The engine streams of one HTTP request (one per choice). close() cancels them all (idempotent)."""

    def __init__(self, client: EngineClient, opened: list[tuple[dict, object]]):
        self.client = client
        self.starts = [start for start, _ in opened]
        self.gens = [gen for _, gen in opened]
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    async def events(self):
        """(choice index, event): every start event, then the choices' events as they come (merged)."""
        for i, start in enumerate(self.starts):
            yield i, start
        if len(self.gens) == 1:
            async for ev in self._tail(self.gens[0]):
                yield 0, ev
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for ev in self._tail(gen):
                    queue.put_nowait((i, ev))
            finally:
                queue.put_nowait((i, None))

        self.tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(self.gens)]
        live = len(self.tasks)
        while live:
            i, ev = await queue.get()
            if ev is None:
                live -= 1
            else:
                yield i, ev

    async def _tail(self, gen):
        try:
            async for ev in gen:
                yield ev
        except (RequestCancelledError, asyncio.CancelledError):
            raise
        except Exception as e:  # the replica died mid-stream: the client gets an error event
            self.client.counters["failed_midstream"] += 1
            logger.warning(f"engine stream failed: {type(e).__name__}: {e}")
            yield {"type": "error", "status": 500, "message": f"engine failed mid-stream ({type(e).__name__})"}

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.client.counters["in_flight"] -= 1
        for task in self.tasks:
            task.cancel()
        for gen in self.gens:
            gen.cancel()  # no-op when finished; otherwise frees the engine's batch slot now


class ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its engine streams however the response ends, even when it is cancelled
    before its body was ever iterated (a client that disconnects at once)."""

    def __init__(self, content, opened: Opened, **kw):
        super().__init__(content, media_type="text/event-stream", **kw)
        self.opened = opened

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.opened.close()


class EngineClient:
    """Talks to the engine deployment through its handle: opens streams (retrying a replica that died before the
    first event), maps engine errors to ApiError, and keeps the ingress counters."""

    def __init__(self, handle, settings: dict):
        self.handle = handle
        self.settings = settings
        self.defaults = Defaults(settings.get("temperature", 0.8), settings.get("top_k", 50),
                                 settings.get("max_tokens", 512))
        self.models = ServedModels(settings.get("models") or ["sft"])
        self.first_event_timeout_s = settings.get("first_event_timeout_s", 60.0)
        self.counters = {"requests": 0, "in_flight": 0, "client_errors": 0, "busy_rejections": 0,
                         "failed_midstream": 0, "retried_dead_replica": 0}

    def model(self, name: str | None) -> str:
        try:
            return self.models.resolve(name)
        except ModelNotFound as e:
            raise ApiError(404, str(e), "model", "model_not_found") from None

    async def open(self, payload: dict) -> tuple[dict, object]:
        """-> (start event, the remaining async iterator of events). Raises ApiError."""
        for attempt in range(3):
            handle = self.handle.options(stream=True, multiplexed_model_id=payload["model"])
            gen = handle.generate.remote(payload)
            try:
                first = await asyncio.wait_for(gen.__anext__(), self.first_event_timeout_s)
            except BackPressureError as e:
                self.counters["busy_rejections"] += 1
                raise ApiError(503, f"server busy, retry later ({e})") from None
            except asyncio.TimeoutError:
                gen.cancel()
                raise ApiError(503, "the engine is not ready (model still loading?); retry later") from None
            except _REPLICA_GONE:
                self.counters["retried_dead_replica"] += 1  # nothing was streamed yet: safe to retry elsewhere
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except BaseException:
                gen.cancel()
                raise
            if first["type"] == "error":
                self.counters["busy_rejections" if first["status"] == 503 else "client_errors"] += 1
                raise ApiError(first["status"], first["message"], "model" if first["status"] == 404 else None,
                               first.get("code"))
            return first, gen
        raise ApiError(503, "no engine replica is available right now; retry later")

    async def open_all(self, payloads: list[dict]) -> Opened:
        """Open every choice's engine stream, or none: on any failure the opened ones are cancelled."""
        model = self.model(payloads[0]["model"])
        payloads = [{**p, "model": model} for p in payloads]
        results = await asyncio.gather(*(self.open(p) for p in payloads), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in results:
                if not isinstance(r, BaseException):
                    r[1].cancel()
            errors = sorted((e for e in failed if isinstance(e, ApiError)), key=lambda e: (e.status >= 500, e.status))
            raise errors[0] if errors else failed[0]
        self.counters["in_flight"] += 1
        return Opened(self, results)

    async def events(self, req: ChatRequest):
        """One choice's events (start first), for the UI; the engine stream is closed however this ends."""
        opened = await self.open_all(engine_requests(req))
        try:
            async for _, ev in opened.events():
                yield ev
        finally:
            opened.close()

    async def tokenizer(self, model: str | None, op: str, arg=None):
        """The result of a tokenizer operation on `model` (None = the default). Raises ApiError."""
        name = self.model(model)
        try:
            out = await asyncio.wait_for(
                self.handle.options(multiplexed_model_id=name).tokenizer.remote(name, op, arg),
                self.first_event_timeout_s)
        except (asyncio.TimeoutError, *_REPLICA_GONE):
            raise ApiError(503, "the engine is not ready (model still loading?); retry later") from None
        if "error" in out:
            raise ApiError(out["status"], out["error"], "model" if out["status"] == 404 else "tokens")
        return out["result"]

    async def stats(self, timeout_s=3.0) -> dict | None:
        try:
            return await asyncio.wait_for(self.handle.stats.remote(), timeout_s)
        except Exception:
            return None


async def _read_json(request: Request):
    """The decoded body (serve.guard.BodyLimit has already refused anything over the cap)."""
    return parse_json_body(await request.body())


def _log_request(rid: str, path: str, model: str, choices: Choices, t0: float, ttft: float | None, status: str):
    usage = choices.usage()
    logger.info(f"request {rid} {path} model={model} choices={choices.n} prompt_tokens={usage['prompt_tokens']} "
                f"completion_tokens={usage['completion_tokens']} finish={','.join(map(str, choices.finish))} "
                f"ttft_s={'-' if ttft is None else f'{ttft:.3f}'} total_s={time.perf_counter() - t0:.3f} {status}")


def build_api(client: EngineClient) -> FastAPI:
    app = FastAPI(title="nanochat", docs_url="/docs", redoc_url=None)

    async def start(request: Request, path: str):
        """Parse and validate the whole request, then open its engine streams: (request, Opened, id) or ApiError."""
        client.counters["requests"] += 1
        body = await _read_json(request)
        if path == "/v1/completions":
            req = parse_completion_request(body, client.defaults)
        else:
            req = parse_chat_request(body, openai=path != "/chat/completions", defaults=client.defaults)
        req.model = client.model(req.model)
        rid = f"{'cmpl' if path == '/v1/completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        logger.debug(f"request {rid} content: {getattr(req, 'messages', None) or getattr(req, 'prompts', None)}")
        return req, await client.open_all(engine_requests(req)), rid

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            req, opened, rid = await start(request, "/chat/completions")
        except ApiError as e:
            return error_response(e, openai=False)
        device = opened.starts[0]["device"]
        gpu = 0 if ":" not in device else int(device.split(":")[1])
        acc = Choices("chat", 1, 1, False)

        async def stream():
            ttft, status = None, "ok"
            try:
                async for _, ev in opened.events():
                    acc.add(0, ev)
                    if ev["type"] == "delta":
                        ttft = ttft or time.perf_counter() - t0
                        yield sse({"token": ev["text"], "gpu": gpu})
                    elif ev["type"] == "error":
                        status = "error"
                        yield sse({"error": ev["message"]})
                        return
                yield sse({"done": True})
            finally:
                opened.close()
                _log_request(rid, "/chat/completions", req.model, acc, t0, ttft, status)

        return ClosingStream(stream(), opened, headers={"X-Nanochat-Replica": opened.starts[0]["replica"]})

    async def openai_endpoint(request: Request, path: str):
        t0 = time.perf_counter()
        try:
            req, opened, rid = await start(request, path)
        except ApiError as e:
            return error_response(e)
        kind = "chat" if path == "/v1/chat/completions" else "text"
        acc = Choices(kind, len(opened.starts), req.n, req.logprobs is not None)
        base = {"id": rid, "created": int(time.time()), "model": req.model}
        headers = {"X-Nanochat-Replica": opened.starts[0]["replica"]}
        if req.stream:
            return ClosingStream(_openai_stream(opened, acc, base, req.include_usage, rid, path, t0), opened,
                                 headers=headers)
        ttft = None
        try:
            async for i, ev in opened.events():
                acc.add(i, ev)
                ttft = ttft or (time.perf_counter() - t0 if ev["type"] == "delta" else None)
                if ev["type"] == "error":
                    _log_request(rid, path, req.model, acc, t0, ttft, "error")
                    return error_response(ApiError(ev.get("status", 500), ev["message"]))
        finally:
            opened.close()
        _log_request(rid, path, req.model, acc, t0, ttft, "ok")
        return JSONResponse(acc.response(base), headers=headers)

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        return await openai_endpoint(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def openai_completions(request: Request):
        return await openai_endpoint(request, "/v1/completions")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nanochat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in client.models.names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        try:
            return model_card(client.model(name))
        except ApiError as e:
            return error_response(e)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    async def unknown(request: Request, rest: str):
        path = f"/v1/{rest}"
        if path in OPENAI_PATHS:
            return error_response(ApiError(405, f"Method {request.method} not allowed for {path}", None,
                                           "method_not_allowed"))
        return error_response(ApiError(404, f"Invalid URL ({request.method} {path}); the API is under /v1 (see "
                                            "/docs)", None, "unknown_url"))

    # vLLM's tokenizer endpoints: lm-evaluation-harness (local-completions, tokenizer_backend=remote) tokenizes with
    # them, so it can split context from continuation in the token ids it sends to /v1/completions.
    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        try:
            return await client.tokenizer(model, "info")
        except ApiError as e:
            return error_response(e)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            model, text = parse_tokenize_request(await _read_json(request), detokenize=False)
            tokens = await client.tokenizer(model, "tokenize", text)
        except ApiError as e:
            return error_response(e)
        return {"tokens": tokens, "count": len(tokens)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            model, tokens = parse_tokenize_request(await _read_json(request), detokenize=True)
            return {"prompt": await client.tokenizer(model, "detokenize", tokens)}
        except ApiError as e:
            return error_response(e)

    @app.get("/health")
    async def health():
        stats = await client.stats()
        free = 0 if stats is None else stats["max_batch_size"] - stats["running"]
        return {"status": "ok", "ready": stats is not None, "model": client.models.default,
                "num_gpus": client.settings.get("num_replicas", 1), "available_workers": free}

    @app.get("/stats")
    async def stats():
        engine = await client.stats()
        return {"ready": engine is not None, "engine": engine, "ingress": dict(client.counters),
                "total_workers": client.settings.get("num_replicas", 1)}

    harden(app, client.settings.get("api_key"), client.settings.get("cors_origins") or [])
    return app


async def _openai_stream(opened: Opened, acc: Choices, base: dict, include_usage: bool, rid: str, path: str,
                         t0: float):
    ttft, status = None, "ok"
    try:
        async for i, ev in opened.events():
            acc.add(i, ev)
            if ev["type"] == "error":
                status = "error"
                yield sse({"error": {"message": ev["message"], "type": "server_error", "param": None, "code": None}})
                return
            if ev["type"] == "delta" and ttft is None:
                ttft = time.perf_counter() - t0
            for chunk in acc.chunks(i, ev, base):
                yield chunk
        if include_usage:
            yield acc.usage_chunk(base)
        yield "data: [DONE]\n\n"
    finally:
        opened.close()
        _log_request(rid, path, base["model"], acc, t0, ttft, status)
