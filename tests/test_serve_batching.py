"""python -m pytest tests/test_serve_batching.py -q

The serving core without Ray: continuous batching is exact (batched == alone, bit for bit, for the same seeds),
the calculator tool works per row, per-token logprobs are the model's raw log-softmax, text streaming never splits a
character or shows special tokens, request validation matches upstream's limits, and chat_cli works in-process.
(The prefill/prefix-cache/static-decode paths: tests/test_serve_fastpaths.py.)
"""

import dataclasses
import threading

import pytest
import torch

from serve.batching import BatchScheduler, QueueFull, SamplingParams
from serve.protocol import (
    MAX_MESSAGE_LENGTH,
    ApiError,
    Defaults,
    TextStream,
    parse_chat_request,
    render_prompt,
)
from tests.decode_helpers import tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, base dir) of a depth-2 random checkpoint written and loaded through the checkpoint manager."""
    return tiny_chat_model(str(tmp_path_factory.mktemp("tinychat")))


@pytest.fixture
def threads():
    """Set torch's intra-op threads for one test, restoring them after."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _prompts(tok, n):
    bos = tok.get_bos_token_id()
    return [[bos] + tok.encode(f"hello world {i} " * (i + 1) + "how are you today ?") for i in range(n)]


def _params(n, max_tokens=24):
    temps, top_ks, top_ps = [0.0, 0.5, 0.8, 1.0, 1.3], [None, 5, 50, 0], [1.0, 1.0, 0.9]
    return [SamplingParams(max_tokens=max_tokens + 3 * i, temperature=temps[i % 5], top_k=top_ks[i % 4],
                           top_p=top_ps[i % 3], seed=1000 + i) for i in range(n)]


def _alone(model, tok, prompts, params, **kw):
    return [[(e.token, e.sampled, e.finish_reason) for e in BatchScheduler(model, tok, **kw).generate(p, sp)]
            for p, sp in zip(prompts, params)]


def _batched(model, tok, prompts, params, join_at, **kw):
    """Submit request i before step join_at[i]; returns every request's events."""
    sched = BatchScheduler(model, tok, **kw)
    outs = [[] for _ in prompts]
    step = 0
    while True:
        for i, at in enumerate(join_at):
            if at == step:
                sched.submit(prompts[i], params[i], lambda ev, i=i: outs[i].append((ev.token, ev.sampled,
                                                                                    ev.finish_reason)))
        worked = sched.step()
        step += 1
        if not worked and step > max(join_at):
            return outs, sched


@pytest.mark.parametrize("num_threads", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_eight_concurrent_requests_equal_each_alone(tiny, threads, num_threads):
    """8 requests with different temperature/top-k/top-p/seed/max_tokens, joining at different token boundaries,
    and more requests than rows (slots are reused): each gets exactly the tokens it gets alone."""
    threads(num_threads)
    model, tok, _ = tiny
    n, steps = (8, 24) if num_threads == 1 else (4, 6)  # 2 threads: slow on a busy 2-core box
    prompts, params = _prompts(tok, n), _params(n, steps)
    alone = _alone(model, tok, prompts, params, max_batch_size=4)
    join_at = [0, 0, 0, 3, 3, 5, 9, 9][:n]
    batched, sched = _batched(model, tok, prompts, params, join_at, max_batch_size=4)
    for i in range(n):
        assert batched[i] == alone[i], f"request {i} ({params[i]}) differs when batched"
    assert all(len(o) == p.max_tokens and o[-1][2] == "length" for o, p in zip(batched, params))
    assert sched.stats["requests_finished"] == n and sched.num_running() == 0
    # Seeds matter (sampled requests with different seeds differ) and params matter.
    assert alone[1] != alone[2]


def test_batch_invariant_mode_pads_rows_and_attends_row_by_row(tiny, monkeypatch):
    from nanochat import flash_attention
    from serve import batching

    model, tok, _ = tiny
    sched = BatchScheduler(model, tok, max_batch_size=5, max_seq_len=100, prefix_block=8)
    assert sched.batch_invariant and sched.cache.batch_size == 8 and sched.capacity == 100
    assert flash_attention.flash_attn.flash_attn_with_kvcache is batching._rowwise_dispatch
    calls, original = [], batching._original_attn

    def spy(q, *args, **kwargs):
        calls.append(q.size(0))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(batching, "_original_attn", spy)
    prompts = _prompts(tok, 2)
    for p in prompts:
        sched.submit(p, SamplingParams(max_tokens=5, temperature=0.0))
    calls.clear()
    sched.step()  # 2 prefills (batch 1, one forward per 8-token block) + one decode step of 8 rows, row by row
    n_layer = model.config.n_layer
    blocks = sum(-(-len(p) // 8) for p in prompts)
    assert blocks > 2 and sched.stats["prefill_forwards"] == blocks
    assert calls == [1] * n_layer * blocks + [1] * n_layer * 2
    lens = sched.cache.cache_seqlens[:8].tolist()
    assert lens[:2] == [len(prompts[0]) + 1, len(prompts[1]) + 1] and lens[2:] == [1] * 6  # dummies: 0 + 1


def test_row_stops_at_context_and_prompt_too_long(tiny):
    model, tok, _ = tiny
    sched = BatchScheduler(model, tok, max_batch_size=2, max_seq_len=40)
    prompt = _prompts(tok, 1)[0]
    events = sched.generate(prompt, SamplingParams(max_tokens=4096, temperature=1.0, seed=1))
    assert len(prompt) + len(events) == 40 and events[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="context is 40 tokens"):
        sched.submit(list(range(1, 41)), SamplingParams())


def test_queue_bound_and_cancel_frees_the_row(tiny):
    model, tok, _ = tiny
    sched = BatchScheduler(model, tok, max_batch_size=1, max_waiting=1)
    p = _prompts(tok, 1)[0]
    events = []
    first = sched.submit(p, SamplingParams(max_tokens=200, temperature=1.0), events.append)
    sched.submit(p, SamplingParams(max_tokens=3))
    with pytest.raises(QueueFull):
        sched.submit(p, SamplingParams(max_tokens=3))
    sched.step()
    sched.step()
    assert sched.slots[0] is first and len(events) == 3  # admission step: prefill token + one decode token
    first.cancel()
    sched.step()  # the cancelled row leaves and the waiting request takes its row in the same step
    assert events[-1].finish_reason == "cancelled" and sched.slots[0] is not first
    assert sched.stats["requests_cancelled"] == 1


def test_scheduler_thread_serves_concurrent_submitters(tiny, threads):
    threads(1)
    model, tok, _ = tiny
    prompts, params = _prompts(tok, 6), _params(6, 12)
    alone = _alone(model, tok, prompts, params, max_batch_size=8)
    sched = BatchScheduler(model, tok, max_batch_size=8).start()
    results = [None] * 6

    def worker(i):
        results[i] = [(e.token, e.sampled, e.finish_reason) for e in sched.generate(prompts[i], params[i])]

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    sched.stop()
    assert results == alone


# -----------------------------------------------------------------------------
# Calculator tool per row (a scripted fake model: the next token is a function of (position, input token))


class _ScriptedModel:
    """Greedy 'model' that follows per-position scripts; implements the KV-cache protocol's bookkeeping only."""

    def __init__(self, vocab, script):
        from types import SimpleNamespace

        self.config = SimpleNamespace(sequence_len=128, n_kv_head=1, n_head=1, n_embd=8, n_layer=1, vocab_size=vocab)
        self.vocab, self.script = vocab, script  # {(position of the input token, input token): next token}

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):  # every position (a batched prefill reads each row's own last real position)
                nxt = self.script.get((int(kv_cache.cache_seqlens[b]) + t, int(idx[b, t])))
                if nxt is not None:
                    logits[b, t, nxt] = 100.0
        kv_cache.prev_embedding = torch.zeros(B, 1, 8)
        kv_cache.advance(T)
        return logits


def test_calculator_tool_per_row(tiny):
    _, tok, _ = tiny
    sp = tok.encode_special
    end = sp("<|assistant_end|>")
    rows = []
    script = {}
    for i, expr in enumerate(["12*3", "7+5", "'hello'.count('l')"]):
        prompt = [tok.get_bos_token_id()] * (3 + 2 * i) + [sp("<|assistant_start|>")]
        call = [sp("<|python_start|>")] + tok.encode(expr) + [sp("<|python_end|>")]
        result = {0: "36", 1: "12", 2: "2"}[i]
        forced = [sp("<|output_start|>")] + tok.encode(result) + [sp("<|output_end|>")]
        seq = prompt + call + forced + [end]
        for p in range(len(prompt) - 1, len(seq) - 1):  # what the model "says" after each input position
            if not (len(prompt) + len(call) <= p + 1 < len(prompt) + len(call) + len(forced)):
                script[(p, seq[p])] = seq[p + 1]
        rows.append((prompt, call, forced))
    model = _ScriptedModel(tok.get_vocab_size(), script)
    params = SamplingParams(max_tokens=50, temperature=0.0)
    sched = BatchScheduler(model, tok, max_batch_size=4, batch_invariant=False)
    outs = [[] for _ in rows]
    for i, (prompt, _, _) in enumerate(rows):
        sched.submit(prompt, params, outs[i].append)
    while sched.step():
        pass
    for (_, call, forced), out in zip(rows, outs):
        tokens = [e.token for e in out]
        assert tokens == call + forced + [end]
        assert [e.sampled for e in out] == [True] * len(call) + [False] * len(forced) + [True]
        assert out[-1].finish_reason == "stop"
    text = "".join(TextStream(tok).push(t) for t in [e.token for e in outs[0]])
    assert "`12*3` → 36" in text and "<|" not in text


# -----------------------------------------------------------------------------
# Text streaming


def test_text_stream_never_splits_characters_or_shows_specials(tiny):
    _, tok, _ = tiny
    text = "naïve 🙂 日本語 ok"
    byte_tokens = list(text.encode("utf-8"))  # ids 0..255 are the raw bytes
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in byte_tokens]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[text.encode().index("🙂".encode()) + 3] == "🙂" and deltas[7:10] == ["", "", ""]
    specials = [tok.encode_special(s) for s in tok.get_special_tokens()]
    stream = TextStream(tok)
    out = "".join(stream.push(t) for t in [tok.get_bos_token_id()] + tok.encode("hi") + specials) + stream.flush()
    assert "<|" not in out and out.startswith("hi") and "|>" not in out
    stream = TextStream(tok)  # a lead byte is held until the next token shows the character is broken
    assert stream.push(0xF0) == "" and stream.push(ord("a")) == "\ufffda"


def test_text_stream_stop_strings(tiny):
    _, tok, _ = tiny
    stream = TextStream(tok, stop=["END", "xyz"])
    out = [stream.push(t) for t in list(b"hello EN")]
    assert "".join(out) == "hello " and not stream.stopped  # "EN" is held back: it may become "END"
    assert stream.push(ord("D")) == "" and stream.stopped and stream.push(ord("z")) == ""
    stream = TextStream(tok, stop=["END"])
    assert "".join(stream.push(t) for t in list(b"ENDLESS"[:2])) + stream.push(ord("x")) == "ENx"


# -----------------------------------------------------------------------------
# Request validation (upstream's limits) and prompt rendering


GOOD = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "At least one message"),
    ({"messages": GOOD * 501}, "Too many messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_LENGTH + 1)}]}, "too long"),
    ({"messages": [{"role": "user", "content": "x" * 8000}] * 5}, "Total conversation is too long"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid role"),
    ({"messages": GOOD + [{"role": "system", "content": "hi"}]}, "only allowed first"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ({"messages": GOOD, "temperature": 2.5}, "temperature must be between 0.0 and 2.0"),
    ({"messages": GOOD, "temperature": -0.1}, "temperature"),
    ({"messages": GOOD, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": GOOD, "top_k": 201}, "top_k must be between 0 and 200"),
    ({"messages": GOOD, "top_k": 1.5}, "top_k must be an integer"),
    ({"messages": GOOD, "max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": GOOD, "max_tokens": 4097}, "max_tokens"),
    ({"messages": GOOD, "top_p": 0}, "top_p"),
    ({"messages": GOOD, "n": 17}, "n must be between 1 and 16"),
    ({"messages": GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop must be"),
    ({"messages": GOOD, "seed": -1}, "seed"),
    ({"messages": "hi"}, "messages must be a list"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_400_with_a_message(body, needle):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, openai=True, defaults=Defaults())
    assert e.value.status == 400 and needle in e.value.message


def test_request_defaults_system_folding_and_parts():
    req = parse_chat_request({"messages": GOOD}, openai=False, defaults=Defaults(0.8, 50, 512))
    assert (req.temperature, req.top_k, req.max_tokens, req.stream, req.top_p) == (0.8, 50, 512, True, 1.0)
    req = parse_chat_request({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_completion_tokens": 7, "stop": "x"}, openai=True, defaults=Defaults())
    assert req.messages == [{"role": "user", "content": "Be brief.\n\nhi"}]
    assert (req.max_tokens, req.stop, req.stream) == (7, ["x"], False)
    with pytest.raises(ApiError, match="only streams"):
        parse_chat_request({"messages": GOOD, "stream": False}, openai=False, defaults=Defaults())


def test_render_prompt_matches_upstreams_layout(tiny):
    _, tok, _ = tiny
    sp = tok.encode_special
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}]
    want = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode("hi"), sp("<|user_end|>"),
            sp("<|assistant_start|>"), *tok.encode("yo"), sp("<|assistant_end|>"), sp("<|user_start|>"),
            *tok.encode("again"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert render_prompt(tok, msgs) == want
    # The same ids as the tokenizer's SFT rendering of the conversation, minus the reply
    ids, _ = tok.render_conversation({"messages": msgs + [{"role": "assistant", "content": "z"}]})
    assert want == ids[:len(want)]


# -----------------------------------------------------------------------------
# chat_cli in-process


def test_chat_cli_one_shot_in_process(tiny, monkeypatch, capsys):
    from serve import chat_cli

    _, _, base = tiny
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    assert chat_cli.main(["-p", "hello there", "-t", "0.6", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    reply = out.split("Assistant: ", 1)[1]
    assert len(reply.strip()) > 0 and "<|" not in reply
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base + "/missing")
    assert chat_cli.main(["-p", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Deploy artefacts: serve/config.yaml and the RayService that embeds it


def test_serve_config_and_rayservice_agree_and_build():
    import importlib
    import os

    import yaml
    from ray.serve import Application

    from serve.app import ChatAppArgs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = yaml.safe_load(open(os.path.join(root, "serve", "config.yaml")))
    service = yaml.safe_load(open(os.path.join(root, "cluster", "kuberay", "rayservice-chat.yaml")))
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    for cfg in (config, embedded):
        (app,) = cfg["applications"]
        module, name = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), name)
        assert isinstance(builder(ChatAppArgs(**app["args"])), Application)
        assert app["route_prefix"] == "/" and app["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert embedded["applications"][0]["args"] == config["applications"][0]["args"]
    assert embedded["http_options"] == config["http_options"]
    with pytest.raises(ValueError, match="temperature"):
        ChatAppArgs(temperature=3)


# -----------------------------------------------------------------------------
# Front-end pieces that need no cluster: the UI's reply function and chat_web's flags


def test_ui_says_clearly_when_the_engine_is_not_ready():
    import asyncio

    from serve.protocol import ApiError, Defaults
    from serve.ui import NOT_READY, make_respond

    class Client:
        defaults = Defaults()

        def __init__(self, events=None, error=None):
            self._events, self._error = events or [], error
            self.requests = []

        async def events(self, req):
            self.requests.append(req)
            if self._error:
                raise self._error
            for ev in self._events:
                yield ev

    async def run(client, message="hi", history=()):
        return [t async for t in make_respond(client)(message, list(history), 0.5, 10, 20)]

    assert asyncio.run(run(Client(error=ApiError(503, "no replica")))) == [NOT_READY]
    ok = Client(events=[{"type": "start"}, {"type": "delta", "text": "he"}, {"type": "delta", "text": "llo"},
                        {"type": "end"}])
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]
    assert asyncio.run(run(ok, history=history)) == ["he", "hello"]  # streamed: the text grows
    req = ok.requests[0]
    assert [m["content"] for m in req.messages] == ["a", "b", "hi"] and (req.temperature, req.top_k) == (0.5, 10)
    assert "too long" in asyncio.run(run(ok, message="x" * 9000))[0]


def test_chat_web_flags_map_to_app_args():
    from serve.chat_web import app_args, parse_args

    args = parse_args(["-n", "2", "-i", "rl", "-t", "0.5", "-k", "7", "-m", "99", "-p", "9000", "--host", "127.0.0.1"])
    cfg = app_args(args, cluster_gpus=0)
    assert (cfg.num_replicas, cfg.source, cfg.temperature, cfg.top_k, cfg.max_tokens) == (2, "rl", 0.5, 7, 99)
    assert cfg.device_type == "cpu" and cfg.num_gpus_per_replica == 0 and args.port == 9000
    gpu = app_args(parse_args(["--num-gpus", "8"]), cluster_gpus=8)
    assert gpu.device_type == "cuda" and gpu.num_gpus_per_replica == 1 and gpu.num_replicas == 8
    with pytest.raises(ValueError, match="has 4 GPUs"):
        app_args(parse_args(["--num-replicas", "8", "--device-type", "cuda"]), cluster_gpus=4)


# -----------------------------------------------------------------------------
# Per-token logprobs and snapshot()


def test_logprobs_are_the_models_raw_log_softmax(tiny):
    """Each event's logprob is log_softmax of a plain (no cache) forward pass at that position, whatever the
    temperature/top-k; top_logprobs are the k best of the same distribution, most likely first."""
    model, tok, _ = tiny
    prompt = _prompts(tok, 3)[2]
    sched = BatchScheduler(model, tok, max_batch_size=4)
    params = SamplingParams(max_tokens=12, temperature=1.3, top_k=5, top_p=0.9, seed=7, logprobs=3)
    other = []  # a neighbour in the batch that did not ask for logprobs
    sched.submit(_prompts(tok, 1)[0], SamplingParams(max_tokens=12, temperature=0.7, seed=1), other.append)
    events = sched.generate(prompt, params)
    tokens = [e.token for e in events]
    with torch.inference_mode():
        logits = model.forward(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]  # (12, vocab)
    want = torch.log_softmax(logits.float(), dim=-1)
    for i, ev in enumerate(events):
        assert ev.logprob == pytest.approx(float(want[i, ev.token]), abs=1e-4)
        vals, idx = torch.topk(want[i], 3)
        assert [t for t, _ in ev.top_logprobs] == idx.tolist()
        assert [lp for _, lp in ev.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)
    assert other and all(e.logprob is None and e.top_logprobs is None for e in other)
    plain = sched.generate(prompt, dataclasses.replace(params, logprobs=None))
    assert [e.token for e in plain] == tokens  # asking for logprobs does not change the tokens
    assert all(e.logprob is None and e.top_logprobs is None for e in plain)
    zero = sched.generate(prompt, dataclasses.replace(params, logprobs=0))
    assert all(e.top_logprobs == [] and e.logprob is not None for e in zero)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_logprobs_parameter_is_validated(bad):
    with pytest.raises(ValueError, match="logprobs must be None"):
        SamplingParams(logprobs=bad)


@pytest.mark.parametrize("static", [False, True])
def test_forced_tool_tokens_get_logprobs_too(tiny, static):
    """Per-row and batched (static) sampling: forced calculator output is emitted unsampled, with its logprob."""
    _, tok, _ = tiny
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id()] * 3 + [sp("<|assistant_start|>")]
    call = [sp("<|python_start|>")] + tok.encode("2+3") + [sp("<|python_end|>")]
    forced = [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")]
    seq = prompt + call + forced + [sp("<|assistant_end|>")]
    script = {(p, seq[p]): seq[p + 1] for p in range(len(prompt) - 1, len(seq) - 1)
              if not (len(prompt) + len(call) <= p + 1 < len(prompt) + len(call) + len(forced))}
    model = _ScriptedModel(tok.get_vocab_size(), script)
    sched = BatchScheduler(model, tok, max_batch_size=2, batch_invariant=False, static=static)
    events = sched.generate(prompt, SamplingParams(max_tokens=50, temperature=0.7, logprobs=2))
    assert [e.token for e in events] == call + forced + [sp("<|assistant_end|>")]
    assert [e.sampled for e in events] == [True] * len(call) + [False] * len(forced) + [True]
    uniform = -float(torch.log(torch.tensor(float(tok.get_vocab_size()))))
    for e in events:
        assert e.logprob is not None and len(e.top_logprobs) == 2
        if e.sampled:  # the script put a logit of 100 on it: probability ~1
            assert e.logprob == pytest.approx(0.0, abs=1e-3) and e.top_logprobs[0][0] == e.token
        else:  # the model had no opinion (all-zero logits) about the forced output: uniform
            assert e.logprob == pytest.approx(uniform, abs=1e-4)


def test_snapshot_reports_load_and_kv_use(tiny):
    model, tok, _ = tiny
    sched = BatchScheduler(model, tok, max_batch_size=3, max_seq_len=100)
    prompts = _prompts(tok, 2)
    for p in prompts:
        sched.submit(p, SamplingParams(max_tokens=5, temperature=0.0))
    snap = sched.snapshot()
    assert (snap["running"], snap["waiting"], snap["max_batch_size"]) == (0, 2, 3)
    assert snap["kv_tokens_used"] == 0 and snap["kv_tokens_capacity"] == 300
    sched.step()
    snap = sched.snapshot()
    assert (snap["running"], snap["waiting"]) == (2, 0)
    assert snap["prefill_tokens"] == sum(map(len, prompts)) and snap["tokens_generated"] == 4
    assert snap["kv_tokens_used"] == sum(map(len, prompts)) + 4
    assert snap["prefix_cache_hit_tokens"] == 0
    while sched.step():
        pass
    snap = sched.snapshot()
    assert (snap["running"], snap["kv_tokens_used"], snap["tokens_generated"]) == (0, 0, 10)
