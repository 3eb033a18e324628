"""
Request validation, prompt rendering and UTF-8-safe text streaming for the chat server (no Ray, no torch).

    req = parse_chat_request(body, openai=False, defaults=Defaults())   # ApiError(400, ...) on bad input
    ids = render_prompt(tokenizer, req.messages)                       # [bos, user_start, ..., assistant_start]
    stream = TextStream(tokenizer, stop=req.stop)
    for token in tokens: text += stream.push(token)                    # never half a character, never <|...|>
    text += stream.flush()

Limits are upstream's web server's (nanochat@21a7774 scripts/chat_web.py), rejected with HTTP 400, never clamped:
1..500 messages, 1..8000 characters each, 32000 in total, temperature 0..2, top_k 0..200, max_tokens 1..4096.
Roles are user/assistant; a leading system message is folded into the first user message, as
nanochat.tokenizer.render_conversation does.
"""

from __future__ import annotations

import codecs
import dataclasses
import math

MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 disables top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_STOP_SEQUENCES = 4

# How tool-call special tokens are shown to people (the tokens themselves never are): `expr` → result
TOOL_TEXT = {"<|python_start|>": "`", "<|python_end|>": "`", "<|output_start|>": " → ", "<|output_end|>": ""}


class ApiError(Exception):
    """A client error with its HTTP status; `param` names the offending field (OpenAI error format)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclasses.dataclass
class Defaults:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}], system already folded in
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    seed: int | None
    stop: list[str]
    stream: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(body, name, lo, hi, integer=False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} between {lo} and {hi}, got {value!r}", name)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value!r}", name)
    return value


def _content_text(content, i):
    """A message's text: a string, or (OpenAI) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                    "images and other part types are not supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string", "messages")


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list):
        raise ApiError(400, "messages must be a list of {\"role\": ..., \"content\": ...} objects", "messages")
    if len(raw) == 0:
        raise ApiError(400, "At least one message is required", "messages")
    if len(raw) > MAX_MESSAGES_PER_REQUEST:
        raise ApiError(400, f"Too many messages ({len(raw)}). Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed "
                            "per request", "messages")
    out, total = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role, text = m["role"], _content_text(m["content"], i)
        if role not in ("user", "assistant", "system"):
            raise ApiError(400, f"messages[{i}] has invalid role {role!r}; use 'user' or 'assistant' (or 'system' "
                                "as the first message)", "messages")
        if role == "system" and i != 0:
            raise ApiError(400, f"messages[{i}]: a system message is only allowed first", "messages")
        if not text:
            raise ApiError(400, f"Message {i} has empty content", "messages")
        if len(text) > MAX_MESSAGE_LENGTH:
            raise ApiError(400, f"Message {i} is too long ({len(text)} characters). Maximum {MAX_MESSAGE_LENGTH} "
                                "characters allowed per message", "messages")
        total += len(text)
        out.append({"role": role, "content": text})
    if total > MAX_TOTAL_CONVERSATION_LENGTH:
        raise ApiError(400, f"Total conversation is too long ({total} characters). Maximum "
                            f"{MAX_TOTAL_CONVERSATION_LENGTH} characters allowed", "messages")
    if out[0]["role"] == "system":  # folded like nanochat.tokenizer.render_conversation
        if len(out) < 2 or out[1]["role"] != "user":
            raise ApiError(400, "a system message must be followed by a user message", "messages")
        out = [{"role": "user", "content": out[0]["content"] + "\n\n" + out[1]["content"]}] + out[2:]
    return out


def parse_chat_request(body, openai: bool, defaults: Defaults) -> ChatRequest:
    """Validate a decoded JSON body of POST /chat/completions (openai=False) or /v1/chat/completions."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    temperature = _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
    top_k = _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    max_tokens = _number(body, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True)
    if openai and max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"seed must be a non-negative integer, got {seed!r}", "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
                       "stop")
    stream = body.get("stream", not openai)  # upstream's endpoint always streams
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    if not openai and not stream:
        raise ApiError(400, "/chat/completions only streams; use /v1/chat/completions for a single JSON reply",
                       "stream")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", "n")
    return ChatRequest(messages=messages,
                       temperature=defaults.temperature if temperature is None else float(temperature),
                       top_k=defaults.top_k if top_k is None else top_k,
                       top_p=1.0 if top_p is None else float(top_p),
                       max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                       seed=seed, stop=stop, stream=stream)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids as upstream's web server built them: bos, then each turn wrapped in its role's special tokens,
    then <|assistant_start|> to prompt the reply. Messages need not alternate."""
    sp = tokenizer.encode_special
    wrap = {"user": (sp("<|user_start|>"), sp("<|user_end|>")),
            "assistant": (sp("<|assistant_start|>"), sp("<|assistant_end|>"))}
    ids = [tokenizer.get_bos_token_id()]
    for m in messages:
        start, end = wrap[m["role"]]
        ids += [start] + tokenizer.encode(m["content"]) + [end]
    return ids + [sp("<|assistant_start|>")]


class TextStream:
    """Token ids -> text deltas that never split a UTF-8 character, never contain special tokens, and stop at
    (without including) the first stop string. Tool tokens are shown as TOOL_TEXT."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.special = {tokenizer.encode_special(s): s for s in tokenizer.get_special_tokens()}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = list(stop or [])
        self.text = ""  # everything decoded so far (including held-back text)
        self.sent = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        name = self.special.get(token)
        if name is None:
            self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        else:  # a special token ends any pending partial character
            self.text += self.decoder.decode(b"", final=True) + TOOL_TEXT.get(name, "")
            self.decoder.reset()
        return self._release(final=False)

    def flush(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:  # hold back a tail that may still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
