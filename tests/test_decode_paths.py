"""python -m pytest tests/test_decode_paths.py -q

The model's KV-cache hooks for fast serving (protocol items 5 and 6 in nanochat/flash_attention.py), on CPU:
- a prompt prefilled in chunks gives the logits of a one-shot prefill (the chunk's first token smears with the
  previous chunk's last token);
- a cache with a host copy of its lengths (`host_seqlens`) gives bit-identical logits with no device->host reads;
- the static-shape forward (`static=True`: fixed key bucket, idle rows, positions only on the device, no host
  reads, as captured in a CUDA graph) gives the eager forward's logits.
"""

import pytest
import torch

from tests.decode_helpers import count_host_reads, random_model


class Cache:
    """Protocol cache with an optional host copy of the lengths (item 5)."""

    def __init__(self, model, rows, capacity, host=True):
        c = model.config
        self.k_cache = torch.zeros(c.n_layer, rows, capacity, c.n_kv_head, c.head_dim)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cache_seqlens = torch.zeros(rows, dtype=torch.int32)
        self.host_seqlens = [0] * rows if host else None
        self.prev_embedding = None

    def get_layer_cache(self, i):
        return self.k_cache[i], self.v_cache[i]

    def advance(self, n):
        self.cache_seqlens += n
        if self.host_seqlens is not None:
            self.host_seqlens = [x + n for x in self.host_seqlens]


class StaticView:
    """Rows [0, m) and keys [0, L) of a Cache, static (item 6); the owner keeps the lengths."""
    static = True

    def __init__(self, cache, m, L):
        self.k_cache, self.v_cache = cache.k_cache[:, :m, :L], cache.v_cache[:, :m, :L]
        self.cache_seqlens = cache.cache_seqlens[:m]
        self.prev_embedding = cache.prev_embedding[:m]

    def get_layer_cache(self, i):
        return self.k_cache[i], self.v_cache[i]

    def advance(self, n):
        pass


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def test_chunked_prefill_equals_one_shot():
    model = random_model(sequence_len=256)  # S layers see 128 keys: the 180-token prompt crosses the window
    ids = torch.randint(0, 300, (1, 180), generator=torch.Generator().manual_seed(1))
    one = Cache(model, 1, 190)
    ref = model(ids, kv_cache=one)  # (1, 180, V)
    chunked = Cache(model, 1, 190)
    outs = [model(ids[:, s:s + 48], kv_cache=chunked) for s in range(0, 180, 48)]
    assert rel_err(torch.cat(outs, dim=1), ref) < 1e-5
    nxt = torch.tensor([[5]])
    assert rel_err(model(nxt, kv_cache=chunked), model(nxt, kv_cache=one)) < 1e-5


@torch.inference_mode()
def test_host_seqlens_give_identical_logits_without_host_reads():
    model = random_model()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(2))
    with_host, without = Cache(model, 3, 40, host=True), Cache(model, 3, 40, host=False)
    for cache in (with_host, without):
        model(ids[:, :12], kv_cache=cache)
    for t in range(12, 20):
        with count_host_reads() as reads:
            a = model(ids[:, t:t + 1], kv_cache=with_host)
        assert reads["n"] == 0
        with count_host_reads() as reads:
            b = model(ids[:, t:t + 1], kv_cache=without)
        assert reads["n"] > model.config.n_layer  # the fallback reads the lengths back in every layer
        assert torch.equal(a, b)


@pytest.mark.parametrize("pattern, lengths, bucket", [("L", (30, 7, 50), 64), ("SSSL", (150, 7, 140), 160)])
@torch.inference_mode()
def test_static_forward_matches_eager_and_reads_nothing(pattern, lengths, bucket):
    """Rows at different positions in a fixed key bucket, plus an idle row, decoded with fixed shapes (SSSL: the
    128-token windows of the S layers cut into the longer rows)."""
    model = random_model(pattern, sequence_len=256)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (1, n), generator=g) for n in lengths]
    static, alone = Cache(model, 4, 200), []
    static.prev_embedding = torch.zeros(4, 1, model.config.n_embd)
    for row, p in enumerate(prompts):
        single = Cache(model, 1, 200)
        model(p, kv_cache=single)
        alone.append(single)
        n = p.size(1)
        static.k_cache[:, row, :n], static.v_cache[:, row, :n] = single.k_cache[:, 0, :n], single.v_cache[:, 0, :n]
        static.cache_seqlens[row] = n
        static.prev_embedding[row] = single.prev_embedding[0]
    static.cache_seqlens[3] = 199  # an idle row past the key bucket: its writes are clamped into the view
    for step in range(8):
        tokens = torch.randint(0, 300, (4, 1), generator=g)
        view = StaticView(static, 4, bucket)  # key bucket >= every active row's length + 1
        with count_host_reads() as reads:
            logits = model(tokens, kv_cache=view)
        assert reads["n"] == 0
        static.prev_embedding = view.prev_embedding
        for row in range(3):
            want = model(tokens[row:row + 1], kv_cache=alone[row])
            assert rel_err(logits[row], want[0]) < 1e-5, (step, row)
            static.cache_seqlens[row] += 1  # the owner advances the active rows
