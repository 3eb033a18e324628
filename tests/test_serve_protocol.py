"""python -m pytest tests/test_serve_protocol.py -q

The API's pieces without Ray: request validation under a seeded fuzzer (only 4xx ApiErrors, never another
exception), the new fields' 400s naming the field and its range, model names that cannot leave the base dir,
prompt and generated-token log-probabilities equal to a forward pass (also on CUDA: a `gpu` test), the body cap /
API key / CORS middlewares over real HTTP (uvicorn on loopback), and chat_web's exposure warnings.
"""

import asyncio
import json
import os
import random
import socket
import threading
import time

import pytest
import requests
import torch

from serve.models import ModelName, ModelNotFound, ServedModels, resolve
from serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    Defaults,
    engine_requests,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    parse_tokenize_request,
)
from serve.tiny import make_tiny_checkpoint

HI = [{"role": "user", "content": "hi"}]


# -----------------------------------------------------------------------------
# Validation: a seeded fuzzer, and each new field's 400


def _random_value(rng: random.Random, depth=0):
    kinds = ["int", "bigint", "float", "str", "bool", "none", "list", "dict", "nan", "surrogate"]
    kind = rng.choice(kinds if depth < 3 else kinds[:6])
    if kind == "int":
        return rng.choice([-1, 0, 1, 2, 5, 16, 17, 20, 21, 4096, 4097, 2**63, -(2**63)])
    if kind == "bigint":
        return int("9" * rng.choice([20, 400, 4000]))
    if kind == "float":
        return rng.choice([-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 1e308, -1e-300, float("inf")])
    if kind == "str":
        return rng.choice(["", "x", "hello", "<|bos|>", "é" * 9000, "stop", "text"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "nan":
        return float("nan")
    if kind == "surrogate":
        return "\ud800x"
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["type", "text", "role", "content", "include_usage"]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


FIELDS = ["messages", "prompt", "tokens", "model", "temperature", "top_k", "top_p", "max_tokens", "max_completion_tokens",
          "seed", "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "echo", "best_of", "tools",
          "response_format", "logit_bias", "presence_penalty", "suffix", "user"]


def fuzz_bodies(seed: int, count: int):
    """Mostly-valid bodies with one to three fields replaced by random values (also used by the Ray tests)."""
    rng = random.Random(seed)
    good_messages = [{"role": "user", "content": "hello"}]
    for _ in range(count):
        body = {"messages": good_messages, "prompt": "hello", "max_tokens": 4}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = _random_value(rng)
        if rng.random() < 0.2:  # messages with a broken entry
            body["messages"] = [{"role": rng.choice(["user", "system", "tool", 3]), "content": _random_value(rng)}]
        yield body


def test_fuzzed_bodies_only_ever_raise_api_errors():
    defaults = Defaults()
    statuses = set()
    for body in fuzz_bodies(seed=1234, count=3000):
        for parse in (lambda b: parse_chat_request(b, openai=True, defaults=defaults),
                      lambda b: parse_chat_request(b, openai=False, defaults=defaults),
                      lambda b: parse_completion_request(b, defaults),
                      lambda b: parse_tokenize_request(b, detokenize=False),
                      lambda b: parse_tokenize_request({**b, "tokens": b.get("prompt")}, detokenize=True)):
            try:
                req = parse(body)
                if not isinstance(req, tuple):  # a tokenizer request is (model, text or ids)
                    engine_requests(req)
                json.dumps(getattr(req, "__dict__", req), ensure_ascii=False).encode("utf-8")  # loggable, sendable
            except ApiError as e:
                statuses.add(e.status)
                assert e.message and len(e.message) < 1000
    assert statuses == {400}


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b"[" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}",
                                 b'{"a": "\\ud800"', b"", b"null"])
def test_unparseable_bodies_are_400(raw):
    try:
        body = parse_json_body(raw)
    except ApiError as e:
        assert e.status == 400 and "Malformed JSON" in e.message
        return
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, openai=True, defaults=Defaults())
    assert e.value.status == 400


CHAT_BAD = [
    ({"n": 0}, "n", "between 1 and 16"), ({"n": 17}, "n", "between 1 and 16"), ({"n": "2"}, "n", "integer"),
    ({"logprobs": 1}, "logprobs", "true or false"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 and 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"), ({"seed": -1}, "seed", "between 0 and"),
    ({"seed": 2**63}, "seed", "between 0 and"), ({"stop": ["a"] * 5}, "stop", "at most 4"),
    ({"max_tokens": int("9" * 400)}, "max_tokens", "between 1 and 4096"),
    ({"temperature": int("9" * 400)}, "temperature", "between 0.0 and 2.0"),
    ({"temperature": float("nan")}, "temperature", "between"),
    ({"stream_options": "x", "stream": True}, "stream_options", "object"),
    ({"stream_options": [1], "stream": True}, "stream_options", "object"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options", "true or false"),
    ({"model": 3}, "model", "model name"), ({"model": ""}, "model", "model name"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"), ({"presence_penalty": 0.5}, "presence_penalty", "not"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "lone surrogate"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": 1}]}]}, "messages", "not supported"),
]


@pytest.mark.parametrize("extra, param, needle", CHAT_BAD)
def test_chat_fields_400_name_the_field_and_range(extra, param, needle):
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": HI, **extra}, openai=True, defaults=Defaults())
    assert (e.value.status, e.value.param) == (400, param) and needle in e.value.message, e.value.message


COMPLETION_BAD = [
    ({}, "prompt", "required"), ({"prompt": []}, "prompt", "prompt must be"), ({"prompt": [[]]}, "prompt", "non-empty"),
    ({"prompt": [1, -2]}, "prompt", "token ids"), ({"prompt": [True]}, "prompt", "prompt must be"),
    ({"prompt": ["a"] * 17}, "prompt", "at most 16"), ({"prompt": "x" * 32001}, "prompt", "too long"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "0 and 20"), ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    ({"prompt": "x", "echo": "yes"}, "echo", "true or false"), ({"prompt": "x", "max_tokens": 0}, "max_tokens", "1 and"),
    ({"prompt": "x", "echo": True, "max_tokens": 0, "stream": True}, "max_tokens", "cannot stream"),
    ({"prompt": ["a"] * 16, "n": 5}, "n", "at most 64"), ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"), ({"prompt": "x", "n": 99}, "n", "between 1 and 16"),
]


@pytest.mark.parametrize("body, param, needle", COMPLETION_BAD)
def test_completion_fields_400_name_the_field_and_range(body, param, needle):
    with pytest.raises(ApiError) as e:
        parse_completion_request(body, Defaults())
    assert (e.value.status, e.value.param) == (400, param) and needle in e.value.message, e.value.message


def test_engine_requests_one_per_choice_with_derived_seeds():
    req = parse_completion_request({"prompt": ["a", [5, 6]], "n": 3, "seed": 10, "echo": True, "logprobs": 2,
                                    "max_tokens": 0}, Defaults())
    payloads = engine_requests(req)
    assert [p["index"] for p in payloads] == list(range(6))
    assert [p["seed"] for p in payloads] == [10, 11, 12, 13, 14, 15]
    assert [p["kind"] for p in payloads] == ["text"] * 3 + ["ids"] * 3 and payloads[3]["prompt"] == [5, 6]
    assert all(p["echo"] and p["logprobs"] == 2 and p["max_tokens"] == 0 for p in payloads)
    chat = parse_chat_request({"messages": HI, "n": 2, "logprobs": True}, openai=True, defaults=Defaults())
    assert [(p["kind"], p["seed"], p["logprobs"]) for p in engine_requests(chat)] == [("chat", None, 0)] * 2
    assert chat.max_tokens == 512 and parse_completion_request({"prompt": "x"}, Defaults()).max_tokens == 16


# -----------------------------------------------------------------------------
# Model names


@pytest.mark.parametrize("name", ["sft", "base:d20", "rl:d20@650", "sft@3", "sft:my-tag.v2_1"])
def test_model_names_round_trip(name):
    assert str(ModelName.parse(name)) == name


@pytest.mark.parametrize("name", ["../sft", "sft:../x", "sft:..", "sft:.hidden", "sft:a/b", "sft:/etc", "/etc/passwd",
                                  "sft:a\\b", "sft@-1", "sft@x", "gpt-4", "", "sft:" + "a" * 70, "sft:d20@1@2"])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ModelNotFound):
        ModelName.parse(name)


def test_served_models_resolve():
    served = ServedModels(["sft", "base:d2", "rl:d2@5"])
    assert served.default == "sft" and served.resolve(None) == "sft"
    assert served.resolve("base:d2@7") == "base:d2@7" and served.resolve("sft@3") == "sft@3"
    for bad in ("rl:d2@6", "base", "base:d3", "../base", "nanochat"):
        with pytest.raises(ModelNotFound, match="served models: sft, base:d2, rl:d2@5"):
            served.resolve(bad)
    with pytest.raises(ValueError, match="not a model name"):
        ServedModels(["sft", "../x"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tinyapi"))
    make_tiny_checkpoint(base, depth=2, sequence_len=128, source="sft", seed=0)
    make_tiny_checkpoint(base, depth=2, sequence_len=128, source="base", seed=1)
    return base


def test_resolve_stays_inside_the_base_dir(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny_dir)
    assert resolve("sft") == (os.path.join(tiny_dir, "chatsft_checkpoints", "d2"), 1)
    assert resolve("base:d2@1")[1] == 1
    with pytest.raises(ModelNotFound, match=r"no step 7 .*complete steps: \[1\]"):
        resolve("sft:d2@7")
    with pytest.raises(ModelNotFound, match="no model tag 'd9'"):
        resolve("base:d9")
    with pytest.raises(ModelNotFound, match="No checkpoints found"):
        resolve("rl")
    # A tag directory that is a symlink to a checkpoint outside the base dir is refused; one inside is fine
    outside = str(tmp_path / "outside")
    make_tiny_checkpoint(outside, depth=2, sequence_len=128, source="sft", model_tag="evil")
    os.symlink(os.path.join(outside, "chatsft_checkpoints", "evil"), os.path.join(tiny_dir, "chatsft_checkpoints",
                                                                               "evil"))
    os.symlink(os.path.join(tiny_dir, "chatsft_checkpoints", "d2"), os.path.join(tiny_dir, "chatsft_checkpoints",
                                                                                "alias"))
    try:
        with pytest.raises(ModelNotFound, match="leads outside the base dir"):
            resolve("sft:evil")
        assert resolve("sft:alias")[1] == 1
    finally:
        os.remove(os.path.join(tiny_dir, "chatsft_checkpoints", "evil"))
        os.remove(os.path.join(tiny_dir, "chatsft_checkpoints", "alias"))


# -----------------------------------------------------------------------------
# Log-probabilities: the replica's numbers equal a forward pass of the checkpoint


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids)-1,) raw log-probability of ids[j] given ids[:j]: the reference every test compares with."""
    with torch.inference_mode():
        logits = model.forward(torch.tensor([ids]))[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from serve.engine_model import LoadedModel

    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = tiny_dir  # the tokenizer comes from the base dir
    try:
        model = LoadedModel("sft", os.path.join(tiny_dir, "chatsft_checkpoints", "d2"), 1, torch.device("cpu"),
                            {"max_batch_size": 4, "max_waiting": 4})
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.update(NANOCHAT_BASE_DIR=old)
    yield model
    model.retire()


def _run(model, payload):
    async def collect():
        return [ev async for ev in model.generate(payload)]

    return asyncio.run(collect())


def _payload(**kw):
    base = dict(model="sft", kind="text", prompt="hello world, how are you", temperature=1.0, top_k=0, top_p=1.0,
                max_tokens=12, seed=3, stop=[], logprobs=3, echo=True, index=0)
    return {**base, **kw}


def test_echo_and_generated_logprobs_equal_a_forward_pass(loaded):
    events = _run(loaded, _payload())
    start, end = events[0], events[-1]
    assert start["type"] == "start" and end["type"] == "end" and end["completion_tokens"] == 12
    tok = loaded.tokenizer
    prompt_ids = [tok.get_bos_token_id()] + tok.encode("hello world, how are you")
    echo = start["echo"]
    assert echo["text"] == "hello world, how are you" and len(echo["logprobs"]) == len(prompt_ids) - 1
    entries = [e for ev in events if ev["type"] == "delta" for e in ev["logprobs"] or []]
    assert len(entries) == 12
    ids = prompt_ids + [tok.enc.encode_single_token(e["bytes"]) for e in entries]
    want = forward_logprobs(loaded.model, ids)
    got = torch.tensor([e["logprob"] for e in echo["logprobs"] + entries])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    for e in echo["logprobs"] + entries:  # the top alternatives are sorted and include the best token
        lps = [lp for _, _, lp in e["top"]]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True) and lps[0] >= e["logprob"] - 1e-6
    text = "".join(ev["text"] for ev in events if ev["type"] == "delta")
    offsets = [e["offset"] for e in entries]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_logprobs_on_cuda_equal_a_forward_pass(tiny_dir):
    """The same check on a GPU replica's device (bf16 compute): the echo scorer is the reference forward pass itself;
    the scheduler's KV-cached decode may round differently, hence the looser bound for generated tokens."""
    from serve.engine_model import LoadedModel

    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = tiny_dir
    try:
        model = LoadedModel("sft", os.path.join(tiny_dir, "chatsft_checkpoints", "d2"), 1, torch.device("cuda"),
                            {"max_batch_size": 4, "max_waiting": 4})
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.update(NANOCHAT_BASE_DIR=old)
    try:
        events = _run(model, _payload(temperature=0.0))
        tok = model.tokenizer
        prompt = [tok.get_bos_token_id()] + tok.encode("hello world, how are you")
        entries = [e for ev in events if ev["type"] == "delta" for e in ev["logprobs"] or []]
        ids = prompt + [tok.enc.encode_single_token(e["bytes"]) for e in entries]
        with torch.inference_mode():
            logp = torch.log_softmax(model.model.forward(torch.tensor([ids], device="cuda"))[0].float(), -1)
        want = logp[:-1].gather(1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].cpu()
        n = len(prompt) - 1
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in events[0]["echo"]["logprobs"]]), want[:n],
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in entries]), want[n:], atol=0.1, rtol=0)
    finally:
        model.retire()


def test_token_id_prompt_and_scoring_only(loaded):
    tok = loaded.tokenizer
    ids = [tok.get_bos_token_id()] + tok.encode("the model answers")
    events = _run(loaded, _payload(kind="ids", prompt=ids, max_tokens=0, logprobs=0))
    assert [ev["type"] for ev in events] == ["start", "end"] and events[-1]["completion_tokens"] == 0
    lps = events[0]["echo"]["logprobs"]
    assert lps[0]["logprob"] is None and lps[0]["token"] == "<|bos|>" and all(e["top"] == [] for e in lps[1:])
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in lps[1:]]), forward_logprobs(loaded.model, ids),
                               atol=2e-4, rtol=0)
    bad = _run(loaded, _payload(kind="ids", prompt=[10**6]))
    assert bad == [{"type": "error", "status": 400, "message": bad[0]["message"]}] and "out of range" in bad[0]["message"]


def test_stop_string_truncates_text_and_logprobs(loaded):
    full = _run(loaded, _payload(echo=False, temperature=0.0, max_tokens=16))
    text = "".join(ev["text"] for ev in full if ev["type"] == "delta")
    entries = [e for ev in full if ev["type"] == "delta" for e in ev["logprobs"] or []]
    cut = len(text) // 2
    stop = text[cut:cut + 2]
    at = text.find(stop)
    stopped = _run(loaded, _payload(echo=False, temperature=0.0, max_tokens=16, stop=[stop]))
    got = "".join(ev["text"] for ev in stopped if ev["type"] == "delta")
    kept = [e for ev in stopped if ev["type"] == "delta" for e in ev["logprobs"] or []]
    assert got == text[:at] and stopped[-1]["finish_reason"] == "stop"
    assert kept == [e for e in entries if e["offset"] < at] and len(kept) < len(entries)


# -----------------------------------------------------------------------------
# The HTTP guards over real HTTP (uvicorn on loopback, no Ray)


@pytest.fixture(scope="module")
def guarded_server():
    import uvicorn
    from fastapi import FastAPI, Request

    from serve.guard import harden

    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    harden(app, api_key="sekret", cors_origins=["https://good.example"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_guard_api_key_cors_and_body_cap(guarded_server):
    url, key = guarded_server, {"Authorization": "Bearer sekret"}
    r = requests.post(url + "/v1/echo", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and "Missing" in r.text
    r = requests.post(url + "/v1/echo", json={}, headers={"Authorization": "Bearer sekreT"})
    assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    assert requests.post(url + "/v1/echo", json={}, headers=key).json() == {"bytes": 2}
    assert requests.get(url + "/health").status_code == 200  # liveness probes need no key
    # CORS: only the configured origin, no credentials; the preflight needs no key
    pre = requests.options(url + "/v1/echo", headers={"Origin": "https://good.example",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://good.example"
    assert "access-control-allow-credentials" not in pre.headers
    other = requests.post(url + "/v1/echo", json={}, headers={**key, "Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    # Body cap: Content-Length over the cap, and a chunked body (no Content-Length) that grows past it
    t0 = time.time()
    r = requests.post(url + "/v1/echo", data=b"x" * (MAX_BODY_BYTES + 1), headers=key)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    sent = []

    def chunks():
        for _ in range(64):  # 64 MiB offered; the server answers after ~1 MiB
            sent.append(1)
            yield b"x" * (1 << 20)

    try:
        r = requests.post(url + "/v1/echo", data=chunks(), headers=key, timeout=30)
        assert r.status_code == 413
    except requests.ConnectionError:  # the server may close the connection while the client is still sending
        pass
    assert len(sent) < 64 and time.time() - t0 < 20
    assert requests.post(url + "/v1/echo", data=b"x" * MAX_BODY_BYTES, headers=key).json() == {"bytes": MAX_BODY_BYTES}


def test_chat_web_warns_when_exposed_without_a_key(monkeypatch):
    from serve.chat_web import exposure_warnings, parse_args

    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    warned = exposure_warnings(parse_args([]))  # upstream's default host 0.0.0.0
    assert len(warned) == 1 and "all interfaces" in warned[0] and "--api-key" in warned[0]
    assert exposure_warnings(parse_args(["--api-key", "k"])) == []
    assert exposure_warnings(parse_args(["--host", "127.0.0.1"])) == []
    assert "any web page" in exposure_warnings(parse_args(["--host", "127.0.0.1", "--cors-origin", "*"]))[0]
    args = parse_args(["--models", "sft, base:d20@5", "--api-key", "s3cr3t", "--cors-origin", "https://a.example"])
    from serve.chat_web import app_args

    cfg = app_args(args, cluster_gpus=0)
    assert cfg.served_models() == ["sft", "base:d20@5"] and cfg.api_key == "s3cr3t" and "s3cr3t" not in repr(cfg)
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env" and exposure_warnings(parse_args([])) == []
    assert cfg.cors_origins == ["https://a.example"]
