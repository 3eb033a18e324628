"""
KV-cache helpers of the batch scheduler (serve/batching.py): a view of a range of a cache's rows that the model can
run on, and the row-by-row decode attention of batch-invariant mode (each real row attends alone, exactly as when
it is the only request; see batching.py's docstring for why).
"""

import threading

import torch

from nanochat import flash_attention
from nanochat.engine import KVCache


class Rows:
    """Rows [a, b) of a KVCache as a protocol cache object (nanochat/flash_attention.py). Lengths and smear state
    are views or copies that sync() writes back to the parent."""

    def __init__(self, cache: KVCache, a: int, b: int):
        self.parent, self.a, self.b = cache, a, b
        self.k_cache, self.v_cache = cache.k_cache[:, a:b], cache.v_cache[:, a:b]
        self.cache_seqlens = cache.cache_seqlens[a:b]  # a view: advance() updates the parent's lengths in place
        self.host_seqlens = None if cache.host_seqlens is None else cache.host_seqlens[a:b]
        self.prev_embedding = cache.prev_embedding[a:b]

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        if self.host_seqlens is not None:
            self.host_seqlens = [n + num_tokens for n in self.host_seqlens]

    def sync(self):
        self.parent.prev_embedding[self.a:self.b] = self.prev_embedding
        if self.host_seqlens is not None:
            self.parent.host_seqlens[self.a:self.b] = self.host_seqlens


# Row-by-row decode attention (batch-invariant mode). A dispatcher replaces flash_attn.flash_attn_with_kvcache once;
# it defers to the original unless THIS thread is inside a batch-invariant decode step (tls.rows is set).
tls = threading.local()
_original_attn = None
_install_lock = threading.Lock()


def rowwise_dispatch(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False, window_size=(-1, -1),
                      **kw):
    rows = getattr(tls, "rows", None)
    if rows is None:
        return _original_attn(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=causal,
                              window_size=window_size, **kw)
    out = torch.zeros_like(q)  # (B, T, H, D); dummy rows keep zeros, their outputs are never used
    for b in rows:
        one = slice(b, b + 1)
        out[one] = _original_attn(q[one], k_cache[one], v_cache[one], k=None if k is None else k[one],
                                  v=None if v is None else v[one], cache_seqlens=cache_seqlens[one], causal=causal,
                                  window_size=window_size)
    return out


def install_rowwise_attention():
    global _original_attn
    with _install_lock:
        if _original_attn is None:
            _original_attn = flash_attention.flash_attn.flash_attn_with_kvcache
            flash_attention.flash_attn.flash_attn_with_kvcache = rowwise_dispatch
