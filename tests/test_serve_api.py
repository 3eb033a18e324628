"""python -m pytest tests/test_serve_api.py -q

The OpenAI-compatible API for real clients, on one real local Ray cluster (serve.run, real HTTP on a free loopback
port): two tiny checkpoints (base and SFT) in one app behind an API key, CORS for one origin and DEBUG logging.
The official `openai` client for chat and completions, streaming and not, with log-probabilities compared with a
forward pass of the same checkpoint, `n` and `seed`, each new field's 400; models by name, eviction and reload,
names that try to leave the base dir; the serving metrics in the node's Prometheus export; and the hardening:
no 5xx for any fuzzed body on any endpoint, nothing left generating after an error, 413 for huge bodies, 401s,
OpenAI-shaped 404s and "not supported" 400s, message content in the logs only at DEBUG, the page behind a login.
"""

import glob
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import requests
import torch

from tests.test_serve_protocol import forward_logprobs, fuzz_bodies
from tests.test_serve_ray import CHROMIUM, CHROMIUM_ARGS, HI, ROOT, _free_port, _wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from nanochat.checkpoint_manager import load_model
    from serve.app import ChatAppArgs, build_app
    from serve.tiny import make_tiny_checkpoint

    base = str(tmp_path_factory.mktemp("tinyapi"))
    make_tiny_checkpoint(base, depth=2, sequence_len=256, source="sft", seed=0)
    make_tiny_checkpoint(base, depth=2, sequence_len=256, source="base", seed=1)
    outside = str(tmp_path_factory.mktemp("outside"))  # a checkpoint outside the base dir, linked in as sft:evil
    make_tiny_checkpoint(outside, depth=2, sequence_len=256, source="sft", model_tag="evil")
    os.symlink(os.path.join(outside, "chatsft_checkpoints", "evil"), os.path.join(base, "chatsft_checkpoints", "evil"))
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = base  # the reference models for the log-probability checks
    models = {name: load_model(name, "cpu", phase="eval")[:2] for name in ("sft", "base")}
    metrics_port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ChatAppArgs(base_dir=base, models=["sft", "base", "sft:evil"], max_models_per_replica=1, num_replicas=1,
                       max_batch_size=8, max_waiting=8, max_tokens=16, torch_threads=1, first_event_timeout_s=30,
                       api_key=KEY, cors_origins=["https://good.example"])
    serve.run(build_app(args), name="api", route_prefix="/", logging_config={"log_level": "DEBUG"})
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", base=base, models=models, metrics_port=metrics_port,
                          log_dir=os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs"))
    serve.shutdown()
    ray.shutdown()
    os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.update(NANOCHAT_BASE_DIR=old)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _post(server, path, body, **kw):
    """POST a JSON-able body as JSON, anything else (bytes, a generator) as the raw body."""
    kw.setdefault("headers", AUTH)
    return requests.post(server.url + path, timeout=120, **({"json": body} if isinstance(body, (dict, list)) else
                                                            {"data": body}), **kw)


def _engine_stats(server):
    return requests.get(server.url + "/stats", headers=AUTH, timeout=30).json()


def _token_ids(tok, strings):
    """Token strings of a completions logprobs block -> ids ("bytes:\\xNN..." for partial characters)."""
    ids = []
    for s in strings:
        if s.startswith("bytes:"):
            raw = bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", s))
        elif s in tok.get_special_tokens():
            ids.append(tok.encode_special(s))
            continue
        else:
            raw = s.encode()
        ids.append(tok.enc.encode_single_token(raw))
    return ids


# -----------------------------------------------------------------------------
# The OpenAI client: chat and completions, logprobs equal to a forward pass, n and seed


def test_chat_logprobs_equal_a_forward_pass_streaming_and_not(server, client):
    from serve.protocol import render_prompt

    model, tok = server.models["sft"]
    kw = dict(model="sft", messages=HI, max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.model == "sft" and choice.finish_reason == "length" and full.usage.completion_tokens == 10
    content = choice.logprobs.content
    assert len(content) == 10
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == choice.message.content
    ids = render_prompt(tok, HI) + [tok.enc.encode_single_token(bytes(c.bytes)) for c in content]
    want = forward_logprobs(model, ids)[-10:]
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]), want, atol=2e-4, rtol=0)
    for c in content:  # greedy: the chosen token is the most likely one, and 3 alternatives come with it
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_echo_logprobs_score_the_prompt_like_a_forward_pass(server, client):
    """What lm-evaluation-harness's local-completions sends to score a multiple-choice continuation."""
    for name in ("base", "sft"):
        model, tok = server.models[name]
        prompt = "the model answers every question with care . hello"
        out = client.completions.create(model=name, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
        choice = out.choices[0]
        lp = choice.logprobs
        assert out.model == name and choice.text.startswith(prompt) and lp.text_offset[0] == 0
        n_prompt = len(tok.encode(prompt))
        assert len(lp.tokens) == n_prompt + 1 and "".join(lp.tokens[:n_prompt]) == prompt
        ids = [tok.get_bos_token_id()] + _token_ids(tok, lp.tokens)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs), forward_logprobs(model, ids), atol=2e-4, rtol=0)
        assert all(lp.token_logprobs[i] in top.values() and len(top) <= 2 for i, top in enumerate(lp.top_logprobs))
        assert out.usage.prompt_tokens == n_prompt + 1 and out.usage.completion_tokens == 1
    # Scoring only (max_tokens 0), several prompts, token-id prompts: one forward pass each, nothing generated
    model, tok = server.models["base"]
    ids = [tok.get_bos_token_id()] + tok.encode("hello world")
    out = client.completions.create(model="base", prompt=[ids, ids[:3]], max_tokens=0, logprobs=0, echo=True)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 0
    first = out.choices[0].logprobs.token_logprobs
    assert first[0] is None and out.choices[0].logprobs.tokens[0] == "<|bos|>"
    torch.testing.assert_close(torch.tensor(first[1:]), forward_logprobs(model, ids), atol=2e-4, rtol=0)
    assert out.choices[1].logprobs.token_logprobs[1:] == pytest.approx(first[1:3], abs=1e-5)


def test_lm_eval_harness_protocol_scores_multiple_choice(server):
    """The requests lm-evaluation-harness's local-completions model makes with tokenizer_backend=remote: detect the
    tokenizer endpoints, tokenize context and continuations, send the token ids (one batch) with echo and logprobs 1,
    read sum(token_logprobs[ctxlen:-1]) and greediness. The scores equal a forward pass over the same ids."""
    import jinja2

    from serve.protocol import render_prompt

    model, tok = server.models["base"]
    info = requests.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == "<|bos|>" and info["model_max_length"] == 256

    def tokenize(text):
        r = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
        return r.json()["tokens"]

    assert isinstance(tokenize("test"), list) and tokenize("<|bos|>") == [tok.get_bos_token_id()]
    context, options = "hello world , how are you", [" today ?", " naïve café", " 12 + 34"]
    ctx = tokenize(context)
    batch = [ctx + tokenize(o) for o in options]
    out = _post(server, "/v1/completions", {"model": "base", "prompt": batch, "temperature": 0, "max_tokens": 1,
                                            "logprobs": 1, "seed": 1234, "echo": True}).json()
    for choice, ids in zip(sorted(out["choices"], key=lambda c: c["index"]), batch):
        lps, tops = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
        score = sum(lps[len(ctx):-1])
        greedy = all(lp == max(top.values()) for lp, top in zip(lps[len(ctx):-1], tops[len(ctx):-1]))
        want = forward_logprobs(model, ids)[len(ctx) - 1:]
        assert score == pytest.approx(float(want.sum()), abs=1e-3) and isinstance(greedy, bool)
    assert _post(server, "/detokenize", {"tokens": batch[1]}).json()["prompt"] == context + options[1]
    r = _post(server, "/detokenize", {"tokens": [10**6]})
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    # the chat template of /tokenizer_info renders to exactly the ids the chat endpoints build
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}]
    rendered = jinja2.Template(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert tokenize(rendered) == render_prompt(tok, messages)
    assert requests.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_completions_stream_and_not_agree(server, client):
    kw = dict(model="base", prompt="hello world", max_tokens=8, temperature=0.9, seed=11, logprobs=2)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == full.choices[0].logprobs.tokens and chunks[-1].usage.completion_tokens == 8
    echo = list(client.completions.create(**kw, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in echo) == "hello world" + full.choices[0].text


def test_n_choices_independent_and_reproducible_with_a_seed(server, client):
    kw = dict(model="sft", messages=HI, max_tokens=8, temperature=1.0, seed=5)
    three = client.chat.completions.create(**kw, n=3)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) >= 2
    from serve.protocol import render_prompt

    prompt_tokens = len(render_prompt(server.models["sft"][1], HI))
    assert three.usage.completion_tokens == 24 and three.usage.prompt_tokens == prompt_tokens  # counted once
    assert [c.message.content for c in client.chat.completions.create(**kw, n=3).choices] == texts
    assert client.chat.completions.create(**kw).choices[0].message.content == texts[0]  # choice 0 = the n=1 answer
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**kw, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    out = client.completions.create(model="base", prompt=["hello", "world"], n=2, max_tokens=4, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens == 16


BAD_FIELDS = [  # (endpoint, extra body, param, words in the message)
    ("chat", {"n": 17}, "n", "between 1 and 16"), ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs", "0 and 20"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"), ("chat", {"logprobs": "yes"}, "logprobs", "true or false"),
    ("chat", {"seed": -3}, "seed", "between 0 and"), ("chat", {"stop": ["a"] * 5}, "stop", "at most 4"),
    ("chat", {"max_tokens": 0}, "max_tokens", "between 1 and 4096"),
    ("chat", {"stream_options": "x", "stream": True}, "stream_options", "object"),
    ("text", {"logprobs": 21}, "logprobs", "between 0 and 20"), ("text", {"echo": 1}, "echo", "true or false"),
    ("text", {"prompt": [[1, -5]]}, "prompt", "token ids"), ("text", {"n": 0}, "n", "between 1 and 16"),
    ("text", {"best_of": 4}, "best_of", "not supported"), ("text", {"max_tokens": 4097}, "max_tokens", "1 and 4096"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ("text", {"suffix": "x"}, "suffix", "not supported"), ("chat", {"frequency_penalty": 1}, "frequency_penalty", "not"),
]


def test_bad_values_of_each_new_field_are_400_naming_it(server, client):
    import openai

    for kind, extra, param, needle in BAD_FIELDS:
        body = {"model": "sft", **({"messages": HI} if kind == "chat" else {"prompt": "hello"}), **extra}
        with pytest.raises(openai.BadRequestError) as e:
            if kind == "chat":
                client.chat.completions.create(**body)
            else:
                client.completions.create(**body)
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param and needle in err["message"], (extra, err)


# -----------------------------------------------------------------------------
# Several models in one app


def test_two_models_by_name_evicted_and_reloaded(server, client):
    import openai

    assert [m.id for m in client.models.list().data] == ["sft", "base", "sft:evil"]
    assert client.models.retrieve("base").id == "base"
    kw = dict(messages=HI, max_tokens=8, temperature=0.0)
    answers = {}
    for name in ("sft", "base", "sft", "base@1"):  # max_models_per_replica=1: every switch evicts the other
        out = client.chat.completions.create(model=name, **kw)
        assert out.model == name
        answers.setdefault(name.split("@")[0], set()).add(out.choices[0].message.content)
    assert len(answers["sft"]) == 1 and len(answers["base"]) == 1 and answers["sft"] != answers["base"]
    loads = _engine_stats(server)["engine"]["loads"]
    assert loads["sft"] >= 2 and loads["base"] >= 1 and loads["base@1"] >= 1, loads  # sft was evicted, reloaded
    assert list(_engine_stats(server)["engine"]["models"]) == ["base@1"]  # at most one model loaded
    # unknown names and names that try to leave the base dir: 404 listing the served models, nothing loaded
    for bad in ("gpt-4", "../sft", "sft:../../etc", "/etc/passwd", "sft:..", "sft:d2@99"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=bad, **kw)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model", bad
        assert ("served models: sft, base, sft:evil" in e.value.body["message"]) or "no step 99" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="leads outside the base dir"):  # a served name whose dir is a symlink out
        client.chat.completions.create(model="sft:evil", **kw)
    assert "sft:evil" not in _engine_stats(server)["engine"]["loads"]
    r = requests.get(server.url + "/v1/models/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_cli_picks_a_model_and_sends_the_key(server):
    env = {**os.environ, "NANOCHAT_API_KEY": KEY}
    out = subprocess.run([sys.executable, "-m", "serve.chat_cli", "--url", server.url, "--model", "base", "-p", "hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.split("Assistant: ", 1)[1].strip(), out.stderr[-2000:]
    env.pop("NANOCHAT_API_KEY")
    out = subprocess.run([sys.executable, "-m", "serve.chat_cli", "--url", server.url, "--model", "nope", "-p", "hi",
                          "--api-key", KEY], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "HTTP 404" in out.stdout and "served models" in out.stdout
    out = subprocess.run([sys.executable, "-m", "serve.chat_cli", "--url", server.url, "-p", "hi"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "HTTP 401" in out.stdout


# -----------------------------------------------------------------------------
# Metrics


def test_serving_metrics_in_the_nodes_prometheus_export(server, client):
    from serve.metrics import NAMES

    for _ in range(3):
        client.chat.completions.create(model="sft", messages=HI, max_tokens=12, temperature=0.8)
    samples = {}

    def scraped():
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        samples.clear()
        for line in text.splitlines():
            m = re.match(r'(ray_nanochat_serve_\w+)\{([^}]*)\} ([-+0-9.eE]+|NaN)', line)
            if m and 'model="sft"' in m.group(2):
                samples[m.group(1)] = samples.get(m.group(1), 0.0) + float(m.group(3))
        return all(any(k.startswith(f"ray_{n}") for k in samples) for n in NAMES) and \
            samples.get("ray_nanochat_serve_ttft_seconds_count", 0) >= 3

    _wait_for(scraped, 60, f"the serving metrics in the export (have {sorted(samples)})")
    count = samples["ray_nanochat_serve_ttft_seconds_count"]
    assert 0 < samples["ray_nanochat_serve_ttft_seconds_sum"] / count < 30
    assert 0 < samples["ray_nanochat_serve_tpot_seconds_sum"] / samples["ray_nanochat_serve_tpot_seconds_count"] < 5
    assert samples["ray_nanochat_serve_output_tokens_total"] >= 36
    assert 0 <= samples["ray_nanochat_serve_batch_occupancy"] <= 1 and 0 <= samples["ray_nanochat_serve_kv_cache_usage"] <= 1
    assert samples["ray_nanochat_serve_running_requests"] >= 0 and samples["ray_nanochat_serve_waiting_requests"] >= 0
    assert samples["ray_nanochat_serve_prefix_cache_hit_tokens_total"] >= 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert "ray_serve_num_http_requests" in text or "ray_serve_deployment_request_counter" in text  # Serve's own


# -----------------------------------------------------------------------------
# Hardening (issue #17, items 6-10)


def test_bad_stream_options_leave_nothing_generating(server):
    body = {"model": "sft", "messages": HI, "max_tokens": 4096, "stream": True}
    for bad in ["x", [1], 3, {"include_usage": "yes"}] * 4:
        r = _post(server, "/v1/chat/completions", {**body, "stream_options": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    # an error after some engine streams were opened (the second prompt's token id is out of the vocabulary):
    r = _post(server, "/v1/completions", {"model": "sft", "prompt": [[1, 2, 3], [10**6]], "max_tokens": 4000, "n": 3})
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    # a client that disconnects from a stream of several choices
    with requests.post(server.url + "/v1/chat/completions", json={**body, "n": 3}, headers=AUTH, stream=True) as r:
        next(r.iter_lines())

    def idle():
        stats = _engine_stats(server)
        models = stats["engine"]["models"].values()
        return stats["ingress"]["in_flight"] == 0 and all(m["running"] == 0 and m["waiting"] == 0 for m in models)

    _wait_for(idle, 20, "no request running or waiting in the engine, none in flight at the ingress")


def test_fuzzed_bodies_never_get_a_5xx(server):
    paths = ["/chat/completions", "/v1/chat/completions", "/v1/completions", "/v1/models", "/stats", "/health",
             "/tokenize", "/detokenize"]
    bodies = list(fuzz_bodies(seed=99, count=80))
    statuses = {}
    for i, body in enumerate(bodies):
        path = paths[i % len(paths)]
        r = _post(server, path, json.dumps(body).encode(), headers={**AUTH, "Content-Type": "application/json"},
                  stream=True)
        r.close()  # a successful stream is cut short: that is a disconnect, which must be fine too
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, str(body)[:300], r.status_code)
    for raw in [b"[" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}", b"\xff", b'{"messages": [{"role": "user", '
                b'"content": "hi"}], "temperature": ' + b"9" * 400 + b"}", b'{"a":' * 50_000]:
        for path in paths[:3]:
            r = _post(server, path, raw)
            assert r.status_code == 400, (path, raw[:40], r.text[:200])
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses


def test_huge_bodies_are_413_before_being_read(server):
    t0 = time.time()
    r = _post(server, "/v1/chat/completions", b'{"messages": [], "x": "' + b"a" * (50 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.time() - t0 < 30

    def chunks():  # no Content-Length: the cap is counted while the body streams in
        yield b'{"messages": [], "x": "'
        for _ in range(8):
            yield b"a" * (1 << 20)

    try:
        r = _post(server, "/v1/completions", chunks())
        assert r.status_code == 413
    except requests.ConnectionError:  # the server closed the connection while the client was still sending
        pass
    assert _post(server, "/v1/completions", {"prompt": "x" * 32000, "max_tokens": 1, "model": "sft"}).status_code in (
        200, 400)  # the largest documented request is not refused by the cap (400 = too many tokens for 256)


def test_api_key_required_and_errors_in_openai_shape(server):
    for path in ("/v1/chat/completions", "/v1/completions", "/chat/completions"):
        r = requests.post(server.url + path, json={"messages": HI, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        r = requests.post(server.url + path, json={"messages": HI}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    for path in ("/v1/models", "/stats"):
        assert requests.get(server.url + path).status_code == 401
    assert requests.get(server.url + "/health").json()["ready"] is True  # liveness probes need no key
    r = requests.get(server.url + "/v1/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url" and "detail" not in r.json()
    r = requests.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_cors_only_for_the_configured_origin(server):
    good = requests.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://good.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://good.example"
    assert "access-control-allow-credentials" not in good.headers
    r = requests.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_message_content_is_logged_at_debug_only(server):
    marker = "purple-elephant-4711"
    _post(server, "/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": marker}],
                                           "max_tokens": 2})
    files = glob.glob(os.path.join(server.log_dir, "serve", "replica_api_ChatIngress_*.log"))

    def logged():
        lines = [line for f in files for line in open(f, errors="replace")]
        return [line for line in lines if marker in line]

    _wait_for(lambda: logged(), 20, "the DEBUG line with the message content")
    assert all(line.startswith("DEBUG ") for line in logged()), logged()  # this app logs at DEBUG (INFO: test_serve_ray)
    meta = [line for f in files for line in open(f, errors="replace") if "request chatcmpl-" in line]
    assert any(line.startswith("INFO ") and "prompt_tokens=" in line and "ttft_s=" in line for line in meta)


# -----------------------------------------------------------------------------
# The page: behind a login with the key, with a model picker


def test_gradio_page_needs_the_key_and_offers_the_models(server):
    from gradio_client import Client

    with pytest.raises(Exception, match="(?i)auth|login|401|config"):  # the page's API is behind the login
        Client(server.url + "/", verbose=False)
    client = Client(server.url + "/", auth=("anyone", KEY), verbose=False)
    reply = client.predict("hello", 0.8, 50, 6, "base", api_name="/chat")
    assert isinstance(reply, str) and reply.strip() and "<|" not in reply
    assert "sft, base, sft:evil" in client.predict(api_name="/status")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package at /usr/bin/chromium")
def test_headless_chromium_logs_in_picks_a_model_and_chats(server):
    from playwright.sync_api import sync_playwright

    os.makedirs(os.path.join(ROOT, "artifacts"), exist_ok=True)
    shot = os.path.join(ROOT, "artifacts", "serve_ui_login_models.png")
    _post(server, "/v1/completions", {"model": "sft", "prompt": "x", "max_tokens": 1})  # sft is the loaded model
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            for password in ("wrong", KEY):
                page.goto(server.url + "/", wait_until="load")
                page.wait_for_selector("input[type=password]", timeout=60000)  # the login form, not the chat
                page.locator("input").first.fill("me")
                page.locator("input[type=password]").fill(password)
                page.get_by_role("button", name=re.compile("login", re.I)).click()
                if password == "wrong":
                    page.wait_for_selector("text=/incorrect/i", timeout=30000)
            page.wait_for_selector("text=Engine ready", timeout=60000)
            page.get_by_label("Model").click()
            page.get_by_role("option", name="base", exact=True).click()
            box = page.locator("textarea").first
            box.fill("Hello from a browser")
            box.press("Enter")
            page.wait_for_function("""() => { const b = document.querySelectorAll('[data-testid="bot"]');
                return b.length && b[b.length - 1].innerText.trim().length > 0; }""", timeout=60000)
            page.wait_for_selector('[data-testid="submit-button"]', timeout=60000)
            reply = page.locator('[data-testid="bot"]').last.inner_text()
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    assert reply.strip() and "<|" not in reply
    assert list(_engine_stats(server)["engine"]["models"]) == ["base"]  # the reply came from the picked model
