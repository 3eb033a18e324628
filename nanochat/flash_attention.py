"""
Attention backend with Flash Attention 3's call signatures: PyTorch SDPA everywhere, FA3 as an optional fast path.

    from nanochat.flash_attention import flash_attn
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))            # training, no cache
    y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,              # inference
                                           cache_seqlens=lens, causal=True, window_size=(w, 0))

Layout is FA3's (B, T, H, D) for q/k/v and (B, T_max, H_kv, D) for one layer's cache. `window_size=(left, right)`
follows FA3: query i sees keys j with i - left <= j <= i + right, -1 meaning unlimited. Only causal attention is used
by the model, so `right` must be 0 or -1. GQA (H a multiple of H_kv) is supported.

FA3 is used with bf16 tensors on sm80/86/89/90 GPUs when its kernel loads (nanochat/fa3.py: the `kernels` package
and the HF cache or Hub, or a locally installed `flash_attn_interface`). Entry points call `describe_backend()` at
start (before torch.compile) and print its line; otherwise the lookup happens on the first CUDA call. Any failure
falls back to SDPA. On CPU (and everywhere else) SDPA does the work; sliding windows become explicit masks.

KV-cache call protocol (what gpt.py does and what nanochat.engine.KVCache provides), one forward with T new tokens:
  1. gpt.py reads `kv_cache.cache_seqlens` (int32, shape (B,)): row b's new tokens sit at positions
     cache_seqlens[b] + 0..T-1 (RoPE is applied at those per-row offsets). Rows may differ (continuous batching).
  2. Smear state: gpt.py reads `kv_cache.prev_embedding` ((B, 1, C) or None) and stores the new last-position
     embedding there. Rows whose length is 0 get no smear.
  3. For each layer i: `k_cache, v_cache = kv_cache.get_layer_cache(i)` (views, (B, T_max, H_kv, D)), then
     `flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens, ...)` writes the
     new k/v in place at each row's positions and attends over that row's prefix; it never changes cache_seqlens.
  4. After the last layer gpt.py calls `kv_cache.advance(T)` once (every row's length += T).
So the cache object needs: cache_seqlens, prev_embedding, get_layer_cache(i), advance(n). k_cache/v_cache must be in
the dtype of k/v (the compute dtype). Two optional attributes make a forward free of device->host syncs:
  5. `kv_cache.host_seqlens`: a Python list mirroring cache_seqlens, kept up to date by the cache's owner. When it is
     present (not None), gpt.py and the attention take lengths from it instead of reading the device tensor back
     (otherwise: one sync per forward for RoPE and one per layer in the SDPA path). Same numerics.
  6. `kv_cache.static = True`: a forward with fixed shapes and no host reads at all, so it can be captured in a CUDA
     graph. RoPE and smear use per-row positions on the device; attention covers the WHOLE k_cache view that
     get_layer_cache returns (the owner slices it to a fixed key bucket), masked per row by cache_seqlens; the new
     k/v are scattered at each row's position (clamped into the view, so idle rows stay in bounds).
"""

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# Tests set this to 'sdpa' or 'fa3' to force a backend; None = automatic.
_override_impl = None


_fa3_lookup = None  # None: not looked up yet; False: unavailable; else the FA3 interface module
_fa3_reason = ""  # why FA3 is (not) used, one line


def _load_flash_attention_3():
    """The FA3 interface module, or None. Looked up once (nanochat/fa3.py: cache first, bounded network); never
    raises. Entry points call describe_backend() before torch.compile, so compiled code only reads the result
    (a plain module global: a constant to dynamo, no lookup inside tracing)."""
    global _fa3_lookup, _fa3_reason
    if _fa3_lookup is None:
        from nanochat import fa3

        module, _fa3_reason = fa3.lookup()
        _fa3_lookup = module or False
    return _fa3_lookup or None


def describe_backend() -> str:
    """Look FA3 up now (before torch.compile) and return the one start-up line: which attention runs and why."""
    module = _load_flash_attention_3()
    if _override_impl is not None:
        return f"Attention: {_override_impl.upper()} (forced by flash_attention._override_impl)"
    if module is not None:
        return f"Attention: Flash Attention 3 ({_fa3_reason})"
    return f"Attention: PyTorch SDPA, sliding windows as blocked masks (FA3 not used: {_fa3_reason})"


def __getattr__(name):
    # Computed on first access, so importing this module never touches CUDA or the network.
    # HAS_FA3: the kernel loaded. USE_FA3: it will be used for COMPUTE_DTYPE activations (bf16 only).
    if name == "HAS_FA3":
        return _load_flash_attention_3() is not None
    if name == "USE_FA3":
        from nanochat.common import COMPUTE_DTYPE

        if _override_impl is not None:
            return _override_impl == "fa3"
        return COMPUTE_DTYPE == torch.bfloat16 and _load_flash_attention_3() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_fa3(q):
    if _override_impl == "sdpa":
        return False
    if _override_impl == "fa3":
        if _load_flash_attention_3() is None:
            raise RuntimeError("flash_attention._override_impl='fa3' but FA3 is not available on this machine")
        return True
    return q.is_cuda and q.dtype == torch.bfloat16 and _load_flash_attention_3() is not None


def _check_window(window_size):
    left, right = window_size
    if right not in (0, -1):
        raise ValueError(f"window_size={window_size}: only causal windows (right = 0 or -1) are supported")
    return left


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, T, H, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.size(2) % k.size(2) != 0:
        raise ValueError(f"number of query heads ({q.size(2)}) must be a multiple of kv heads ({k.size(2)})")


# -----------------------------------------------------------------------------
# SDPA implementation, (B, H, T, D) layout inside


def _sdpa_causal(q, k, v, left, allow_blocks=False):
    """Causal attention where the Tq queries are the last Tq of the Tk keys (same offset for every row)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    windowed = 0 <= left < Tk
    if Tq == Tk and not (0 <= left < Tq):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if allow_blocks and Tq == Tk and 0 < left and Tq > 2 * left:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # keep only q, k, v and the attention's outputs for backward; the block layout is rebuilt there
            return checkpoint(_sdpa_sliding_blocks, q, k, v, left, use_reentrant=False, context_fn=_save_attention)
        return _sdpa_sliding_blocks(q, k, v, left)
    if Tq == 1:
        if windowed:  # a single query needs only its last left+1 keys: slice instead of masking
            k, v = k[:, :, Tk - (left + 1):], v[:, :, Tk - (left + 1):]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = _cached(_causal_mask)(Tq, Tk, left if windowed else -1, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _sdpa_sliding_blocks(q, k, v, w):
    """Causal sliding-window attention (each query sees itself and the w keys before it) in blocks of w queries.

    Block i (queries i*w .. i*w+w-1) only needs keys (i-1)*w .. i*w+w-1, so attention runs on (B*nb, H, w, 2w)
    instead of a (T, T) mask that is mostly False: about T/(2w) times less work (2x at T=4w, the S windows of
    the default pattern). Same result as the masked full attention up to float rounding.
    """
    B, H, T, D = q.shape
    Hkv = k.size(1)
    nb = -(-T // w)
    pad = nb * w - T  # pad T up to a multiple of w; padded queries are dropped, padded keys are in the future
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, w, D).transpose(1, 2).reshape(B * nb, H, w, D)

    def key_blocks(x):  # (B, Hkv, T, D) -> (B*nb, Hkv, 2w, D): block i = positions (i-1)*w .. (i+1)*w - 1
        x = F.pad(x, (0, 0, w, pad))  # w zero keys in front, so block 0 has a (masked) previous block
        return x.unfold(2, 2 * w, w).permute(0, 2, 1, 4, 3).reshape(B * nb, Hkv, 2 * w, D)

    mask = _cached(_block_mask)(B, nb, w, q.device)
    y = F.scaled_dot_product_attention(qb, key_blocks(k), key_blocks(v), attn_mask=mask, enable_gqa=H != Hkv)
    return y.view(B, nb, H, w, D).transpose(1, 2).reshape(B, H, nb * w, D)[:, :, :T]


# Training memory of the blocked path: SDPA saves its inputs for backward, and the key/value blocks are copies
# twice the size of k and v (each key sits in two blocks). At d12, B 32, T 2048 that is +192 MiB per S layer,
# +1.7 GiB for SSSL's 9 S layers, which torch.compile's partitioner kept. Selective activation checkpointing saves
# the attention op's outputs and recomputes only the cheap layout copies (pad/unfold/reshape) in backward.
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}  # fmt: skip


def _save_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention():
    return create_selective_checkpoint_contexts(_save_attention_policy)


def _cached(fn):
    # Masks are cached in eager mode (training reuses a few shapes); under torch.compile they are built inline.
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@functools.lru_cache(maxsize=32)
def _causal_mask(Tq, Tk, left, device):
    """(Tq, Tk) bool mask, True = attend. Query r sits at position Tk - Tq + r."""
    qpos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = kpos <= qpos
    if left >= 0:
        mask = mask & (qpos - kpos <= left)
    return mask


@functools.lru_cache(maxsize=8)
def _block_mask(B, nb, w, device):
    """(B*nb, 1, w, 2w) mask for _sdpa_sliding_blocks: query r (block position w + r) sees keys r .. r + w."""
    r = torch.arange(w, device=device)[:, None]
    c = torch.arange(2 * w, device=device)[None, :]
    mask = ((c >= r) & (c <= r + w)).expand(nb, w, 2 * w).clone()
    mask[0, :, :w] = False  # block 0's previous block is padding
    return mask.repeat(B, 1, 1)[:, None]


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention without a cache. q: (B, T, H, D), k/v: (B, T, H_kv, D) -> (B, T, H, D)."""
    _check_qkv(q, k, v)
    left = _check_window(window_size)
    if _use_fa3(q):
        return _load_flash_attention_3().flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if causal:
        y = _sdpa_causal(q, k, v, left, allow_blocks=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), *, seqlens_host=None, static=False):
    """Attention against one layer's KV cache, writing the new k/v into the cache first (in place, like FA3).

    q: (B, T, H, D); k_cache/v_cache: (B, T_max, H_kv, D); k/v: (B, T, H_kv, D) or None; cache_seqlens: (B,) int32,
    the number of valid cached tokens per row before this call (rows may differ). Returns (B, T, H, D).
    Not in FA3's signature (FA3 needs neither): seqlens_host, cache_seqlens as a list (skips reading it back);
    static=True, the capture-safe path of protocol item 6 above.
    """
    if cache_seqlens is None:
        raise ValueError("flash_attn_with_kvcache needs cache_seqlens (a (B,) int32 tensor of cached lengths)")
    _check_qkv(q, k_cache, v_cache)
    left = _check_window(window_size)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (or neither)")
    if _use_fa3(q):
        return _load_flash_attention_3().flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=causal, window_size=window_size)

    if static:
        return _sdpa_static(q, k_cache, v_cache, k, v, cache_seqlens, causal, left)
    B, Tq = q.shape[:2]
    T_new = 0 if k is None else k.size(1)
    # Without a host copy: one host sync per layer (upstream's SDPA path does the same with .item()).
    lens = cache_seqlens.tolist() if seqlens_host is None else seqlens_host
    lo, hi = min(lens), max(lens)
    if hi + T_new > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {hi} cached + {T_new} new tokens > capacity {k_cache.size(1)}")
    if lo == hi:
        # Every row at the same position: plain slices, numerically identical to upstream's uniform-position path.
        if k is not None:
            k_cache[:, lo:lo + T_new] = k
            v_cache[:, lo:lo + T_new] = v
        end = lo + T_new
        qt, kt, vt = q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
        if causal:
            y = _sdpa_causal(qt, kt, vt, left)
        else:
            y = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=qt.size(1) != kt.size(1))
        return y.transpose(1, 2)

    # Rows at different positions: scatter the new k/v to (b, lens[b] + t) and mask each row separately.
    starts = cache_seqlens.to(torch.long)[:, None]  # (B, 1)
    if k is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        cols = starts + torch.arange(T_new, device=q.device)[None, :]  # (B, T_new)
        k_cache[rows, cols] = k
        v_cache[rows, cols] = v
    end = hi + T_new
    # Queries are the row's last Tq tokens: positions lens[b] + T_new - Tq + r.
    qpos = (starts + (T_new - Tq) + torch.arange(Tq, device=q.device)[None, :])[:, :, None]  # (B, Tq, 1)
    kpos = torch.arange(end, device=q.device)[None, None, :]  # (1, 1, Tk)
    if causal:
        mask = kpos <= qpos
        if left >= 0:
            mask = mask & (qpos - kpos <= left)
    else:
        mask = (kpos < starts[:, :, None] + T_new).expand(B, Tq, end)
    qt, kt, vt = q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], enable_gqa=qt.size(1) != kt.size(1))
    return y.transpose(1, 2)


def _sdpa_static(q, k_cache, v_cache, k, v, cache_seqlens, causal, left):
    """Fixed-shape attention over the whole cache view (protocol item 6): no host reads, capture-safe."""
    B, Tq = q.shape[:2]
    Tk = k_cache.size(1)
    T_new = 0 if k is None else k.size(1)
    starts = cache_seqlens.to(torch.long)[:, None]  # (B, 1)
    if k is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        cols = (starts + torch.arange(T_new, device=q.device)[None, :]).clamp_(max=Tk - 1)  # (B, T_new)
        k_cache[rows, cols] = k
        v_cache[rows, cols] = v
    qpos = (starts + (T_new - Tq) + torch.arange(Tq, device=q.device)[None, :])[:, :, None]  # (B, Tq, 1)
    kpos = torch.arange(Tk, device=q.device)[None, None, :]  # (1, 1, Tk)
    mask = kpos <= qpos if causal else kpos < starts[:, :, None] + T_new
    if causal and left >= 0:
        mask = mask & (qpos - kpos <= left)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], enable_gqa=qt.size(1) != kt.size(1))
    return y.transpose(1, 2)


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
