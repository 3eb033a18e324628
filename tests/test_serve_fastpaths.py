"""python -m pytest tests/test_serve_fastpaths.py -q

serve.batching's serving fast paths, in-process on CPU (the GPU-only part, CUDA graph capture, has `gpu` tests):
- prefix reuse: a conversation's next turn (and a shared system prompt) restores cached blocks instead of prefilling
  them, and gets bit-identical tokens and logprobs to a fresh prefill (batch-invariant mode); the cache is bounded;
- chunked prefill: a long prompt is prefilled over several steps while running requests get a token every step;
- batched prefill: requests that arrive together share prefill forwards;
- static decode (the CUDA-graph path run eagerly): batch buckets, batched device sampling with per-row seeds and one
  host read per step, the same greedy tokens as the per-row path (forced tool tokens: tests/test_serve_batching.py);
- a burst of 64 concurrent requests: every stream completes, and one more than the queue holds is refused.
"""

import threading

import pytest
import torch

from serve.batching import BatchScheduler, QueueFull, SamplingParams
from serve.prefix_cache import PrefixCache
from serve.sampling import MAX_LOGPROBS, sample_batch, uniform_noise
from tests.decode_helpers import count_host_reads, tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    model, tok, base = tiny_chat_model(str(tmp_path_factory.mktemp("tinychat")), sequence_len=512)
    with torch.no_grad():  # a fresh checkpoint has the smear switched off (lambda 0): turn it on, restores must carry it
        model.smear_lambda.fill_(0.8)
        model.smear_gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    return model, tok, base


def _events(events):
    return [(e.token, e.sampled, e.finish_reason, e.logprob, e.top_logprobs) for e in events]


def _conversation(model, tok, turns=3, reply_tokens=20):
    """Prompts of a growing chat (each turn = the previous prompt + its reply + a new user message), generated
    through a scheduler: [(prompt, params)] per turn."""
    sp = tok.encode_special
    user = lambda text: [sp("<|user_start|>")] + tok.encode(text) + [sp("<|user_end|>"), sp("<|assistant_start|>")]
    prompt = [tok.get_bos_token_id()] + user("You are a careful assistant. " * 3 + "hello, how are you today?")
    sched = BatchScheduler(model, tok, prefix_cache_tokens=0)
    out = []
    for t in range(turns):
        params = SamplingParams(max_tokens=reply_tokens, temperature=0.8, top_k=40, seed=t, logprobs=2)
        out.append((list(prompt), params))
        reply = [e.token for e in sched.generate(prompt, params) if e.finish_reason != "stop"]
        prompt = prompt + reply + [sp("<|assistant_end|>")] + user(f"tell me more about point {t}, please.")
    return out


@pytest.fixture(scope="module")
def chat(tiny):
    model, tok, _ = tiny
    return model, tok, _conversation(model, tok)


# -----------------------------------------------------------------------------
# Prefix reuse


def test_next_turn_reuses_the_history_and_gets_identical_tokens(chat):
    model, tok, turns = chat
    fresh = [_events(BatchScheduler(model, tok, prefix_cache_tokens=0, prefix_block=16).generate(p, sp))
             for p, sp in turns]
    sched = BatchScheduler(model, tok, prefix_block=16)
    prefilled = []
    for (prompt, params), want in zip(turns, fresh):
        before = sched.snapshot()
        got = _events(sched.generate(prompt, params))
        assert got == want  # tokens, tool masks, finish reasons and logprobs, bit for bit
        after = sched.snapshot()
        prefilled.append(after["prefill_tokens"] - before["prefill_tokens"])
        hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
        assert hit + prefilled[-1] == len(prompt)
    # Turn 2 and 3 restore every whole block of the previous turn's prompt; only the reply and the new message (and
    # the partial block before them) are computed.
    for t in (1, 2):
        prev = len(turns[t - 1][0])
        assert prefilled[t] <= len(turns[t][0]) - prev + 16 < len(turns[t][0])
    assert sched.snapshot()["prefix_cache_blocks"] > 0


def test_shared_system_prompt_is_prefilled_once(chat):
    model, tok, turns = chat
    system = turns[0][0][:-4]  # same start, different endings
    prompts = [system + tok.encode(f" question {i}?") for i in range(3)]
    sched = BatchScheduler(model, tok, prefix_block=8)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for p in prompts:
        sched.generate(p, params)
    snap = sched.snapshot()
    assert snap["prefix_cache_hit_tokens"] == 2 * (len(system) // 8) * 8
    assert snap["prefill_tokens"] == sum(map(len, prompts)) - snap["prefix_cache_hit_tokens"]


def test_prefix_cache_is_bounded_and_evicts_least_recently_used(chat):
    model, _, _ = chat
    from nanochat.engine import KVCache

    c = model.config
    like = KVCache(1, c.n_kv_head, 64, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)
    like.k_cache.normal_()
    pc = PrefixCache(num_blocks=4, block_size=4, like=like)
    a, b = list(range(100, 112)), list(range(200, 208))  # 3 blocks, 2 blocks
    assert pc.insert(a, like, 0) == 3 and pc.lookup(a) != [] and len(pc.lookup(a)) == 3
    assert pc.insert(b, like, 0) == 2 and len(pc) == 4 and pc.evictions == 1  # a's last block (LRU leaf) went
    assert len(pc.lookup(a)) == 2 and len(pc.lookup(b)) == 2
    assert pc.lookup(a[:4] + [1, 2, 3, 4]) == pc.lookup(a)[:1]  # exact match per block, chained from position 0
    restored = KVCache(1, c.n_kv_head, 64, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)
    pc.restore(pc.lookup(b), restored, 0)
    assert torch.equal(restored.k_cache[:, 0, :8], like.k_cache[:, 0, :8])
    with pytest.raises(ValueError, match="num_blocks"):
        PrefixCache(0, 4, like)


# -----------------------------------------------------------------------------
# Chunked and batched prefill


def test_long_prompt_prefills_in_chunks_while_others_decode(chat):
    model, tok, turns = chat
    long_prompt, params = turns[2]
    short = turns[0][0][:20]
    alone = _events(BatchScheduler(model, tok, prefix_cache_tokens=0, prefix_block=16).generate(long_prompt, params))
    sched = BatchScheduler(model, tok, prefill_chunk=32, prefix_block=16, prefix_cache_tokens=0)
    a_events, b_events = [], []
    sched.submit(short, SamplingParams(max_tokens=200, temperature=0.0), a_events.append)
    sched.step()
    sched.submit(long_prompt, params, b_events.append)
    steps_to_first = 0
    while not b_events:
        n = len(a_events)
        sched.step()
        steps_to_first += 1
        assert len(a_events) == n + 1  # the running request gets its token in every step
    assert steps_to_first == -(-len(long_prompt) // 32)  # 32 prompt tokens per step
    while sched.step():
        pass
    assert _events(b_events) == alone  # chunking does not change the tokens (batch-invariant mode)


def test_requests_arriving_together_share_prefill_forwards(chat):
    model, tok, turns = chat
    prompts = [turns[0][0][:30 + 7 * i] for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)
    sched = BatchScheduler(model, tok, batch_invariant=False, prefix_cache_tokens=0)
    outs = [[] for _ in prompts]
    for p, out in zip(prompts, outs):
        sched.submit(p, params, out.append)
    sched.step()
    assert sched.stats["prefill_forwards"] == 1 and all(len(o) == 2 for o in outs)  # padded into one forward
    while sched.step():
        pass
    for p, out in zip(prompts, outs):
        alone = BatchScheduler(model, tok, batch_invariant=False, prefix_cache_tokens=0).generate(p, params)
        assert [e.token for e in out] == [e.token for e in alone]
        assert [e.logprob for e in out] == pytest.approx([e.logprob for e in alone], abs=1e-4)


def test_a_chunk_whose_padding_would_overflow_the_cache_runs_alone(chat):
    model, tok, turns = chat
    a, b = turns[2][0][:95], turns[1][0][:50]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    sched = BatchScheduler(model, tok, batch_invariant=False, max_seq_len=100, prefill_chunk=90, prefix_cache_tokens=0)
    outs = [[], []]
    sched.submit(a, params, outs[0].append)
    sched.submit(b, params, outs[1].append)
    sched.step()  # a: [0, 90); b waits for budget
    assert sched.stats["prefill_forwards"] == 1 and outs == [[], []]
    sched.step()  # a: [90, 95) padded to b's 50 would end at 140 > 100: a alone, then b [0, 50)
    assert sched.stats["prefill_forwards"] == 3 and len(outs[0]) == len(outs[1]) == 2
    while sched.step():
        pass
    for p, out in zip((a, b), outs):
        alone = BatchScheduler(model, tok, batch_invariant=False, max_seq_len=100).generate(p, params)
        assert [e.token for e in out] == [e.token for e in alone]


# -----------------------------------------------------------------------------
# Static decode (the CUDA-graph path, eagerly) and batched sampling


def test_static_decode_buckets_and_one_host_read_per_step(chat, monkeypatch):
    model, tok, turns = chat
    sched = BatchScheduler(model, tok, max_batch_size=8, static=True)
    assert not sched.batch_invariant and sched.decoder.buckets == [1, 2, 4, 8]
    sizes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, **kw: sizes.append(tuple(idx.shape)) or real_forward(idx, **kw))
    for i in range(3):
        sched.submit(turns[0][0][:25 + i], SamplingParams(max_tokens=30, temperature=0.9, top_p=0.8, seed=i))
    sched.step()  # admission, prefill, first decode
    for _ in range(5):
        sizes.clear()
        with count_host_reads() as reads:
            sched.step()
        assert reads["n"] == 1  # the packed result of all rows
        assert sizes == [(4, 1)]  # 3 rows padded to the 4-row bucket
    with pytest.raises(ValueError, match="batch_invariant=False"):
        BatchScheduler(model, tok, static=True, batch_invariant=True)


def test_static_decode_matches_per_row_decode_greedy(chat):
    model, tok, turns = chat
    prompts = [turns[i % 3][0][:40 + 9 * i] for i in range(5)]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=3)
    dynamic = [BatchScheduler(model, tok).generate(p, params) for p in prompts]
    sched = BatchScheduler(model, tok, static=True, max_batch_size=4)
    outs = [[] for _ in prompts]
    for p, out in zip(prompts, outs):
        sched.submit(p, params, out.append)
    while sched.step():
        pass
    for out, want in zip(outs, dynamic):
        assert [e.token for e in out] == [e.token for e in want]
        assert [e.logprob for e in out] == pytest.approx([e.logprob for e in want], abs=1e-4)
        assert [t for t, _ in out[3].top_logprobs] == [t for t, _ in want[3].top_logprobs]


def test_static_sampling_is_batch_invariant_and_seeded(chat):
    """Sampled (not greedy) tokens on the static path do not depend on the other rows or when a request joined."""
    model, tok, turns = chat
    prompts = [turns[0][0][:30 + 5 * i] for i in range(4)]
    params = [SamplingParams(max_tokens=12, temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in [(1.0, None, 1.0, 1), (0.7, 20, 1.0, 2), (1.2, 0, 0.9, 3), (0.9, 50, 0.95, 1)]]
    alone = [[e.token for e in BatchScheduler(model, tok, static=True).generate(p, sp)]
             for p, sp in zip(prompts, params)]
    sched = BatchScheduler(model, tok, static=True, max_batch_size=4)
    outs = [[] for _ in prompts]
    for step in range(40):
        if step < 4:
            sched.submit(prompts[step], params[step], outs[step].append)
        if not sched.step() and step >= 4:
            break
    assert [[e.token for e in o] for o in outs] == alone
    assert alone[0] != [e.token for e in BatchScheduler(model, tok, static=True).generate(
        prompts[0], SamplingParams(max_tokens=12, temperature=1.0, seed=99))]


def test_batched_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    V, n = 12, 20000
    logits = torch.randn(V) * 2
    rows = logits.expand(n, V).contiguous()
    ones = torch.ones(n)
    ints = lambda v: torch.full((n,), v, dtype=torch.long)
    token_hash = __import__("serve.sampling", fromlist=["_hash32"])._hash32(torch.arange(V))
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 4, 1.0), (1.3, 0, 0.7)]:
        out = sample_batch(rows, ones * temperature, ints(top_k), ones * top_p, ints(7), ints(0),
                           torch.arange(n), ints(-1), token_hash)
        freq = torch.bincount(out[:, 0].long(), minlength=V).double() / n
        probs = torch.softmax(logits / temperature, -1).double()
        order = probs.argsort(descending=True)
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[:top_k or V]] = True
        p_sorted = probs[order] * keep[order]
        p_sorted = p_sorted / p_sorted.sum()
        nucleus = (p_sorted.cumsum(0) - p_sorted) < top_p
        want = torch.zeros(V, dtype=torch.double)
        want[order[nucleus]] = p_sorted[nucleus]
        want /= want.sum()
        assert (freq - want).abs().max() < 0.015, (temperature, top_k, top_p)
        assert out[:, 1].tolist() == pytest.approx(torch.log_softmax(logits, -1)[out[:, 0].long()].tolist(), abs=1e-6)
    u = uniform_noise(torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([5, 6]), token_hash)
    assert 0 < u.min() and u.max() < 1 and not torch.equal(u[0], u[1])
    assert MAX_LOGPROBS == 20


# -----------------------------------------------------------------------------
# A burst of concurrent requests


@pytest.mark.parametrize("static", [False, True])
def test_burst_of_64_concurrent_requests(chat, static):
    model, tok, turns = chat
    sched = BatchScheduler(model, tok, max_batch_size=16, max_waiting=64, static=static).start()
    results, errors = [None] * 64, []
    start = threading.Barrier(64)

    def client(i):
        try:
            start.wait()
            results[i] = sched.generate(turns[i % 3][0][:20 + i % 17],
                                        SamplingParams(max_tokens=8, temperature=0.8, seed=i))
        except Exception as e:  # noqa: BLE001 - any error fails the test below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    try:
        assert errors == [] and all(r is not None for r in results)
        assert all(len(r) == 8 and r[-1].finish_reason == "length" for r in results)  # no dropped stream
        assert sched.stats["requests_finished"] == 64 and sched.is_alive()
    finally:
        sched.stop()
    # Saturated: 16 rows busy + 64 waiting, the next one is refused (the HTTP layer answers 503 + Retry-After).
    full = BatchScheduler(model, tok, max_batch_size=16, max_waiting=64)
    for _ in range(80):
        full.submit(turns[0][0][:20], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        full.submit(turns[0][0][:20], SamplingParams(max_tokens=2))


# -----------------------------------------------------------------------------
# On a GPU: CUDA graphs


def _cuda_model(model):
    import copy

    return copy.deepcopy(model).cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_scheduler_equals_the_same_steps_run_eagerly(chat):
    """Replayed graphs give exactly the events of the same fixed-shape steps launched eagerly, for concurrent
    requests with mixed sampling settings, logprobs and different lengths (row buckets change as they come and go)."""
    model, tok, turns = chat
    gpu_model = _cuda_model(model)
    prompts = [turns[i % 3][0][:30 + 11 * i] for i in range(6)]
    params = [SamplingParams(max_tokens=40 + 7 * i, temperature=[0.0, 0.8, 1.2][i % 3], top_k=[None, 20][i % 2],
                             top_p=[1.0, 0.9][i % 2], seed=i, logprobs=2) for i in range(6)]
    runs = []
    for graphs in (True, False):
        sched = BatchScheduler(gpu_model, tok, max_batch_size=8, max_seq_len=512)
        assert sched.static and sched.decoder.use_graphs
        sched.decoder.use_graphs = graphs
        outs = [[] for _ in prompts]
        for step in range(400):
            if step < len(prompts):
                sched.submit(prompts[step], params[step], outs[step].append)
            if not sched.step() and step >= len(prompts):
                break
        runs.append([_events(o) for o in outs])
        if graphs:
            assert sched.decoder.graph_failures == 0 and len(sched.decoder._graphs) >= 3
    assert runs[0] == runs[1]
    assert all(len(o) == p.max_tokens for o, p in zip(runs[0], params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_burst_and_prefix_reuse(chat):
    model, tok, turns = chat
    sched = BatchScheduler(_cuda_model(model), tok, max_batch_size=32, max_waiting=64, max_seq_len=512).start()
    try:
        recs = [[] for _ in range(64)]
        done = threading.Semaphore(0)
        for i in range(64):
            sched.submit(turns[i % 3][0], SamplingParams(max_tokens=16, temperature=0.8, seed=i),
                         lambda ev, i=i: (recs[i].append(ev), ev.finish_reason and done.release()))
        for _ in range(64):
            assert done.acquire(timeout=120)
        assert all(len(r) == 16 and r[-1].finish_reason == "length" for r in recs)
        snap = sched.snapshot()
        assert snap["cuda_graphs"] and snap["prefix_cache_hit_tokens"] > 0  # the three prompts repeat
    finally:
        sched.stop()
