"""
HTTP exposure controls of the chat app's ingress: body-size cap, optional API key, opt-in CORS, error shapes.

    app = FastAPI(); ...routes...; harden(app, api_key="...", cors_origins=["https://example.org"])

- Body cap: a request body over MAX_BODY_BYTES (1 MiB) is answered 413 without being read whole: at once when its
  Content-Length says so, else as soon as the streamed body passes the cap (the body is buffered only up to it).
  It applies to every path (the chat page has no uploads).
- API key (optional; `--api-key` / NANOCHAT_API_KEY): the API paths (/v1/..., /chat/completions, /stats, /docs,
  /openapi.json, /tokenize, /detokenize, /tokenizer_info) need `Authorization: Bearer <key>` (compared in constant time); anything else is a 401 in OpenAI's
  error shape. GET /health stays open (liveness probes). The chat page is protected by Gradio's own login form
  (serve.ui): its password is the same key, so a user who has the key can use the page; the page's backend calls
  reach the engines in-process, never through the API.
- CORS is off unless origins are given (`--cors-origin`): then exactly those origins may call the API from a
  browser, without credentials (the bearer key is a header, not a cookie).
- Errors: OpenAI's `{"error": {"message", "type", "param", "code"}}`, including 404 for unknown /v1 paths and 405
  for a wrong method (FastAPI's `{"detail": ...}` is kept only for upstream's /chat/completions).
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.protocol import MAX_BODY_BYTES, ApiError

API_PREFIXES = ("/v1/", "/chat/completions", "/stats", "/docs", "/openapi.json", "/tokenize", "/detokenize",
                "/tokenizer_info")
RETRY_AFTER_S = 1


def error_body(e: ApiError) -> dict:
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
        e.status, "invalid_request_error" if e.status < 500 else "server_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def error_response(e: ApiError, openai: bool = True) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    body = error_body(e) if openai else {"detail": e.message}
    return JSONResponse(body, status_code=e.status, headers=headers)


async def _send_error(send, e: ApiError, extra_headers=()):
    payload = json.dumps(error_body(e)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close"), *extra_headers]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, without reading them whole (see module docstring)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"request body too large: the limit is {self.limit} bytes", None,
                           "request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _send_error(send, ApiError(400, "invalid Content-Length header"))
            if int(length) > self.limit:
                return await _send_error(send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _send_error(send, too_big)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications for streaming responses

        await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: the API paths need `Authorization: Bearer <key>` (see module docstring)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _path(scope).startswith(API_PREFIXES) and scope.get("method") != "OPTIONS":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("Missing API key: send the header 'Authorization: Bearer <key>'" if not auth else
                           "Incorrect API key provided")
                return await _send_error(send, ApiError(401, message, None, "invalid_api_key"),
                                         [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def check_key(key: str | None, given: str) -> bool:
    """Constant-time comparison for the chat page's login (serve.ui)."""
    return key is not None and hmac.compare_digest(given.encode(), key.encode())


def harden(app: FastAPI, api_key: str | None, cors_origins: list[str]):
    """Install the error handlers and middlewares on `app` (call after its routes are defined)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = _path(request.scope)
        if exc.status_code == 404:
            e = ApiError(404, f"Invalid URL ({request.method} {path}); the API is under /v1 (see /docs)", None,
                         "unknown_url")
        elif exc.status_code == 405:
            e = ApiError(405, f"Method {request.method} not allowed for {path}", None, "method_not_allowed")
        else:
            e = ApiError(exc.status_code, str(exc.detail))
        return error_response(e, openai=not path.startswith("/chat/completions"))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):  # a bug: still answer in the API's shape, never a traceback
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})"))

    # Starlette wraps later-added middleware around earlier ones: CORS outermost (preflights and 401s get CORS
    # headers), then the key, then the body cap.
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
