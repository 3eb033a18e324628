"""
Continuous batching for nanochat's GPT: many requests share one KV cache and one forward pass per token.

    sched = BatchScheduler(model, tokenizer, max_batch_size=16)
    sched.start()                                       # background thread; or call sched.step() yourself
    seq = sched.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, top_k=50, seed=1),
                       on_event=lambda ev: ...)         # TokenEvent per token, from the scheduler thread
    tokens = sched.generate(prompt_ids, SamplingParams(...))   # blocking convenience: list of TokenEvents

Pure PyTorch (no Ray), so it is testable and usable in-process (serve.chat_cli). serve.engine_deployment wraps it.

How a step works:
  1. Cancelled requests leave; waiting requests join (up to max_batch_size rows). A joining request is prefilled
     ALONE (batch 1, its own temporary cache), samples its first token from the prefill logits, and its cache row is
     copied into the shared cache (KVCache.copy_row_from).
  2. One decode forward for every running row, each at its own position (per-row cache_seqlens).
  3. Each row samples with ITS OWN torch.Generator and parameters, then runs the calculator tool state machine
     (nanochat.engine's, so forced tool output behaves exactly as in Engine.generate: the generator is drawn from on
     every step, forced or not). A row leaves when it emits <|assistant_end|>/<|bos|> or hits its token budget.

Batch invariance (batched == alone, bit for bit, for the same seed). On CPU float32 this does NOT hold by default:
  - MKL's sgemm gives different roundings for the same row depending on the number of rows M (M=1 is a gemv,
    M=2..3 another kernel, and rows in a partial tail tile differ again); with M a multiple of 8 every row's result
    was identical for all M and all row positions (measured on AVX-512, 1 and 2 threads).
  - Attention over rows at different positions (the masked SDPA path in nanochat.flash_attention) depends on the
    key length Tk = the longest row, and PyTorch's CPU flash-attention kernel with more than one thread also
    depends on the batch size.
So with `batch_invariant=True` (default on CPU) the decode batch is padded with dummy rows to a multiple of
`row_multiple` (8) rows, and decode attention runs ROW BY ROW: each real row calls the library's
flash_attn_with_kvcache on its own (batch 1, its own length), exactly the call it gets when it is alone; dummy rows
skip attention. The switch is a thread-local dispatcher installed on nanochat.flash_attention.flash_attn (other
threads and every other caller are untouched). Prefill needs nothing: it always runs alone. Cost: up to 7 dummy rows
in the matmuls and one small attention call per row and layer (cheap for small models; turn it off on GPUs, where
cuBLAS/FA3 give no such guarantee anyway). tests/test_serve_batching.py checks the invariance on the test machine.
Tokens are not bit-identical to nanochat.engine.Engine (whose batch-1 decode matmuls use the gemv kernel); what is
guaranteed is that a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanochat import flash_attention
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine, KVCache, RowState, sample_next_token

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"  # the model ended its turn (<|assistant_end|> or <|bos|>), or a stop string matched
FINISH_LENGTH = "length"  # max_tokens reached, or the row filled the cache (max_seq_len)
FINISH_CANCELLED = "cancelled"
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float = 1.0  # nucleus sampling; 1.0 = off (then sampling is exactly nanochat.engine.sample_next_token)
    seed: int = 42
    # None = off; k in 0..20 = report the emitted token's raw log-probability and the k most likely alternatives
    logprobs: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be None, 0 (off) or positive, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None (off) or an int in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")


@dataclasses.dataclass
class TokenEvent:
    token: int
    sampled: bool  # False for forced tool output (calculator results)
    finish_reason: str | None = None  # set on the request's last event
    # Only when SamplingParams.logprobs is set. RAW model log-probabilities: log_softmax of the model's logits at this
    # position, before temperature/top-k/top-p (so they do not depend on the sampling settings); forced tool tokens
    # get theirs too. top_logprobs: the k most likely (token_id, logprob) pairs, most likely first.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sequence:
    """One request in the scheduler. Created by BatchScheduler.submit; cancel() is thread-safe."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None], device):
        self.prompt = prompt
        self.params = params
        self.on_event = on_event
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(params.seed)
        self.state = RowState(list(prompt))
        self.num_generated = 0
        self.last_token = None
        self.slot = None
        self.finish_reason = None
        self.cancelled = False
        self.submitted_at = time.monotonic()

    def cancel(self):
        self.cancelled = True

    @property
    def done(self):
        return self.finish_reason is not None


class _RowsView:
    """The first m rows of the shared cache, with the attribute protocol gpt.py uses (see flash_attention.py)."""

    def __init__(self, cache: KVCache, m: int):
        self.k_cache, self.v_cache = cache.k_cache[:, :m], cache.v_cache[:, :m]
        self.cache_seqlens = cache.cache_seqlens[:m]  # a view: advance() updates the shared lengths in place
        self.prev_embedding = None if cache.prev_embedding is None else cache.prev_embedding[:m]

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens


# Row-by-row decode attention (batch-invariant mode). A dispatcher replaces flash_attn.flash_attn_with_kvcache once;
# it defers to the original unless THIS thread is inside a batch-invariant decode step (_tls.rows is set).
_tls = threading.local()
_original_attn = None
_install_lock = threading.Lock()


def _rowwise_dispatch(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False, window_size=(-1, -1)):
    rows = getattr(_tls, "rows", None)
    if rows is None:
        return _original_attn(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=causal,
                              window_size=window_size)
    out = torch.zeros_like(q)  # (B, T, H, D); dummy rows keep zeros, their outputs are never used
    for b in rows:
        one = slice(b, b + 1)
        out[one] = _original_attn(q[one], k_cache[one], v_cache[one], k=None if k is None else k[one],
                                  v=None if v is None else v[one], cache_seqlens=cache_seqlens[one], causal=causal,
                                  window_size=window_size)
    return out


def _install_rowwise_attention():
    global _original_attn
    with _install_lock:
        if _original_attn is None:
            _original_attn = flash_attention.flash_attn.flash_attn_with_kvcache
            flash_attention.flash_attn.flash_attn_with_kvcache = _rowwise_dispatch


def _sample(logits: torch.Tensor, seq: Sequence) -> int:
    """logits (1, vocab) -> token id, drawing from the request's own generator."""
    p = seq.params
    if p.top_p >= 1.0 or p.temperature == 0:
        return int(sample_next_token(logits, seq.rng, p.temperature, p.top_k)[0, 0])
    if p.top_k:
        vals, idx = torch.topk(logits, min(p.top_k, logits.size(-1)), dim=-1)
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(vals / p.temperature, dim=-1)
    keep = (probs.cumsum(-1) - probs) < p.top_p  # smallest prefix whose mass reaches top_p (always >= 1 token)
    probs = probs * keep
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), num_samples=1, generator=seq.rng)
    return int(idx.gather(1, choice)[0, 0])


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """logits (vocab,) -> (raw logprob of token, the k most likely (token, logprob) pairs)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        vals, idx = torch.topk(logp, k)
        top = list(zip(idx.tolist(), vals.tolist()))
    return float(logp[token]), top


class BatchScheduler:
    """Token-level continuous batching over one model. Thread model: submit()/cancel() from any thread; step() from
    one thread at a time (start() runs it in a daemon thread)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_waiting: int = 64,
                 max_seq_len: int | None = None, batch_invariant: bool | None = None, row_multiple: int = 8):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_seq_len = max_seq_len or model.config.sequence_len  # prompt + generated tokens per request
        self.batch_invariant = (self.device.type == "cpu") if batch_invariant is None else batch_invariant
        self.row_multiple = row_multiple if self.batch_invariant else 1
        if self.batch_invariant:
            _install_rowwise_attention()
        rows = -(-max_batch_size // self.row_multiple) * self.row_multiple
        self.capacity = self.max_seq_len
        cfg = model.config
        self._kv = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer,
                        device=self.device, dtype=COMPUTE_DTYPE)
        self.cache = KVCache(batch_size=rows, seq_len=self.capacity, **self._kv)
        self.cache.prev_embedding = torch.zeros(rows, 1, cfg.n_embd, device=self.device, dtype=COMPUTE_DTYPE)
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.waiting: deque[Sequence] = deque()
        self._engine = Engine(model, tokenizer)  # only for its tool state machine (_step_row)
        special = tokenizer.encode_special
        self._ids = {name: special(f"<|{name}|>") for name in
                     ("python_start", "python_end", "output_start", "output_end", "assistant_end")}
        self._ids["bos"] = tokenizer.get_bos_token_id()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread = None
        self._stop = False
        self.stats = {"requests_submitted": 0, "requests_finished": 0, "requests_cancelled": 0,
                      "tokens_generated": 0, "decode_steps": 0, "prefill_tokens": 0, "rejected_busy": 0}

    # ---------------------------------------------------------------- public API

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[TokenEvent], None] = lambda ev: None) -> Sequence:
        """Queue a request. Raises ValueError for a prompt that cannot fit, QueueFull when too many are waiting."""
        if not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the conversation is {len(prompt)} tokens but this server's context is "
                             f"{self.max_seq_len} tokens (prompt + reply); shorten it or start a new conversation")
        seq = Sequence(list(prompt), params, on_event, self.device)
        with self._lock:
            free_rows = self.max_batch_size - self.num_running()
            if len(self.waiting) >= free_rows + self.max_waiting:  # rows busy and the waiting line is full
                self.stats["rejected_busy"] += 1
                raise QueueFull(f"all {self.max_batch_size} batch rows are busy and {len(self.waiting)} requests "
                                "are waiting; retry later")
            self.waiting.append(seq)
            self.stats["requests_submitted"] += 1
            self._wake.notify()
        return seq

    def generate(self, prompt: list[int], params: SamplingParams) -> list[TokenEvent]:
        """Run one request to completion and return its events (drives step() itself unless the thread runs)."""
        events = []
        done = threading.Event()

        def collect(ev):
            events.append(ev)
            if ev.finish_reason is not None:
                done.set()

        self.submit(prompt, params, collect)
        if self._thread is None:
            while not done.is_set():
                self.step()
        else:
            done.wait()
        return events

    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    def snapshot(self) -> dict:
        """Counters and gauges for /stats and metrics (a stable interface: keys are only ever added)."""
        with self._lock:
            waiting = len(self.waiting)
        running = [s for s in self.slots if s is not None]
        kv_used = sum(len(s.prompt) + s.num_generated for s in running)  # tokens held for running requests
        return {**self.stats, "running": len(running), "waiting": waiting, "max_batch_size": self.max_batch_size,
                "kv_tokens_used": kv_used, "kv_tokens_capacity": self.max_batch_size * self.capacity,
                "prefix_cache_hit_tokens": 0,
                "max_waiting": self.max_waiting, "max_seq_len": self.max_seq_len, "batch_invariant": self.batch_invariant,
                "device": str(self.device), "thread_alive": self.is_alive(),
                "process_cpu_s": time.process_time()}  # lets benchmarks count tokens per CPU-second

    def start(self):
        """Run step() in a daemon thread until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nanochat-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # ---------------------------------------------------------------- the loop

    def _loop(self):
        while True:
            with self._lock:
                while not self._stop and not self.waiting and self.num_running() == 0:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # never let one bad step kill the replica's batcher: fail the running requests
                logger.exception("batch step failed; failing the running requests")
                for seq in [s for s in self.slots if s is not None]:
                    self._finish(seq, "error")

    @torch.inference_mode()
    def step(self) -> bool:
        """One token for every running request (and the first token for newly admitted ones). -> did any work."""
        for seq in self.slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
        admitted = self._admit()
        running = [s for s in self.slots if s is not None and s not in admitted]
        running += [s for s in admitted if not s.done]
        if running:
            self._decode(running)
        return bool(admitted or running)

    def _admit(self) -> list[Sequence]:
        admitted = []
        while True:
            free = next((i for i, s in enumerate(self.slots) if s is None), None)
            with self._lock:
                if free is None or not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
                continue
            single = KVCache(batch_size=1, seq_len=len(seq.prompt), **self._kv)
            ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
            logits = self.model.forward(ids, kv_cache=single)[:, -1, :]  # (1, vocab); alone, so batch-invariant
            self.stats["prefill_tokens"] += len(seq.prompt)
            self.cache.copy_row_from(free, single)
            seq.slot = free
            self.slots[free] = seq
            admitted.append(seq)
            self._emit(seq, _sample(logits, seq), logits)
        return admitted

    def _decode(self, running: list[Sequence]):
        m = max(s.slot for s in running) + 1
        m = -(-m // self.row_multiple) * self.row_multiple  # batch-invariant: a multiple of 8 rows (see above)
        tokens = torch.zeros(m, 1, dtype=torch.long)
        active = torch.zeros(m, dtype=torch.bool)
        for s in running:
            tokens[s.slot, 0] = s.last_token
            active[s.slot] = True
        lens = self.cache.cache_seqlens[:m]
        lens[~active.to(lens.device)] = 0  # dummy rows (free slots, padding): outputs unused
        view = _RowsView(self.cache, m)
        if self.batch_invariant:
            _tls.rows = sorted(s.slot for s in running)
        try:
            logits = self.model.forward(tokens.to(self.device), kv_cache=view)[:, -1, :]  # (m, vocab)
        finally:
            _tls.rows = None
        self.cache.prev_embedding[:m] = view.prev_embedding
        self.stats["decode_steps"] += 1
        for s in running:
            row = logits[s.slot:s.slot + 1]
            self._emit(s, _sample(row, s), row)

    def _emit(self, seq: Sequence, sampled: int, logits: torch.Tensor):
        """Apply the tool state machine to a sampled token, report it, and retire the row if it is done.
        logits: (1, vocab), the row's logits at this position (for logprobs)."""
        token, mask = self._engine._step_row(seq.state, sampled, self._ids)
        event = TokenEvent(token, bool(mask))
        if seq.params.logprobs is not None:
            event.logprob, event.top_logprobs = _logprobs(logits[0], token, seq.params.logprobs)
        seq.num_generated += 1
        seq.last_token = token
        self.stats["tokens_generated"] += 1
        finish = None
        if seq.state.completed:
            finish = FINISH_STOP
        elif seq.num_generated >= seq.params.max_tokens or len(seq.prompt) + seq.num_generated >= self.max_seq_len:
            finish = FINISH_LENGTH
        if finish is not None:
            seq.finish_reason = finish
            self._release(seq)
            self.stats["requests_finished"] += 1
        event.finish_reason = finish
        self._call(seq, event)

    def _finish(self, seq: Sequence, reason: str):
        """End a request without a token (cancelled, or the step failed)."""
        if seq.done:
            return
        seq.finish_reason = reason
        self._release(seq)
        self.stats["requests_cancelled" if reason == FINISH_CANCELLED else "requests_finished"] += 1
        self._call(seq, TokenEvent(-1, False, reason))

    def _release(self, seq: Sequence):
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None

    @staticmethod
    def _call(seq, event):
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the other rows
            logger.exception("on_event callback failed")


class QueueFull(RuntimeError):
    """Too many requests waiting for a batch slot (HTTP 503 + Retry-After)."""
