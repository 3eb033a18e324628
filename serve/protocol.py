"""
Request validation, prompt rendering and UTF-8-safe text streaming for the chat server (no Ray, no torch).

    body = parse_json_body(raw_bytes)                                   # ApiError(400) on anything unparseable
    req = parse_chat_request(body, openai=False, defaults=Defaults())   # ApiError(400, ..., param) on bad input
    req = parse_completion_request(body, defaults=Defaults())           # POST /v1/completions
    for payload in engine_requests(req): ...                            # one engine request per choice
    ids = render_prompt(tokenizer, req.messages)                        # [bos, user_start, ..., assistant_start]
    stream = TextStream(tokenizer, stop=req.stop)
    for token in tokens: text += stream.push(token)                     # never half a character, never <|...|>
    text += stream.flush()

Every limit is checked here, for the WHOLE request, before any engine work starts; each error names the field
(`param`, OpenAI's error format) and its allowed range. Limits are upstream's web server's (nanochat@21a7774
scripts/chat_web.py), rejected with HTTP 400, never clamped: 1..500 messages, 1..8000 characters each, 32000 in
total, temperature 0..2, top_k 0..200, max_tokens 1..4096. Ours on top: n 1..16, logprobs / top_logprobs 0..20,
completions prompts (a string, a list of strings, token ids or lists of them) 32000 characters or token ids in
total and at most 16 of them, at most 64 choices per request (prompts x n). Roles are user/assistant; a leading
system message is folded into the first user message, as nanochat.tokenizer.render_conversation does. Fields of
OpenAI's API that would change the meaning of the answer and that nanochat cannot honour (tools, response_format,
penalties, ...) are a 400 "not supported" instead of being silently ignored; harmless ones (user, metadata, ...)
are ignored.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math

MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 disables top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_STOP_SEQUENCES = 4
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound)
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n: each choice is one engine request
MAX_PROMPT_TOKENS = 32000  # token ids over all prompts of one request
COMPLETION_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
MAX_MODEL_NAME = 256
MAX_SEED = 2**63 - 1
# The largest body the documented limits allow is ~0.4 MB (32000 characters of 12-byte JSON escapes); 1 MiB leaves
# room for per-message overhead and ignored fields. Larger bodies get 413 before they are read whole.
MAX_BODY_BYTES = 1 << 20

# How tool-call special tokens are shown to people (the tokens themselves never are): `expr` → result
TOOL_TEXT = {"<|python_start|>": "`", "<|python_end|>": "`", "<|output_start|>": " → ", "<|output_end|>": ""}

# OpenAI (and common OpenAI-compatible server) fields that would change the answer -> the values that mean "off".
# Anything else in such a field is a 400 "not supported"; fields absent from this table and from the parsers are
# ignored (user, metadata, store, service_tier, parallel_tool_calls, ...).
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,), "reasoning_effort": (None,), "repetition_penalty": (None, 1), "min_p": (None, 0),
    "min_tokens": (None, 0), "ignore_eos": (None, False), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "suffix": (None, ""),
}


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
class Sampling:
    """The sampling fields shared by chat and completions requests (validated)."""

    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    seed: int | None
    stop: list[str]
    stream: bool
    n: int = 1
    logprobs: int | None = None  # None = off; k = each token's log-probability and its k most likely alternatives
    include_usage: bool = False  # stream_options.include_usage
    model: str | None = None  # None = the app's default model


@dataclasses.dataclass
class ChatRequest(Sampling):
    messages: list[dict] = dataclasses.field(default_factory=list)  # role user|assistant, system folded in

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompletionRequest(Sampling):
    prompts: list = dataclasses.field(default_factory=list)  # each a str or a list of token ids
    echo: bool = False


# -----------------------------------------------------------------------------
# Field checks


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_json_body(raw: bytes):
    """The decoded JSON body; ApiError(400) for invalid UTF-8/JSON, integer literals over Python's 4300-digit
    limit and nesting deeper than the interpreter's recursion limit."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"Malformed JSON body: {type(e).__name__}: {str(e)[:200]}") from None


def _number(body, name, lo, hi, integer=False):
    """body[name] (None if absent) checked to be a number (an int if integer) in [lo, hi]; exact for any int."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {kind} between {lo} and {hi}, got {_short(value)}", name)
    # int vs float comparisons are exact in Python, so a 400-digit integer is simply out of range (no float()).
    if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {_short(value)}", name)
    return value


def _bool(body, name, default=False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_short(value)}", name)
    return value


def _utf8(text: str, where: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" decodes to a lone surrogate, which no tokenizer can encode
        raise ApiError(400, f"{where} is not valid Unicode (it contains a lone surrogate)", param) from None
    return text


def _check_unsupported(body: dict, extra: tuple[str, ...] = ()):
    for name in (*UNSUPPORTED, *extra):
        value = body.get(name)
        if value is not None and value not in UNSUPPORTED.get(name, (None,)):
            raise ApiError(400, f"{name} is not supported by this server (nanochat generates plain text with "
                                "its own sampling only); remove the field", name, "unsupported_parameter")


def _model(body) -> str | None:
    value = body.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODEL_NAME:
        raise ApiError(400, f"model must be a model name (a string of 1 to {MAX_MODEL_NAME} characters), got "
                            f"{_short(value)}; GET /v1/models lists them", "model")
    return _utf8(value, "model", "model")


def _stop(body) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and 0 < len(s) <= 100 for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them "
                            "(1 to 100 characters each)", "stop")
    return [_utf8(s, "stop", "stop") for s in stop]


def _stream_options(body, stream: bool) -> bool:
    """-> include_usage. Validated even when stream is false (it is then ignored)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object like {{\"include_usage\": true}}, got "
                            f"{_short(options)}", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {_short(include)}",
                       "stream_options")
    return include and stream


def _sampling(body, defaults: Defaults, openai: bool, max_tokens_default: int, min_max_tokens=MIN_MAX_TOKENS) -> dict:
    temperature = _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
    top_k = _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    max_tokens = _number(body, "max_tokens", min_max_tokens, MAX_MAX_TOKENS, integer=True)
    if openai and max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", min_max_tokens, MAX_MAX_TOKENS, integer=True)
    seed = _number(body, "seed", 0, MAX_SEED, integer=True)
    stream = body.get("stream", not openai)  # upstream's endpoint always streams
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_short(stream)}", "stream")
    n = _number(body, "n", 1, MAX_N, integer=True) if openai else None
    if not openai and body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 on /chat/completions; use /v1/chat/completions for several choices", "n")
    return dict(temperature=defaults.temperature if temperature is None else float(temperature),
                top_k=defaults.top_k if top_k is None else top_k, top_p=1.0 if top_p is None else float(top_p),
                max_tokens=max_tokens_default if max_tokens is None else max_tokens, seed=seed, stop=_stop(body),
                stream=stream, n=n or 1, include_usage=_stream_options(body, stream), model=_model(body))


# -----------------------------------------------------------------------------
# Chat


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
        for field in ("tool_calls", "function_call", "audio"):
            if m.get(field):
                raise ApiError(400, f"messages[{i}].{field} is not supported by this server", "messages",
                               "unsupported_parameter")
        role, text = m["role"], _content_text(m["content"], i)
        if role not in ("user", "assistant", "system"):
            raise ApiError(400, f"messages[{i}] has invalid role {_short(role)}; use 'user' or 'assistant' (or "
                                "'system' as the first message)", "messages")
        if role == "system" and i != 0:
            raise ApiError(400, f"messages[{i}]: a system message is only allowed first", "messages")
        if not text:
            raise ApiError(400, f"Message {i} has empty content", "messages")
        if len(text) > MAX_MESSAGE_LENGTH:
            raise ApiError(400, f"Message {i} is too long ({len(text)} characters). Maximum {MAX_MESSAGE_LENGTH} "
                                "characters allowed per message", "messages")
        total += len(text)
        out.append({"role": role, "content": _utf8(text, f"messages[{i}].content", "messages")})
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
    _check_unsupported(body)
    sampling = _sampling(body, defaults, openai, defaults.max_tokens)
    if not openai and not sampling["stream"]:
        raise ApiError(400, "/chat/completions only streams; use /v1/chat/completions for a single JSON reply",
                       "stream")
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise ApiError(400, f"top_logprobs (0 to {MAX_LOGPROBS}) needs logprobs: true", "top_logprobs")
    return ChatRequest(**sampling, logprobs=(top or 0) if logprobs else None, messages=messages)


# -----------------------------------------------------------------------------
# Completions


def _prompts(raw) -> list:
    """OpenAI's four prompt forms -> a list of prompts, each a str or a non-empty list of token ids."""
    def ids(value, where):
        if not value or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value):
            raise ApiError(400, f"{where} must be a non-empty list of token ids (integers >= 0)", "prompt")
        return value

    if isinstance(raw, str):
        prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
        prompts = [ids(raw, "prompt")]
    elif isinstance(raw, list) and raw and all(isinstance(p, (str, list)) for p in raw):
        prompts = [p if isinstance(p, str) else ids(p, f"prompt[{i}]") for i, p in enumerate(raw)]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such "
                            f"lists, got {_short(raw)}", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt has {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    chars = sum(len(p) for p in prompts if isinstance(p, str))
    tokens = sum(len(p) for p in prompts if isinstance(p, list))
    if chars > MAX_TOTAL_CONVERSATION_LENGTH or tokens > MAX_PROMPT_TOKENS:
        raise ApiError(400, f"prompt is too long ({chars} characters, {tokens} token ids); at most "
                            f"{MAX_TOTAL_CONVERSATION_LENGTH} characters and {MAX_PROMPT_TOKENS} token ids in total",
                       "prompt")
    return [_utf8(p, "prompt", "prompt") if isinstance(p, str) else p for p in prompts]


def parse_completion_request(body, defaults: Defaults) -> CompletionRequest:
    """Validate a decoded JSON body of POST /v1/completions (OpenAI's legacy completions: raw text, no template)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if "prompt" not in body:
        raise ApiError(400, "prompt is required (a string, a list of strings or token ids)", "prompt")
    prompts = _prompts(body["prompt"])
    _check_unsupported(body)
    echo = _bool(body, "echo")
    sampling = _sampling(body, defaults, True, COMPLETION_MAX_TOKENS_DEFAULT, min_max_tokens=0 if echo else 1)
    logprobs = _number(body, "logprobs", 0, MAX_LOGPROBS, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of not in (1, sampling["n"]):
        raise ApiError(400, f"best_of must be 1 or equal to n ({sampling['n']}); ranking several samples is not "
                            "supported", "best_of", "unsupported_parameter")
    if len(prompts) * sampling["n"] > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={sampling['n']} = {len(prompts) * sampling['n']} choices; "
                            f"at most {MAX_CHOICES} per request", "n")
    if sampling["max_tokens"] == 0 and sampling["stream"]:
        raise ApiError(400, "max_tokens 0 (score the prompt only) cannot stream; set stream to false",
                       "max_tokens")
    return CompletionRequest(**sampling, logprobs=logprobs, prompts=prompts, echo=echo)


# -----------------------------------------------------------------------------
# Tokenizer endpoints (vLLM's /tokenize and /detokenize, which lm-evaluation-harness's remote tokenizer uses)


def parse_tokenize_request(body, detokenize: bool) -> tuple[str | None, str | list[int]]:
    """-> (model or None, text to tokenize | token ids to decode)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _bool(body, "add_special_tokens")  # accepted, and without effect: nanochat's prompts carry their own <|bos|>
    if detokenize:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or len(tokens) > MAX_PROMPT_TOKENS or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in tokens):
            raise ApiError(400, f"tokens must be a list of at most {MAX_PROMPT_TOKENS} token ids (integers >= 0)",
                           "tokens")
        return _model(body), tokens
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or len(prompt) > MAX_TOTAL_CONVERSATION_LENGTH:
        raise ApiError(400, f"prompt must be a string of at most {MAX_TOTAL_CONVERSATION_LENGTH} characters",
                       "prompt")
    return _model(body), _utf8(prompt, "prompt", "prompt")


# -----------------------------------------------------------------------------
# Engine requests


def engine_requests(req: ChatRequest | CompletionRequest) -> list[dict]:
    """One engine payload per choice; choice index = prompt index * n + sample index (OpenAI's order). With a
    seed, choice i samples with seed + i, so choice 0 equals the n=1 answer and every choice is reproducible."""
    common = dict(model=req.model, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                  max_tokens=req.max_tokens, stop=req.stop, logprobs=req.logprobs)
    prompts = [("chat", req.messages)] if isinstance(req, ChatRequest) else \
        [("text" if isinstance(p, str) else "ids", p) for p in req.prompts]
    out = []
    for p, (kind, prompt) in enumerate(prompts):
        for s in range(req.n):
            index = p * req.n + s
            seed = None if req.seed is None else (req.seed + index) % (MAX_SEED + 1)
            out.append({**common, "index": index, "kind": kind, "prompt": prompt, "seed": seed,
                        "echo": getattr(req, "echo", False)})
    return out


# -----------------------------------------------------------------------------
# Prompts and text


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
    (without including) the first stop string. Tool tokens are shown as TOOL_TEXT (raw=False); with raw=True
    (completions) special tokens are dropped from the text."""

    def __init__(self, tokenizer, stop: list[str] | None = None, raw: bool = False):
        self.tokenizer = tokenizer
        self.special = {tokenizer.encode_special(s): s for s in tokenizer.get_special_tokens()}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = list(stop or [])
        self.raw = raw
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
            self.text += self.decoder.decode(b"", final=True) + ("" if self.raw else TOOL_TEXT.get(name, ""))
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
