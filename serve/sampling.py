"""
Token sampling for serve.batching: per request on the host, or for the whole batch on the device.

Per row (`sample_row`, the CPU default): each request draws from its own torch.Generator, exactly like
nanochat.engine.sample_next_token (plus top-p). Batch-invariant by construction, one host read per row.

Batched (`BatchSampler`, the static/CUDA-graph path): every row's temperature, top-k, top-p, seed, sample counter and
forced token are device tensors, and one function turns (b, vocab) logits into one (b, PACK) float64 result:
[emitted token, its raw logprob, MAX_LOGPROBS top token ids, their raw logprobs], so a decode step needs one host
transfer for all rows. Randomness is counter-based, not a generator: row r's noise for token t is a hash of
(seed_r, counter_r, t), where counter_r counts the request's samples (0 = the token sampled from the prefill).
The noise turns sampling into an argmax (Gumbel-max: argmax(logits/T + G) with G = -log(-log(U)) draws from
softmax(logits/T)), which needs no host round trip, can be captured in a CUDA graph, and gives a row the same
tokens whatever else is in the batch (for the same logits). The random streams differ from sample_row's: a seed
means the same tokens within one sampler kind, not across kinds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.engine import sample_next_token

MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (OpenAI's limit)
PACK = 2 + 2 * MAX_LOGPROBS  # columns of BatchSampler's result
_MASK32 = 0xFFFFFFFF


# -----------------------------------------------------------------------------
# Per row (host)


def sample_row(logits: torch.Tensor, params, rng: torch.Generator) -> int:
    """logits (1, vocab) -> token id, drawing from the request's own generator."""
    if params.top_p >= 1.0 or params.temperature == 0:
        return int(sample_next_token(logits, rng, params.temperature, params.top_k)[0, 0])
    if params.top_k:
        vals, idx = torch.topk(logits, min(params.top_k, logits.size(-1)), dim=-1)
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(vals / params.temperature, dim=-1)
    keep = (probs.cumsum(-1) - probs) < params.top_p  # smallest prefix whose mass reaches top_p (always >= 1 token)
    probs = probs * keep
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), num_samples=1, generator=rng)
    return int(idx.gather(1, choice)[0, 0])


def row_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """logits (vocab,) -> (raw logprob of token, the k most likely (token, logprob) pairs)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        vals, idx = torch.topk(logp, k)
        top = list(zip(idx.tolist(), vals.tolist()))
    return float(logp[token]), top


def unpack_logprobs(row: list[float], k: int) -> tuple[float, list[tuple[int, float]]]:
    """One row of a BatchSampler result -> (logprob, k top pairs)."""
    ids = row[2:2 + MAX_LOGPROBS][:k]
    vals = row[2 + MAX_LOGPROBS:][:k]
    return row[1], [(int(t), v) for t, v in zip(ids, vals)]


# -----------------------------------------------------------------------------
# Batched (device)


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for int64 x in [0, 2^32): split in 16-bit halves so no product overflows int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, 'lowbias32' constants) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed_lo, seed_hi, counter, token_hash) -> torch.Tensor:
    """(b, V) uniforms in (0, 1) from per-row (b,) seeds/counters and the (V,) hashed token ids."""
    h = _hash32((counter[:, None] & _MASK32) ^ token_hash[None, :])
    h = _hash32(h ^ seed_hi[:, None])
    h = _hash32(h ^ seed_lo[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_batch(logits, temperature, top_k, top_p, seed_lo, seed_hi, counter, forced, token_hash):
    """logits (b, V) fp32; per-row (b,) params (forced: a token to emit instead of sampling, or -1).
    Returns (b, PACK) float64: emitted token, its raw logprob, top MAX_LOGPROBS ids and raw logprobs."""
    b, V = logits.shape
    logp = F.log_softmax(logits, dim=-1)  # raw: before temperature/top-k/top-p
    greedy = logits.argmax(dim=-1)
    z = logits / temperature.clamp(min=1e-6)[:, None]
    vals, idx = torch.sort(z, dim=-1, descending=True)  # (b, V)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    vals = vals.masked_fill(rank >= k, float("-inf"))
    probs = F.softmax(vals, dim=-1)
    keep = (rank < k) & ((probs.cumsum(-1) - probs) < top_p[:, None])  # the top-p nucleus within the top-k
    gumbel = -torch.log(-torch.log(uniform_noise(seed_lo, seed_hi, counter, token_hash)))
    scores = torch.where(keep, vals + gumbel.gather(1, idx), float("-inf"))
    sampled = idx.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]
    token = torch.where(temperature > 0, sampled, greedy)
    token = torch.where(forced >= 0, forced, token)
    top_vals, top_ids = torch.topk(logp, min(MAX_LOGPROBS, V), dim=-1)
    out = torch.zeros(b, PACK, dtype=torch.float64, device=logits.device)
    out[:, 0] = token.to(torch.float64)
    out[:, 1] = logp.gather(1, token[:, None])[:, 0].to(torch.float64)
    out[:, 2:2 + top_ids.size(1)] = top_ids.to(torch.float64)
    out[:, 2 + MAX_LOGPROBS:2 + MAX_LOGPROBS + top_vals.size(1)] = top_vals.to(torch.float64)
    return out


class BatchSampler:
    """Per-row sampling parameters in fixed device buffers (rows of the decode batch), filled from the host once per
    step with set_rows(); calling the sampler (as StaticDecoder's `post`) samples rows [0, b)."""

    def __init__(self, rows: int, vocab_size: int, device):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.ints = torch.zeros(rows, 6, dtype=torch.long, device=device)  # top_k, seed_lo, seed_hi, counter, forced
        self.floats = torch.zeros(rows, 2, dtype=torch.float32, device=device)  # temperature, top_p
        self._ints_host = torch.zeros(rows, 6, dtype=torch.long).pin_memory() if pin else None
        self._floats_host = torch.zeros(rows, 2, dtype=torch.float32).pin_memory() if pin else None
        self.token_hash = _hash32(torch.arange(vocab_size, dtype=torch.long, device=device))

    @staticmethod
    def row_values(params, counter: int, forced: int) -> tuple[list[int], list[float]]:
        seed = params.seed & ((1 << 64) - 1)
        return ([params.top_k or 0, seed & _MASK32, seed >> 32, counter, forced, 0],
                [params.temperature, params.top_p])

    def set_rows(self, ints: list[list[int]], floats: list[list[float]]):
        """Rows [0, len(ints)) get these values; later rows keep theirs (idle rows: nothing reads their results)."""
        n = len(ints)
        for dst, host, values, dtype in ((self.ints, self._ints_host, ints, torch.long),
                                         (self.floats, self._floats_host, floats, torch.float32)):
            src = torch.tensor(values, dtype=dtype)
            if host is not None:  # pinned staging buffer: the copy to the GPU does not block the host
                host[:n].copy_(src)
                src = host[:n]
            dst[:n].copy_(src, non_blocking=True)

    def __call__(self, logits: torch.Tensor, b: int) -> torch.Tensor:
        ints, floats = self.ints[:b], self.floats[:b]
        return sample_batch(logits, floats[:, 0], ints[:, 0], floats[:, 1], ints[:, 1], ints[:, 2], ints[:, 3],
                            ints[:, 4], self.token_hash)
