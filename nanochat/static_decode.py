"""
Fixed-shape decode steps, replayed as CUDA graphs: one graph launch per generated token instead of ~1,000 kernels.

    dec = StaticDecoder(model, rows=32, capacity=2048, post=my_sampler)   # post(logits (b, V), b) -> tensor
    dec.tokens[:m, 0] = ...; dec.cache.cache_seqlens[:m] = ...          # inputs live in fixed device buffers
    out = dec.step(m, max_len)                                           # post's output for rows [0, bucket(m))

A decode step at small batch is bound by kernel launches and host syncs, not by the GPU: a d12 step reads ~0.2 GB
of weights (< 0.1 ms on an H200) but launches about a thousand kernels. So the step runs with fixed shapes
(protocol item 6 in nanochat/flash_attention.py): a fixed-capacity KV cache, the batch padded up to a row bucket
(powers of two up to `rows`), attention over a key bucket (lengths rounded up to `key_block`), positions read on
the device only. Each (row bucket, key bucket) is captured once as a torch.cuda.CUDAGraph on first use and replayed
after that; all graphs share one memory pool. `post` (e.g. batched sampling) runs inside the graph too, so a step
is: copy the inputs in, one replay, copy one result tensor out.

Contract for the owner: rows >= m that are not in use are idle rows. Their k/v writes land at their current
length (clamped into the key bucket) and their smear state is overwritten: an idle row's cache row must be
(re)written before it is used. Lengths are the owner's business: step() does not advance cache_seqlens.
On CPU (or with use_graphs=False) the same fixed-shape code runs eagerly; tests use that to check the logic.
What is bit-stable on a GPU: a replay computes exactly what the captured eager step computes; what is not: a
row's logits may change with the row bucket (cuBLAS picks kernels by shape), as in any batched GPU inference.
"""

import logging

import torch

from nanochat.common import COMPUTE_DTYPE

logger = logging.getLogger(__name__)


class _StaticView:
    """Rows [0, b) and keys [0, L) of the decoder's cache, with the protocol's static flag (no host reads)."""

    static = True

    def __init__(self, cache, b, L):
        self.k_cache, self.v_cache = cache.k_cache[:, :b, :L], cache.v_cache[:, :b, :L]
        self.cache_seqlens = cache.cache_seqlens[:b]
        self.prev_embedding = cache.prev_embedding[:b]

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        pass  # the owner keeps the lengths (a graph must not bake in a host-side count)


def row_buckets(rows):
    """Batch sizes a step is padded to: 1, 2, 4, ... and rows itself."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


class StaticDecoder:
    def __init__(self, model, rows, capacity, post=None, use_graphs=None, key_block=256):
        from nanochat.engine import KVCache  # engine imports this module

        cfg = model.config
        self.model = model
        self.device = model.get_device()
        self.rows, self.capacity, self.key_block = rows, capacity, key_block
        self.post = post
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model; use use_graphs=False on CPU")
        self.cache = KVCache(batch_size=rows, num_heads=cfg.n_kv_head, seq_len=capacity,
                             head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer, device=self.device,
                             dtype=COMPUTE_DTYPE)
        self.cache.prev_embedding = torch.zeros(rows, 1, cfg.n_embd, device=self.device, dtype=COMPUTE_DTYPE)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # input token per row
        self.buckets = row_buckets(rows)
        self._graphs = {}  # (row bucket, key bucket) -> (graph, output)
        self._pool = None
        self.graph_failures = 0

    def bucket(self, m):
        return next(b for b in self.buckets if b >= m)

    def key_bucket(self, n):
        return min(self.capacity, -(-n // self.key_block) * self.key_block)

    def step(self, m, max_len):
        """Decode rows [0, m) (padded to a row bucket); max_len = the longest active row's length before the step.
        Returns post's output (or the (b, vocab) logits); it is overwritten by the next step."""
        if not 1 <= m <= self.rows:
            raise ValueError(f"step over {m} rows; this decoder has {self.rows}")
        if max_len + 1 > self.capacity:
            raise ValueError(f"a row at length {max_len} does not fit the static cache ({self.capacity} tokens)")
        key = (self.bucket(m), self.key_bucket(max_len + 1))
        if not self.use_graphs:
            return self._run(*key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(*key)
        if entry is False:  # capture failed once for this shape: run it eagerly (same math, more launches)
            return self._run(*key)
        graph, out = entry
        graph.replay()
        return out

    def _run(self, b, L):
        view = _StaticView(self.cache, b, L)
        logits = self.model.forward(self.tokens[:b], kv_cache=view)[:, -1, :]  # (b, vocab)
        self.cache.prev_embedding[:b].copy_(view.prev_embedding)
        return logits if self.post is None else self.post(logits, b)

    def _capture(self, b, L):
        # Warm up on a side stream (lazy cuBLAS/allocator init must not happen during capture). Warm-up runs write
        # the same k/v a real step writes (idempotent) but advance the smear state, so that is saved and restored.
        saved = self.cache.prev_embedding.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(b, L)
            torch.cuda.current_stream().wait_stream(stream)
            self.cache.prev_embedding.copy_(saved)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._run(b, L)
            entry = (graph, out)
        except Exception:  # e.g. an attention kernel that cannot be captured: keep serving, eagerly
            logger.exception(f"CUDA graph capture failed for rows={b} keys={L}; running that shape eagerly")
            self.graph_failures += 1
            entry = False
        self.cache.prev_embedding.copy_(saved)
        self._graphs[(b, L)] = entry
        return entry
