"""python -m pytest tests/test_engine.py -q

Engine, KV cache, sampling and calculator. Golden token ids come from upstream nanochat's Engine
(tests/fixtures/upstream_engine.json, made by dev/make_upstream_fixtures_engine.py, which also defines the fakes used
here: a byte tokenizer, a seeded weight filler, a bigram model and a scripted tool-calling model).
"""

import importlib.util
import json
import os

import pytest
import torch

from nanochat.engine import Engine, KVCache, sample_next_token, use_calculator
from nanochat.gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("engine_fakes", os.path.join(ROOT, "dev", "make_upstream_fixtures_engine.py"))
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)

with open(os.path.join(ROOT, "tests", "fixtures", "upstream_engine.json")) as _f:
    GOLDEN = json.load(_f)

TOK = fakes.ByteChatTokenizer()
END, BOS = TOK.encode_special("<|assistant_end|>"), TOK.get_bos_token_id()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: intra-op threads only add synchronisation (10x slower on a busy 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with torch.device("meta"):
        m = GPT(GPTConfig(**GOLDEN["gpt_config"]))
    m.to_empty(device="cpu")
    m.init_weights()
    fakes.fill_weights(m)
    m.eval()
    return m


def run(engine, prompt, kwargs):
    columns, masks = [], []
    for col, m in engine.generate(prompt, **kwargs):
        columns.append(col)
        masks.append(m)
    results, result_masks = engine.generate_batch(prompt, **kwargs)
    return columns, masks, results, result_masks


def per_row_until_stop(columns, masks):
    """Each row's streamed (token, mask) pairs up to and including its terminal token; later entries are
    implementation-defined (upstream samples garbage there, we repeat the terminal token)."""
    if not columns:
        return []
    rows = []
    for i in range(len(columns[0])):
        row = []
        for col, m in zip(columns, masks):
            row.append((col[i], m[i]))
            if col[i] in (END, BOS):
                break
        rows.append(row)
    return rows


def assert_matches_golden(case, columns, masks, results, result_masks):
    assert results == case["results"]
    assert result_masks == case["result_masks"]
    assert per_row_until_stop(columns, masks) == per_row_until_stop(case["columns"], case["masks"])


# -----------------------------------------------------------------------------
# Golden comparisons with upstream's Engine


def test_param_names_and_shapes_match_upstream(model):
    assert {n: list(p.shape) for n, p in model.named_parameters()} == GOLDEN["param_shapes"]


@pytest.mark.parametrize("name", [name for name, _ in fakes.GPT_CASES])
def test_gpt_generation_matches_upstream(model, name):
    case = GOLDEN["gpt"][name]
    out = run(Engine(model, TOK), GOLDEN["prompt"], case["kwargs"])
    assert_matches_golden(case, *out)


def test_engine_greedy_equals_naive_generate(model):
    prompt = GOLDEN["prompt"]
    results, _ = Engine(model, TOK).generate_batch(prompt, max_tokens=40, temperature=0.0)
    generated = results[0][len(prompt):]
    assert generated == GOLDEN["gpt_naive_greedy"][:len(generated)]  # upstream's GPT.generate, no cache
    short = prompt[:50]
    results, _ = Engine(model, TOK).generate_batch(short, max_tokens=10, temperature=0.0)
    generated = results[0][len(short):]
    assert generated == list(model.generate(short, max_tokens=10, temperature=0.0))[:len(generated)]


@pytest.mark.parametrize("name", [name for name, _ in fakes.BIGRAM_CASES])
def test_sampling_with_early_finishers_matches_upstream(name):
    """Rows finish at different steps; we drop them from the batch but the random stream must be unchanged."""
    case = GOLDEN["bigram"][name]
    assert len({len(r) for r in case["results"]}) > 1, "fixture should have rows finishing at different times"
    out = run(Engine(fakes.BigramModel(), TOK), GOLDEN["prompt"], case["kwargs"])
    assert_matches_golden(case, *out)


def test_calculator_tool_flow_matches_upstream():
    case = GOLDEN["tool"]["tool"]
    prompt = case["prompt"]
    scripted = fakes.ScriptedModel(len(prompt), fakes.calculator_script(TOK))
    columns, masks, results, result_masks = run(Engine(scripted, TOK), prompt, case["kwargs"])
    assert_matches_golden(case, columns, masks, results, result_masks)
    # and spelled out: the forced outputs, with mask 0, and nothing injected for the refused expression
    out_start, out_end = TOK.encode_special("<|output_start|>"), TOK.encode_special("<|output_end|>")
    gen, gen_mask = results[0][len(prompt):], result_masks[0][len(prompt):]
    forced = [t for t, m in zip(gen, gen_mask) if m == 0]
    assert forced == [out_start, *TOK.encode("36007"), out_end, out_start, *TOK.encode("3"), out_end]
    text = TOK.decode(gen)
    assert text.startswith("So 12,000*3+736007 and 'strawberry'.count('r')3 ok__import__('os')!")
    assert gen.count(out_start) == 2


# -----------------------------------------------------------------------------
# KV cache against the naive forward, and per-row positions


def test_kv_cache_decode_equals_full_forward(model):
    cfg = model.config
    ids = torch.tensor([GOLDEN["prompt"][:60]])
    full = model(ids)  # (1, 60, vocab)
    cache = KVCache(1, cfg.n_kv_head, 64, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
    with torch.inference_mode():
        pre = model(ids[:, :40], kv_cache=cache)
        steps = [model(ids[:, t:t + 1], kv_cache=cache) for t in range(40, 60)]
    torch.testing.assert_close(pre, full[:, :40], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 40:], atol=1e-4, rtol=1e-4)
    assert cache.get_pos() == 60


def _greedy_alone(model, prompt, n):
    results, _ = Engine(model, TOK).generate_batch(prompt, max_tokens=n, temperature=0.0)
    return results[0][len(prompt):]


def test_rows_at_different_positions_match_each_alone(model):
    """Continuous batching: prompts of different lengths share one cache; a finished row's slot is reused."""
    cfg = model.config
    prompts = [[BOS] + TOK.encode("Short prompt."), [BOS] + TOK.encode("A noticeably longer prompt " * 5),
               [BOS] + TOK.encode("A third request arrives later.")]
    steps = [12, 30, 14]
    alone = [_greedy_alone(model, p, n) for p, n in zip(prompts, steps)]
    kv = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer, device="cpu",
              dtype=torch.float32)
    batch = KVCache(batch_size=2, seq_len=256, **kv)
    got = {0: [], 1: [], 2: []}
    slot_owner = {}
    last = {}

    def admit(slot, req):
        single = KVCache(batch_size=1, seq_len=len(prompts[req]), **kv)
        with torch.inference_mode():
            logits = model(torch.tensor([prompts[req]]), kv_cache=single)[:, -1]
        batch.copy_row_from(slot, single)
        slot_owner[slot] = req
        last[slot] = int(logits.argmax(-1))
        got[req].append(last[slot])

    admit(0, 0)
    admit(1, 1)
    assert batch.cache_seqlens.tolist() == [len(prompts[0]), len(prompts[1])]
    with torch.inference_mode():
        while any(len(got[r]) < steps[r] for r in got):
            ids = torch.tensor([[last[0]], [last[1]]])
            logits = model(ids, kv_cache=batch)[:, -1]
            for slot in (0, 1):
                req = slot_owner[slot]
                if len(got[req]) < steps[req]:
                    last[slot] = int(logits[slot].argmax())
                    got[req].append(last[slot])
            if slot_owner[0] == 0 and len(got[0]) == steps[0]:  # request 0 done: reuse its slot for request 2
                batch.reset_rows([0])
                assert batch.cache_seqlens[0] == 0 and batch.cache_seqlens[1] > 0
                admit(0, 2)
    assert [got[r] for r in range(3)] == alone


# -----------------------------------------------------------------------------
# KVCache unit behaviour


def _cache(B=2, T=16, H=2, D=4, L=3):
    return KVCache(batch_size=B, num_heads=H, seq_len=T, head_dim=D, num_layers=L, device="cpu",
                   dtype=torch.float32)


def test_kv_cache_basics():
    c = _cache()
    assert c.k_cache.shape == c.v_cache.shape == (3, 2, 16, 2, 4)
    assert c.cache_seqlens.dtype == torch.int32 and c.get_pos() == 0
    c.advance(5)
    c.advance(2)
    assert c.get_pos() == 7 and c.cache_seqlens.tolist() == [7, 7]
    k, v = c.get_layer_cache(1)
    assert k.shape == (2, 16, 2, 4)
    k[0, 0, 0, 0] = 3.0
    assert c.k_cache[1, 0, 0, 0, 0] == 3.0  # a view, not a copy
    c.reset()
    assert c.get_pos() == 0 and c.prev_embedding is None


def test_kv_cache_prefill_replicates_batch1():
    src = _cache(B=1, T=8)
    src.k_cache[:, 0, :5] = torch.randn(3, 5, 2, 4)
    src.v_cache[:, 0, :5] = 2.0
    src.advance(5)
    src.prev_embedding = torch.randn(1, 1, 6)
    dst = _cache(B=3, T=16)
    dst.prefill(src)
    assert dst.cache_seqlens.tolist() == [5, 5, 5]
    for b in range(3):
        assert torch.equal(dst.k_cache[:, b, :5], src.k_cache[:, 0, :5])
        assert torch.equal(dst.prev_embedding[b], src.prev_embedding[0])
    assert (dst.v_cache[:, :, :5] == 2.0).all() and (dst.v_cache[:, :, 5:] == 0).all()
    with pytest.raises(AssertionError):
        dst.prefill(src)  # not empty any more
    with pytest.raises(ValueError):
        _cache(B=2, T=16, H=1).prefill(src)


def test_kv_cache_row_ops():
    a = _cache(B=3)
    a.k_cache.normal_()
    a.cache_seqlens.copy_(torch.tensor([4, 9, 6], dtype=torch.int32))
    a.prev_embedding = torch.arange(3.0).view(3, 1, 1).expand(3, 1, 5).clone()
    b = _cache(B=2)
    b.copy_row_from(1, a, src_row=1)
    assert b.cache_seqlens.tolist() == [0, 9]
    assert torch.equal(b.k_cache[:, 1, :9], a.k_cache[:, 1, :9]) and (b.k_cache[:, 0] == 0).all()
    assert b.prev_embedding[1, 0, 0] == 1.0 and b.prev_embedding[0].abs().sum() == 0
    a.reset_rows([1])
    assert a.cache_seqlens.tolist() == [4, 0, 6] and a.prev_embedding[1].abs().sum() == 0
    a.cache_seqlens[1] = 9
    row2 = a.k_cache[:, 2, :6].clone()
    a.keep_rows([0, 2])  # compaction used by the Engine when rows finish
    assert a.batch_size == 2 and a.k_cache.shape[1] == 2 and a.cache_seqlens.tolist() == [4, 6]
    assert torch.equal(a.k_cache[:, 1, :6], row2) and a.prev_embedding[:, 0, 0].tolist() == [0.0, 2.0]


# -----------------------------------------------------------------------------
# Sampling and generate() contract


class UniformModel:
    """Uniform logits: every token equally likely (upstream's MockModel idea)."""

    config = fakes._Config(sequence_len=64)

    def __init__(self, vocab_size=265):
        self.vocab_size, self.batch_sizes = vocab_size, []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        self.batch_sizes.append(ids.size(0))
        if kv_cache is not None:
            kv_cache.advance(ids.size(1))
        return torch.zeros(ids.size(0), ids.size(1), self.vocab_size)


def test_sample_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, g, temperature=0.0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next_token(logits, g, temperature=1.0, top_k=1), logits.argmax(-1, keepdim=True))
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        s = sample_next_token(logits, g, temperature=2.0, top_k=5)
        assert s.shape == (4, 1) and (s == top5).any(-1).all()
    a = sample_next_token(logits, torch.Generator().manual_seed(3), temperature=1.0)
    b = sample_next_token(logits, torch.Generator().manual_seed(3), temperature=1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_next_token(logits, g, temperature=-0.5)


def test_generate_batch_seeded_and_reproducible():
    engine = Engine(fakes.BigramModel(), TOK)
    prompt = [BOS] + TOK.encode("Hello")
    r1 = engine.generate_batch(prompt, num_samples=8, max_tokens=20, seed=123)
    r2 = engine.generate_batch(prompt, num_samples=8, max_tokens=20, seed=123)
    r3 = engine.generate_batch(prompt, num_samples=8, max_tokens=20, seed=124)
    assert r1 == r2 and r1 != r3
    assert len(r1[0]) == 8 and all(r[:len(prompt)] == prompt for r in r1[0])
    assert len({tuple(r) for r in r1[0]}) > 1  # rows sample independently


def test_first_token_sampled_per_row_and_limits():
    model = UniformModel()
    engine = Engine(model, TOK)
    prompt = [BOS] + TOK.encode("Hello")
    (first, _), = list(engine.generate(prompt, num_samples=16, max_tokens=1))
    assert len(set(first)) > 1  # not one sample broadcast to every row
    for n in (1, 4, 16):
        results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=n)
        assert len(results) == 3 and all(len(r) - len(prompt) <= n for r in results)
        assert all(len(r) == len(m) for r, m in zip(results, masks))
    assert list(engine.generate(prompt, max_tokens=0)) == []
    # max_tokens=None: stops when the model's context (sequence_len = 64) is full
    steps = list(Engine(UniformModel(vocab_size=256), TOK).generate(prompt, max_tokens=None))
    assert len(prompt) + len(steps) == 64


def test_temperature_zero_ignores_seed():
    engine = Engine(fakes.BigramModel(), TOK)
    prompt = [BOS] + TOK.encode("Hello")
    outs = {tuple(engine.generate_batch(prompt, max_tokens=10, temperature=0.0, seed=s)[0][0]) for s in (1, 2, 3)}
    assert len(outs) == 1


def test_finished_rows_leave_the_batch():
    class Recording(fakes.BigramModel):
        def forward(self, ids, kv_cache=None):
            self.sizes.append(ids.size(0))
            return super().forward(ids, kv_cache)

    model = Recording()
    model.sizes = []
    columns = list(Engine(model, TOK).generate(GOLDEN["prompt"], num_samples=6, max_tokens=40, seed=3))
    assert model.sizes[0] == 1  # batch-1 prefill
    decode = model.sizes[1:]
    assert decode[0] == 6 and decode[-1] < 6 and decode == sorted(decode, reverse=True)
    assert len(model.sizes) == len(columns)  # no forward pass after the last step


def test_bad_arguments_are_value_errors():
    engine = Engine(UniformModel(), TOK)
    for kwargs in (dict(tokens=[]), dict(tokens="hi"), dict(tokens=[1], num_samples=0),
                   dict(tokens=[1], temperature=-1.0), dict(tokens=[1], max_tokens=-2),
                   dict(tokens=[BOS] * 64, max_tokens=None)):
        with pytest.raises(ValueError):
            list(engine.generate(**kwargs))


# -----------------------------------------------------------------------------
# Calculator


@pytest.mark.parametrize("expr,expected", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("10/4", 2.5), ("7//2", 3), ("-3+ +2", -1), ("1,000,000*3", 3000000),
    ("2**10", 1024), ("2.5*4", 10.0), ("0.1+0.2", 0.1 + 0.2), ("'strawberry'.count('r')", 3),
    ("\"banana\".count('an')", 2), ("'open the door'.count('o')", 3),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch /tmp/pwned')", "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()", "exec('1')", "eval('1+1')", "x + 1", "(lambda: 1)()", "[1, 2][0]",
    "9**9**9", "2**1000000", "10**400 * 10**400 * 10**400 * 10**400", "1/0", "1e308*10", "'a' * 10", "",
    "1+", "'abc'.upper()", "'abc'.count(x)", "'abc'.count('a').__class__", "True + 1", "1 if 1 else 2",
    "'a'.count('a', start=0)", "1" * 2000, "__builtins__", "globals()",
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None
    assert not os.path.exists("/tmp/pwned")


# -----------------------------------------------------------------------------
# Decode without host syncs, and the fixed-shape (CUDA-graph) path run eagerly on CPU


def test_eager_decode_reads_one_value_per_step(model):
    """The only device->host read per decode step is the sampled tokens (the model reads lengths from the cache's
    host copy; before, RoPE and every layer's attention read them back from the device)."""
    from tests.decode_helpers import count_host_reads

    gen = Engine(model, TOK).generate(GOLDEN["prompt"], num_samples=3, max_tokens=10, temperature=0.0)
    next(gen)
    for _ in range(5):
        with count_host_reads() as reads:
            next(gen)  # one forward pass + sampling
        assert reads["n"] == 1


@pytest.mark.parametrize("name", [name for name, _ in fakes.GPT_CASES])
def test_static_decode_matches_upstream(model, name):
    """Engine(static=True) on CPU runs exactly what CUDA graphs replay (static KV cache of sequence_len positions,
    row/key buckets, masked attention); its tokens equal upstream's for the same seeds."""
    case = GOLDEN["gpt"][name]
    engine = Engine(model, TOK, static=True)
    assert_matches_golden(case, *run(engine, GOLDEN["prompt"], case["kwargs"]))
    assert engine._decoder.rows >= case["kwargs"]["num_samples"] and engine._decoder.capacity == 256  # 1 block
    decoder = engine._decoder  # reused by the next call (graphs are captured once per Engine)
    engine.generate_batch(GOLDEN["prompt"], num_samples=1, max_tokens=3)
    assert engine._decoder is decoder


def test_static_decode_steps_read_one_value(model):
    from tests.decode_helpers import count_host_reads

    gen = Engine(model, TOK, static=True).generate(GOLDEN["prompt"], num_samples=4, max_tokens=10, temperature=0.0)
    next(gen)
    for _ in range(5):
        with count_host_reads() as reads:
            next(gen)
        assert reads["n"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_static_decode():
    """On a GPU: the replayed graphs give the tokens of the same fixed-shape step run eagerly (same kernels), and
    a second call reuses the captured graphs."""
    from tests.decode_helpers import random_model

    model = random_model(sequence_len=512).cuda()
    prompt = [BOS] + TOK.encode("The graphs should agree with eager mode")
    kwargs = dict(num_samples=4, max_tokens=48, temperature=0.9, top_k=20, seed=5)
    graphed = Engine(model, TOK, static=True)
    eager = Engine(model, TOK, static=True)
    eager._static_decoder(4, 100)  # build it, then turn its graphs off: same fixed-shape code, launched eagerly
    eager._decoder.use_graphs = False
    a, b = graphed.generate_batch(prompt, **kwargs), eager.generate_batch(prompt, **kwargs)
    assert a == b and graphed._decoder.graph_failures == 0 and graphed._decoder._graphs
    captured = dict(graphed._decoder._graphs)
    assert graphed.generate_batch(prompt, **kwargs) == a and graphed._decoder._graphs.keys() == captured.keys()
