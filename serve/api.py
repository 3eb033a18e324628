"""
The HTTP ingress (FastAPI, built on the replica): upstream's chat API, an OpenAI-compatible API, health and stats.

    POST /chat/completions      upstream's body {messages, temperature?, top_k?, max_tokens?}; SSE stream of
                                `data: {"token": "...", "gpu": 0}` chunks, then `data: {"done": true}`
    POST /v1/chat/completions   OpenAI chat completions (stream true/false, temperature, top_p, top_k, max_tokens,
                                stop, seed, stream_options.include_usage); usage counts in the reply
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok", "ready": bool, ...}
    GET  /stats                 engine batcher counters (of the replica that answers) + ingress counters

Errors are JSON with HTTP status: 400 for bad input (upstream's limits, see serve.protocol; `{"detail": ...}` on
/chat/completions, OpenAI's `{"error": {...}}` on /v1), 503 + Retry-After when the engines are saturated or not
ready. A client that disconnects cancels its engine request, which frees its batch slot at the next token.
The Gradio UI (serve.ui) is mounted at "/" by serve.app after these routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from serve.protocol import ApiError, Defaults, parse_chat_request

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
_REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


class EngineClient:
    """Talks to the engine deployment through its handle: opens streams (retrying a replica that died before the
    first event), maps engine errors to ApiError, and keeps the ingress counters."""

    def __init__(self, handle, settings: dict):
        self.handle = handle
        self.settings = settings
        self.defaults = Defaults(settings.get("temperature", 0.8), settings.get("top_k", 50),
                                 settings.get("max_tokens", 512))
        self.model_id = settings.get("model_id") or f"nanochat-{settings.get('source', 'sft')}"
        self.first_event_timeout_s = settings.get("first_event_timeout_s", 60.0)
        self.counters = {"requests": 0, "in_flight": 0, "client_errors": 0, "busy_rejections": 0,
                         "failed_midstream": 0, "retried_dead_replica": 0}

    async def open(self, req) -> tuple[dict, object]:
        """-> (start event, the remaining async iterator of events). Raises ApiError."""
        payload = req.to_dict()
        for attempt in range(3):
            gen = self.handle.options(stream=True).generate.remote(payload)
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
            if first["type"] == "error":
                self.counters["busy_rejections" if first["status"] == 503 else "client_errors"] += 1
                raise ApiError(first["status"], first["message"])
            return first, gen
        raise ApiError(503, "no engine replica is available right now; retry later")

    async def events(self, req):
        """Async iterator over (start, then delta/end/error events); ApiError only before the first yield."""
        first, gen = await self.open(req)
        self.counters["in_flight"] += 1
        try:
            yield first
            try:
                async for ev in gen:
                    yield ev
            except (RequestCancelledError, asyncio.CancelledError):
                raise
            except Exception as e:  # the replica died mid-stream: the client gets an error event
                self.counters["failed_midstream"] += 1
                logger.warning(f"engine stream failed: {type(e).__name__}: {e}")
                yield {"type": "error", "status": 500, "message": f"engine failed mid-stream ({type(e).__name__})"}
        finally:
            self.counters["in_flight"] -= 1
            gen.cancel()  # no-op when finished; otherwise frees the engine's batch slot now

    async def stats(self, timeout_s=3.0) -> dict | None:
        try:
            return await asyncio.wait_for(self.handle.stats.remote(), timeout_s)
        except Exception:
            return None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(e: ApiError, openai: bool) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    if openai:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    else:
        body = {"detail": e.message}
    return JSONResponse(body, status_code=e.status, headers=headers)


async def _body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"Malformed JSON body: {e}") from None


def build_api(client: EngineClient) -> FastAPI:
    app = FastAPI(title="nanochat", docs_url="/docs", redoc_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        client.counters["requests"] += 1
        try:
            req = parse_chat_request(await _body(request), openai=False, defaults=client.defaults)
            for m in req.messages:
                logger.info(f"[{m['role'].upper()}]: {m['content']}")
            events = client.events(req)
            start = await events.__anext__()
        except ApiError as e:
            return _error(e, openai=False)
        gpu = 0 if ":" not in start["device"] else int(start["device"].split(":")[1])

        async def stream():
            async for ev in events:
                if ev["type"] == "delta":
                    yield _sse({"token": ev["text"], "gpu": gpu})
                elif ev["type"] == "error":
                    yield _sse({"error": ev["message"]})
                    return
            yield _sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Nanochat-Replica": start["replica"]})

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        client.counters["requests"] += 1
        try:
            body = await _body(request)
            req = parse_chat_request(body, openai=True, defaults=client.defaults)
            events = client.events(req)
            start = await events.__anext__()
        except ApiError as e:
            return _error(e, openai=True)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": client.model_id}
        headers = {"X-Nanochat-Replica": start["replica"]}
        if req.stream:
            return StreamingResponse(_openai_stream(events, base, include_usage), media_type="text/event-stream",
                                     headers=headers)
        text, end = "", None
        async for ev in events:
            if ev["type"] == "delta":
                text += ev["text"]
            elif ev["type"] == "end":
                end = ev
            elif ev["type"] == "error":
                return _error(ApiError(500, ev["message"]), openai=True)
        return JSONResponse({**base, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": end["finish_reason"], "logprobs": None}],
                             "usage": _usage(end)}, headers=headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": client.model_id, "object": "model", "created": 0,
                                            "owned_by": "nanochat"}]}

    @app.get("/health")
    async def health():
        stats = await client.stats()
        free = 0 if stats is None else stats["max_batch_size"] - stats["running"]
        return {"status": "ok", "ready": stats is not None, "model": client.model_id,
                "num_gpus": client.settings.get("num_replicas", 1), "available_workers": free}

    @app.get("/stats")
    async def stats():
        engine = await client.stats()
        return {"ready": engine is not None, "engine": engine, "ingress": dict(client.counters),
                "total_workers": client.settings.get("num_replicas", 1)}

    return app


def _usage(end: dict) -> dict:
    p, c = end["prompt_tokens"], end["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _openai_stream(events, base: dict, include_usage: bool):
    chunk = {**base, "object": "chat.completion.chunk"}
    yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]})
    async for ev in events:
        if ev["type"] == "delta":
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": ev["text"]}, "finish_reason": None}]})
        elif ev["type"] == "end":
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": ev["finish_reason"]}]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(ev)})
        elif ev["type"] == "error":
            yield _sse({"error": {"message": ev["message"], "type": "server_error", "param": None, "code": None}})
            return
    yield "data: [DONE]\n\n"
