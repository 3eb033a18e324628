"""
The GPT model: a decoder-only Transformer, checkpoint-compatible with upstream nanochat (same parameter names,
shapes and forward math).

Architecture in one breath: token embedding -> rms-norm -> "smear" (a gated mix of the previous token's embedding)
-> n_layer pre-norm blocks, each scaled by learnable resid/x0 lambdas -> "backout" (subtract the mid-depth residual)
-> rms-norm -> untied lm_head -> logit softcap 15. Blocks use RoPE (theta 1e5), QK-norm (x1.2), GQA, sliding windows
(pattern string such as "SSSL", last layer always full), value embeddings on alternating layers (ResFormer-style,
gated per kv head) and a ReLU^2 MLP. No biases, no learnable norm weights. Master weights are fp32; `Linear` casts
them to the activation dtype (COMPUTE_DTYPE), which replaces autocast.

Build on the meta device, then materialize:
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_head=2, n_kv_head=2, n_embd=256))
    model.to_empty(device="cpu"); model.init_weights()
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, print0
from nanochat.flash_attention import flash_attn
from nanochat.optim import MuonAdamW

SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the normalized embedding
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
ROPE_BASE = 100000
LOGIT_SOFTCAP = 15.0
QK_SCALE = 1.2  # applied to both q and k after QK-norm: logits scale 1.44/sqrt(D)


@dataclass(init=False)
class GPTConfig:
    sequence_len: int = 2048  # training context; also sets the window sizes
    vocab_size: int = 32768  # real vocab; embeddings/lm_head are padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # Tiled across layers, last layer forced to L. L = full context, S = ceil(sequence_len/4/128)*128 tokens.
    window_pattern: str = "SSSL"

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 window_pattern="SSSL", **unknown):
        # Written out (instead of the dataclass __init__) so that an unknown key, e.g. from a hand-edited
        # checkpoint meta file, is a ValueError that names the valid keys rather than a bare TypeError.
        if unknown:
            valid = ", ".join(f.name for f in fields(GPTConfig))
            raise ValueError(f"unknown GPTConfig key(s) {sorted(unknown)}; valid keys are: {valid}")
        self.sequence_len, self.vocab_size, self.n_layer = sequence_len, vocab_size, n_layer
        self.n_head, self.n_kv_head, self.n_embd, self.window_pattern = n_head, n_kv_head, n_embd, window_pattern
        self._validate()

    def _validate(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim = n_embd/n_head = {self.n_embd // self.n_head} must be even (RoPE)")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not isinstance(self.window_pattern, str) or not self.window_pattern \
                or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern must be a non-empty string of S and L (e.g. 'SSSL' or 'L'), "
                             f"got {self.window_pattern!r}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def norm(x):
    """RMS norm over the last dim, no learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free matmul whose fp32 master weight is cast to the activation dtype (bf16 on GPU) on the fly."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def has_ve(layer_idx, n_layer):
    """Value embeddings live on every other layer, counted back from the last layer (which always has one)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of the head dim by -theta. x: (B, T, H, D); cos/sin broadcast to (B, T, 1, D/2).

    The sign convention (rotation by -theta, halves not interleaved) is upstream's; checkpoints depend on it.
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row loss logsumexp(z) - z[target] with z = cap * tanh(h / cap); rows with target -1 give 0.

    The same value as F.cross_entropy(cap * tanh(h / cap), ...), fused by hand: one (N, V) tensor (the tanh) is
    kept for backward and the gradient is written in place, where the autograd chain (div, tanh, mul, log_softmax,
    nll) makes about eight (N, V) passes with fresh temporaries. The work runs over row chunks; on CPU a chunk is
    sized to stay in cache, which makes this about 2x faster than the chain (the logits are the largest
    activations of the model: at vocab 32768 this is a large part of a small model's step).
    """

    @staticmethod
    def forward(ctx, h, targets, cap):
        N, V = h.shape
        chunk = max(1, (1 << 17 if h.device.type == "cpu" else 1 << 27) // V)  # rows per chunk
        t = torch.empty(N, V, dtype=h.dtype, device=h.device)  # tanh(h / cap), saved for backward
        lse = torch.empty(N, dtype=h.dtype, device=h.device)
        for s in range(0, N, chunk):
            tc = torch.div(h[s:s + chunk], cap, out=t[s:s + chunk]).tanh_()
            lse[s:s + chunk] = torch.logsumexp(tc * cap, dim=-1)
        valid = targets != -1
        safe = torch.where(valid, targets, 0)[:, None]  # (N, 1) gather index; ignored rows point at column 0
        losses = torch.where(valid, lse - t.gather(1, safe).squeeze(1) * cap, 0.0)
        ctx.save_for_backward(t, lse, safe, valid)
        ctx.cap, ctx.chunk = cap, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        t, lse, safe, valid = ctx.saved_tensors
        cap, chunk = ctx.cap, ctx.chunk
        row_scale = torch.where(valid, grad_losses, 0.0)[:, None]  # (N, 1); ignored rows get no gradient
        grad = torch.empty_like(t)
        for s in range(0, t.size(0), chunk):
            e = s + chunk
            tc, g = t[s:e], grad[s:e]
            torch.mul(tc, cap, out=g).sub_(lse[s:e, None]).exp_()  # softmax(z)
            g.scatter_add_(1, safe[s:e], torch.full_like(safe[s:e], -1, dtype=g.dtype))  # - onehot(target)
            g.mul_(1 - tc.square()).mul_(row_scale[s:e])  # chain rule through cap * tanh(h / cap)
        return grad, None, None


def softcap_cross_entropy(logits, targets, cap, reduction="mean"):
    """cross_entropy(cap * tanh(logits / cap), targets, ignore_index=-1, reduction); logits (N, V) fp32."""
    if torch.compiler.is_compiling():  # inductor fuses the plain chain by itself
        return F.cross_entropy(cap * torch.tanh(logits / cap), targets, ignore_index=-1, reduction=reduction)
    losses = _SoftcapCrossEntropy.apply(logits, targets, cap)  # (N,)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != -1).sum()  # mean over non-ignored targets (NaN if none, like F.cross_entropy)


# -----------------------------------------------------------------------------
# Blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(C, config.n_head * self.head_dim, bias=False)
        self.c_k = Linear(C, kv_dim, bias=False)
        self.c_v = Linear(C, kv_dim, bias=False)
        self.c_proj = Linear(C, C, bias=False)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) \
            else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: per-kv-head gate in (0, 3) computed from the first channels of the input
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                   cache_seqlens=kv_cache.cache_seqlens, causal=True,
                                                   window_size=window_size,
                                                   seqlens_host=getattr(kv_cache, "host_seqlens", None),
                                                   static=getattr(kv_cache, "static", False))
        return self.c_proj(y.contiguous().view(B, T, -1))


class _ReluSquare(torch.autograd.Function):
    """relu(x)^2 with a one-pass backward (grad * 2 * relu(x)); autograd's relu -> pow chain takes four passes
    over the (B, T, 4C) hidden activations, the largest tensors in a block. Same values, bit for bit."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r.square()

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)


def relu_square(x):
    if torch.compiler.is_compiling():  # inductor fuses the plain expression by itself
        return F.relu(x).square()
    return _ReluSquare.apply(x)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_square(self.c_fc(x)))  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        """Shapes only: this usually runs under torch.device("meta"); init_weights() sets every value."""
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"GPT expects a GPTConfig, got {type(config).__name__}; use GPT(GPTConfig(**kwargs))")
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)  # [(left, right)] per layer, FA3 convention
        padded_vocab = math.ceil(config.vocab_size / pad_vocab_size_to) * pad_vocab_size_to
        if padded_vocab != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {padded_vocab} for efficiency")
        C, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(C, padded_vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scale of the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # how much of the embedding to re-add per layer
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(padded_vocab, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # RoPE tables for 10x the training length (cheap), non-persistent: recomputed, never saved.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Set every parameter and buffer. The draw order is fixed (same seed -> same weights as upstream)."""
        C, n_layer = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = math.sqrt(3) * C**-0.5  # a uniform(-s, s) has std C^-0.5 without a normal's outliers
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        denom = max(n_layer - 1, 1)
        for i in range(n_layer):  # stronger residual and more embedding re-injection in early layers
            self.resid_lambdas[i] = 1.15 - 0.10 * i / denom
            self.x0_lambdas[i] = 0.20 - 0.15 * i / denom
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start slightly open
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, self.config.head_dim)
        # Embeddings are lookups: keeping them in the compute dtype saves memory. fp16 is the exception, since
        # GradScaler cannot unscale fp16 gradients.
        if COMPUTE_DTYPE != torch.float16:
            self.transformer.wte.to(dtype=COMPUTE_DTYPE)
            self.value_embeds.to(dtype=COMPUTE_DTYPE)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=ROPE_BASE, device=None):
        device = self.transformer.wte.weight.device if device is None else device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        cos, sin = angles.cos().to(COMPUTE_DTYPE), angles.sin().to(COMPUTE_DTYPE)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @staticmethod
    def _compute_window_sizes(config):
        long_w = config.sequence_len
        short_w = math.ceil(long_w / 4 / 128) * 128  # a quarter of the context, rounded up to FA3's 128 tile
        pattern = config.window_pattern.upper()
        sizes = [((short_w if pattern[i % len(pattern)] == "S" else long_w), 0) for i in range(config.n_layer)]
        sizes[-1] = (long_w, 0)  # the last layer always sees the full context
        return sizes

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Parameter and FLOP accounting

    def num_matmul_params(self):
        """Parameters that multiply the token stream (2 FLOPs each per token forward): every nn.Linear weight.

        Upstream counts only `gpt.Linear` instances, so after fp8.convert_to_float8_training (whose Float8Linear
        subclasses nn.Linear, not gpt.Linear) most matmuls vanish from the count and FLOPs/MFU/--target-flops
        are undercounted (spec 17.2.1). Counting nn.Linear gives the same number with or without fp8.
        """
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def _attended(self, window, n):
        """Keys one query attends to at context n in a layer with this left window (-1 = unlimited)."""
        return n if window < 0 else min(window, n)

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per matmul param + 12*H*D per attended key per layer.

        Embedding lookups and softmax/norm elementwise work are not counted (PaLM-style estimate).
        """
        H, D, T = self.config.n_head, self.config.head_dim, self.config.sequence_len
        attn = sum(12 * H * D * self._attended(w, T) for w, _ in self.window_sizes)
        return 6 * self.num_matmul_params() + attn

    def estimate_decode_flops(self, context_len):
        """Forward FLOPs to decode one token at a given context length (2 per matmul param + attention)."""
        H, D = self.config.n_head, self.config.head_dim
        attn = sum(4 * H * D * self._attended(w, context_len) for w, _ in self.window_sizes)
        return 2 * self.num_matmul_params() + attn

    def estimate_prefill_flops(self, num_tokens):
        """Forward FLOPs to prefill num_tokens: causal, so token t attends to min(t+1, window) keys."""
        H, D = self.config.n_head, self.config.head_dim
        attn = 0
        for window, _ in self.window_sizes:
            w = self._attended(window, num_tokens)
            attn += 4 * H * D * (w * (w + 1) // 2 + (num_tokens - w) * w)  # ramp up to w keys, then flat
        return 2 * self.num_matmul_params() * num_tokens + attn

    def kv_bytes_per_token(self):
        """Bytes of KV cache stored per token per row, all layers (the cache is in COMPUTE_DTYPE)."""
        return self.config.n_layer * 2 * self.config.n_kv_head * self.config.head_dim * COMPUTE_DTYPE.itemsize

    def kv_read_bytes(self, context_len):
        """Bytes of KV cache read by one decode step per row; windowed layers read only their window."""
        per_token = 2 * self.config.n_kv_head * self.config.head_dim * COMPUTE_DTYPE.itemsize
        return sum(per_token * self._attended(w, context_len) for w, _ in self.window_sizes)

    def num_scaling_params(self):
        """Parameter counts per group; scaling-law horizons use transformer_matrices + lm_head."""
        count = lambda params: sum(p.numel() for p in params)
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.transformer.h.parameters()),  # includes the ve_gates
            "scalars": count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda,
                              self.backout_lambda]),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == count(self.parameters()), "a parameter is missing from the groups"
        return counts

    # -------------------------------------------------------------------------
    # Optimizer

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5, compile=None):
        """MuonAdamW: AdamW for embeddings/lm_head/scalars, Muon for all block matrices (one group per shape).
        compile: torch.compile the optimizer kernels (None = MuonAdamW's default: on CUDA only)."""
        C = self.config.n_embd
        dmodel_lr_scale = (C / 768) ** -0.5  # AdamW LRs were tuned at width 768
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({C}/768) = {dmodel_lr_scale:.6f}")
        matrix_params = list(self.transformer.h.parameters())
        adamw = lambda params, lr, betas, wd: dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10,
                                                   weight_decay=wd)
        groups = [
            adamw(list(self.lm_head.parameters()), unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
            adamw(list(self.transformer.wte.parameters()), embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        for shape in sorted({p.shape for p in matrix_params}):  # Muon stacks same-shape matrices
            groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "parameter left out"
        optimizer = MuonAdamW(groups, compile=compile)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # -------------------------------------------------------------------------
    # Forward

    def _check_inputs(self, idx, targets, kv_cache, loss_reduction):
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if idx.size(1) == 0:
            raise ValueError("idx has no tokens (T = 0)")
        if idx.size(1) > self.cos.size(1):
            raise ValueError(f"sequence length {idx.size(1)} exceeds the RoPE table ({self.cos.size(1)} = "
                             f"10 x sequence_len); build the model with a larger sequence_len")
        if idx.device != self.cos.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.cos.device}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        if kv_cache is not None and kv_cache.cache_seqlens.shape != (idx.size(0),):
            raise ValueError(f"kv_cache has {tuple(kv_cache.cache_seqlens.shape)} rows but idx has batch "
                             f"size {idx.size(0)}")

    def _rotary(self, T, kv_cache):
        """cos/sin for the new tokens, broadcastable to (B, T, H, D/2): offset by each row's cache length."""
        if kv_cache is None:
            return self.cos[:, :T], self.sin[:, :T], None
        if getattr(kv_cache, "static", False):  # capture-safe: positions stay on the device (lens unknown)
            pos = kv_cache.cache_seqlens.to(torch.long)[:, None] + torch.arange(T, device=self.cos.device)
            pos = pos.clamp_(max=self.cos.size(1) - 1)  # idle rows of a static batch must stay in the table
            return self.cos[0, pos], self.sin[0, pos], None
        lens = getattr(kv_cache, "host_seqlens", None)  # a host copy saves a device->host sync
        lens = kv_cache.cache_seqlens.tolist() if lens is None else lens
        lo, hi = min(lens), max(lens)
        if hi + T > self.cos.size(1):
            raise ValueError(f"position {hi + T} exceeds the RoPE table ({self.cos.size(1)} positions)")
        if lo == hi:  # all rows at one position: a slice (the common case, and upstream's only case)
            return self.cos[:, lo:lo + T], self.sin[:, lo:lo + T], lens
        pos = kv_cache.cache_seqlens.to(torch.long)[:, None] + torch.arange(T, device=self.cos.device)  # (B, T)
        return self.cos[0, pos], self.sin[0, pos], lens  # (B, T, 1, D/2)

    def _smear(self, x):
        """x[:, t] += smear_lambda * sigmoid(gate(x[:, t, :24])) * x[:, t-1] for t >= 1 (cheap bigram signal)."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) -> fp32 logits (B, T, vocab_size), or the cross-entropy loss if targets (ignore_index -1).

        With a kv_cache (see flash_attention.py for the protocol) rows may sit at different positions.
        """
        self._check_inputs(idx, targets, kv_cache, loss_reduction)
        B, T = idx.shape
        cos, sin, lens = self._rotary(T, kv_cache)

        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))  # (B, T, C)
        if kv_cache is None:
            x = self._smear(x)  # T == 1 is fine: nothing to smear (upstream asserts T > 1 here)
        else:
            prev = kv_cache.prev_embedding  # pre-smear embedding of each row's previous token, (B, 1, C)
            kv_cache.prev_embedding = x[:, -1:, :]
            first = x[:, :1]
            if T > 1:
                x = self._smear(x)  # prefill: the same formula as training, within the chunk
            if prev is not None and (lens is None or max(lens) > 0):
                # The chunk's first token smears with the previous token (decode, or a prefill chunk that
                # continues a cached prefix); a row that starts here (length 0) has no previous token.
                gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(first[..., :SMEAR_CHANNELS]))
                if lens is None or min(lens) == 0:
                    gate = gate * (kv_cache.cache_seqlens > 0).to(x.dtype)[:, None, None]
                x = first + gate * prev if T == 1 else torch.cat([first + gate * prev, x[:, 1:]], dim=1)

        x0 = x  # the normalized (smeared) embedding, re-injected at every layer via x0_lambdas
        backout_layer, x_backout = self.config.n_layer // 2, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, (cos, sin), self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)  # every layer has written its k/v at the old positions
        x = norm(x - self.backout_lambda.to(x.dtype) * x_backout)  # remove mid-depth features before the head

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()  # (B, T, vocab), drop the padding
        if targets is None:
            return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        return softcap_cross_entropy(logits.view(B * T, -1), targets.reshape(-1), LOGIT_SOFTCAP, loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 streaming sampler (no KV cache, recomputes the prefix each step); yields token ids.

        temperature 0 = greedy; top_k keeps the k largest logits. Use nanochat.engine.Engine for real serving.
        """
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, vocab)
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            if temperature > 0:
                next_id = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
