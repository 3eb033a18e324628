"""
Continuous batching for nanochat's GPT: many requests share one KV cache and one forward pass per token.

    sched = BatchScheduler(model, tokenizer, max_batch_size=16)
    sched.start()                                       # background thread; or call sched.step() yourself
    seq = sched.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, top_k=50, seed=1),
                       on_event=lambda ev: ...)         # TokenEvent per token, from the scheduler thread
    tokens = sched.generate(prompt_ids, SamplingParams(...))   # blocking convenience: list of TokenEvents

Pure PyTorch (no Ray), so it is testable and usable in-process (serve.chat_cli). serve.engine_deployment wraps it.

A request's life: WAITING (in the queue) -> PREFILLING (holds a batch row and a staging row) -> DECODING -> done.
One step():
  1. Cancelled requests leave. Waiting requests join while batch rows and staging rows are free; each first takes
     the longest cached prefix of its prompt from the prefix cache (serve.prefix_cache: whole blocks of
     `prefix_block` tokens), so a conversation's next turn, or a shared system prompt, is not prefilled again.
  2. Prefill, at most `prefill_chunk` prompt tokens per step in all (chunked prefill: a long prompt takes several
     steps, so running requests keep getting a token every step while it joins). Requests prefilling at the same time
     share one forward pass (their chunks padded to one length), except in batch-invariant mode (below). When a
     prompt is done its first token is sampled from the last chunk's logits, its whole blocks go into the prefix
     cache, and its staging row is copied into its batch row.
  3. One decode forward for every decoding row, each at its own position, then sampling and the calculator tool
     state machine (nanochat.engine's, so forced tool output behaves exactly as in Engine.generate). A row leaves
     when it emits <|assistant_end|>/<|bos|> or hits its token budget.

Two decode paths:
- static (default on CUDA): nanochat.static_decode's fixed-shape step (batch padded to a row bucket, attention over a
  key bucket of a fixed-capacity cache), replayed as a CUDA graph, with the whole batch sampled on the device
  (serve.sampling.BatchSampler: temperature/top-k/top-p/seed/forced token as tensors) and ONE host transfer per step.
  Bit stability on a GPU: a replay is exactly its captured step, and a row's sampling noise depends only on its seed
  and sample count; but a row's logits (so possibly its tokens) can change with the batch's row bucket and key bucket
  (cuBLAS/attention kernels are chosen by shape), as in any batched GPU inference.
- dynamic (default on CPU): per-row sampling with a torch.Generator per request (serve.sampling.sample_row).

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
threads and every other caller are untouched). Prefill runs each request ALONE, in chunks of exactly one block cut at
multiples of `prefix_block` from position 0, so a request's prefill computes the same chunks whether or not its
first blocks came from the prefix cache: a reused prefix gives bit-identical tokens (tests/test_serve_batching.py).
Cost: up to 7 dummy rows in the matmuls, one small attention call per row and layer, one forward per prompt block.
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

from nanochat import flash_attention
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine, KVCache, RowState
from nanochat.gpt import norm
from nanochat.static_decode import StaticDecoder
from serve.prefix_cache import PrefixCache
from serve.sampling import MAX_LOGPROBS, BatchSampler, row_logprobs, sample_batch, sample_row, unpack_logprobs

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"  # the model ended its turn (<|assistant_end|> or <|bos|>), or a stop string matched
FINISH_LENGTH = "length"  # max_tokens reached, or the row filled the cache (max_seq_len)
FINISH_CANCELLED = "cancelled"
__all__ = ["BatchScheduler", "SamplingParams", "TokenEvent", "Sequence", "QueueFull", "MAX_LOGPROBS",
           "FINISH_STOP", "FINISH_LENGTH", "FINISH_CANCELLED"]


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

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None], device,
                 use_generator: bool):
        self.prompt = prompt
        self.params = params
        self.on_event = on_event
        self.rng = None
        if use_generator:  # per-row sampling; the batched sampler derives its noise from the seed instead
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(params.seed)
        self.state = RowState(list(prompt))
        self.num_generated = 0
        self.last_token = None
        self.slot = None  # row in the decode batch (held from admission on)
        self.stage = None  # row in the staging cache while prefilling
        self.prefilled = 0  # prompt tokens whose k/v are in the staging row
        self.prefix_hit = 0  # of those, tokens restored from the prefix cache
        self.finish_reason = None
        self.cancelled = False
        self.submitted_at = time.monotonic()

    def cancel(self):
        self.cancelled = True

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def decoding(self):
        return self.slot is not None and self.stage is None and not self.done


class _Rows:
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
# it defers to the original unless THIS thread is inside a batch-invariant decode step (_tls.rows is set).
_tls = threading.local()
_original_attn = None
_install_lock = threading.Lock()


def _rowwise_dispatch(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False, window_size=(-1, -1),
                      **kw):
    rows = getattr(_tls, "rows", None)
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


def _install_rowwise_attention():
    global _original_attn
    with _install_lock:
        if _original_attn is None:
            _original_attn = flash_attention.flash_attn.flash_attn_with_kvcache
            flash_attention.flash_attn.flash_attn_with_kvcache = _rowwise_dispatch


class BatchScheduler:
    """Token-level continuous batching over one model. Thread model: submit()/cancel() from any thread; step() from
    one thread at a time (start() runs it in a daemon thread). On CUDA the scheduler owns the model for inference:
    its Linear weights are cast to the compute dtype once (the same numbers the per-call cast produced)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_waiting: int = 64,
                 max_seq_len: int | None = None, batch_invariant: bool | None = None, row_multiple: int = 8, *,
                 static: bool | None = None, prefill_chunk: int | None = None, prefill_rows: int | None = None,
                 prefix_block: int = 32, prefix_cache_tokens: int | None = None):
        """static: fixed-shape decode + batched device sampling (CUDA graphs on CUDA); None = on CUDA.
        batch_invariant: None = on CPU unless static. prefill_chunk: prompt tokens prefilled per step in all
        (None: 512 on CPU; 2048 on CUDA, where an eager prefill forward costs about as much launching kernels as
        computing, so a burst of arrivals is best prefilled in few forwards). prefill_rows: requests prefilling at
        once (None: min(8, max_batch_size) on CPU, min(16, max_batch_size) on CUDA).
        prefix_block: prefix-cache granularity in tokens. prefix_cache_tokens: its size (None: max_batch_size *
        max_seq_len tokens, as much KV as the batch; 0 = off)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        cuda = model.get_device().type == "cuda"
        prefill_chunk = prefill_chunk or (2048 if cuda else 512)
        if prefill_chunk < 1 or prefix_block < 1:
            raise ValueError(f"prefill_chunk and prefix_block must be >= 1, got {prefill_chunk}, {prefix_block}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_seq_len = max_seq_len or model.config.sequence_len  # prompt + generated tokens per request
        self.static = cuda if static is None else static
        self.batch_invariant = (self.device.type == "cpu" and not self.static) if batch_invariant is None \
            else batch_invariant
        if self.static and self.batch_invariant:
            raise ValueError("static=True (fixed-shape decode) cannot be batch-invariant; pass batch_invariant=False")
        self.row_multiple = row_multiple if self.batch_invariant else 1
        if self.batch_invariant:
            _install_rowwise_attention()
        if cuda:
            _cast_linear_weights(model)
        rows = -(-max_batch_size // self.row_multiple) * self.row_multiple
        self.capacity = self.max_seq_len
        cfg = model.config
        self._kv = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer,
                        device=self.device, dtype=COMPUTE_DTYPE)
        self.sampler = self.decoder = None
        if self.static:
            self.sampler = BatchSampler(rows, cfg.vocab_size, self.device)
            self.decoder = StaticDecoder(model, rows, self.capacity, post=self.sampler)
            self.cache = self.decoder.cache
        else:
            self.cache = KVCache(batch_size=rows, seq_len=self.capacity, **self._kv)
            self.cache.prev_embedding = torch.zeros(rows, 1, cfg.n_embd, device=self.device, dtype=COMPUTE_DTYPE)
        # Prefill happens in a staging cache (a request's rows are copied into the batch when its prompt is done).
        self.prefill_chunk, self.prefix_block = prefill_chunk, prefix_block
        self.prefill_rows = prefill_rows or min(16 if cuda else 8, max_batch_size)
        self.staging = KVCache(batch_size=self.prefill_rows, seq_len=self.capacity, host_lengths=True, **self._kv)
        self.staging.prev_embedding = torch.zeros(self.prefill_rows, 1, cfg.n_embd, device=self.device,
                                                  dtype=COMPUTE_DTYPE)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = max_batch_size * self.max_seq_len
        blocks = prefix_cache_tokens // prefix_block
        self.prefix_cache = PrefixCache(blocks, prefix_block, like=self.cache) if blocks > 0 else None
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.stages: list[Sequence | None] = [None] * self.prefill_rows
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
                      "tokens_generated": 0, "decode_steps": 0, "prefill_tokens": 0, "prefill_forwards": 0,
                      "rejected_busy": 0, "prefix_cache_hit_tokens": 0, "prefix_cache_lookup_tokens": 0}

    # ---------------------------------------------------------------- public API

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[TokenEvent], None] = lambda ev: None) -> Sequence:
        """Queue a request. Raises ValueError for a prompt that cannot fit, QueueFull when too many are waiting."""
        if not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the conversation is {len(prompt)} tokens but this server's context is "
                             f"{self.max_seq_len} tokens (prompt + reply); shorten it or start a new conversation")
        seq = Sequence(list(prompt), params, on_event, self.device, use_generator=not self.static)
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
        """Requests holding a batch row (prefilling or decoding)."""
        return sum(s is not None for s in self.slots)

    def snapshot(self) -> dict:
        """Counters and gauges for /stats and metrics (a stable interface: keys are only ever added)."""
        with self._lock:
            waiting = len(self.waiting)
        running = [s for s in self.slots if s is not None]
        kv_used = sum(len(s.prompt) + s.num_generated for s in running)  # tokens held for running requests
        pc = self.prefix_cache
        return {**self.stats, "running": len(running), "waiting": waiting,
                "prefilling": sum(s is not None for s in self.stages), "max_batch_size": self.max_batch_size,
                "kv_tokens_used": kv_used, "kv_tokens_capacity": self.max_batch_size * self.capacity,
                "prefix_cache_blocks": len(pc) if pc else 0, "prefix_cache_capacity_blocks": pc.num_blocks if pc else 0,
                "prefix_cache_block_tokens": self.prefix_block, "prefix_cache_evictions": pc.evictions if pc else 0,
                "max_waiting": self.max_waiting, "max_seq_len": self.max_seq_len, "batch_invariant": self.batch_invariant,
                "static_decode": self.static, "cuda_graphs": bool(self.decoder and self.decoder.use_graphs),
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
        """Admit, prefill up to prefill_chunk prompt tokens, decode one token for every decoding row. -> any work."""
        for seq in self.slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
        admitted = self._admit()
        prefilled = self._prefill()
        running = [s for s in self.slots if s is not None and s.decoding and s not in prefilled]
        running += [s for s in prefilled if s.decoding]  # a finished prompt decodes in the same step
        if running:
            self._decode(running) if self.static else self._decode_dynamic(running)
        return bool(admitted or prefilled or running or any(s is not None for s in self.stages))

    # ---------------------------------------------------------------- admission and prefill

    def _admit(self) -> list[Sequence]:
        admitted = []
        while True:
            free = next((i for i, s in enumerate(self.slots) if s is None), None)
            stage = next((i for i, s in enumerate(self.stages) if s is None), None)
            with self._lock:
                if free is None or stage is None or not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                self._finish(seq, FINISH_CANCELLED)
                continue
            seq.slot, seq.stage = free, stage
            self.slots[free], self.stages[stage] = seq, seq
            self._restore_prefix(seq)
            admitted.append(seq)
        return admitted

    def _restore_prefix(self, seq: Sequence):
        """Start the staging row with the longest cached prefix (at least one prompt token is left to compute:
        the first token is sampled from the last prompt position's logits)."""
        row, h = seq.stage, 0
        self.stats["prefix_cache_lookup_tokens"] += len(seq.prompt)
        if self.prefix_cache is not None:
            chain = self.prefix_cache.lookup(seq.prompt)[:(len(seq.prompt) - 1) // self.prefix_block]
            h = len(chain) * self.prefix_block
            self.prefix_cache.restore(chain, self.staging, row)
        self._set_stage_lengths(row, [h])
        if h:  # the smear input after the prefix: the normalized embedding of its last token (as gpt.py computes it)
            ids = torch.tensor([[seq.prompt[h - 1]]], device=self.device)
            self.staging.prev_embedding[row] = norm(self.model.transformer.wte(ids).to(COMPUTE_DTYPE))[0]
        seq.prefilled = seq.prefix_hit = h
        self.stats["prefix_cache_hit_tokens"] += h

    def _prefill(self) -> list[Sequence]:
        """Spend the step's prefill budget; returns the requests whose prompt finished (first token emitted)."""
        budget, finished = self.prefill_chunk, []
        order = sorted((s for s in self.stages if s is not None), key=lambda s: s.submitted_at)
        if self.batch_invariant:  # each request alone, one block per forward (see the module docstring)
            for seq in order:
                while budget > 0 and seq.prefilled < len(seq.prompt):
                    start = seq.prefilled
                    end = min(len(seq.prompt), (start // self.prefix_block + 1) * self.prefix_block)
                    logits = self._prefill_forward([(seq, start, end)])
                    budget -= end - start
                if seq.prefilled == len(seq.prompt):
                    finished.append((seq, logits[0]))
                if budget <= 0:
                    break
        else:  # every prefilling request's next chunk in one forward pass
            chunks = []
            for seq in order:
                if budget <= 0:
                    break
                end = min(len(seq.prompt), seq.prefilled + budget)
                chunks.append((seq, seq.prefilled, end))
                budget -= end - seq.prefilled
            # Chunks are padded to the longest; a row whose padding would run past the cache goes alone.
            T = max((end - start for _, start, end in chunks), default=0)
            alone = [c for c in chunks if c[1] + T > self.staging.max_seq_len]
            groups = [[c for c in chunks if c not in alone]] + [[c] for c in alone]
            for group in groups:
                if group:
                    logits = self._prefill_forward(group)
                    finished += [(seq, lg) for (seq, _, end), lg in zip(group, logits) if end == len(seq.prompt)]
        self._complete_prefills(finished)
        return [seq for seq, _ in finished]

    def _prefill_forward(self, chunks) -> list[torch.Tensor]:
        """One forward over staging rows for chunks [(seq, start, end)]; returns each chunk's last logits (vocab,)."""
        rows = [seq.stage for seq, _, _ in chunks]
        a, b = min(rows), max(rows) + 1
        T = max(end - start for _, start, end in chunks)
        ids = torch.zeros(b - a, T, dtype=torch.long)
        starts, ends = [0] * (b - a), [0] * (b - a)  # idle rows in between: a dummy chunk at position 0
        for seq, start, end in chunks:
            part = seq.prompt[start:end]
            # pad with the last token: the padded positions' k/v lie past the row's end (overwritten later) and the
            # smear state the model keeps (the last position's embedding) is then the real last token's
            ids[seq.stage - a] = torch.tensor(part + [part[-1]] * (T - len(part)))
            starts[seq.stage - a], ends[seq.stage - a] = start, end
        self._set_stage_lengths(a, starts)
        view = _Rows(self.staging, a, b)
        logits = self.model.forward(ids.to(self.device), kv_cache=view)  # (b - a, T, vocab)
        view.sync()
        self._set_stage_lengths(a, ends)  # real lengths (the forward advanced every row by T)
        self.stats["prefill_tokens"] += sum(end - start for _, start, end in chunks)
        self.stats["prefill_forwards"] += 1
        out = []
        for seq, start, end in chunks:
            seq.prefilled = end
            out.append(logits[seq.stage - a, end - start - 1])
        return out

    def _set_stage_lengths(self, a: int, lens: list[int]):
        self.staging.host_seqlens[a:a + len(lens)] = lens
        self.staging.cache_seqlens[a:a + len(lens)] = torch.tensor(lens, dtype=torch.int32)

    def _complete_prefills(self, finished):
        """Prompts done: store their blocks, move their rows into the batch, emit their first tokens."""
        if not finished:
            return
        for seq, _ in finished:
            n, row = len(seq.prompt), seq.stage
            if self.prefix_cache is not None:
                self.prefix_cache.insert(seq.prompt, self.staging, row)
            self.cache.k_cache[:, seq.slot, :n] = self.staging.k_cache[:, row, :n]
            self.cache.v_cache[:, seq.slot, :n] = self.staging.v_cache[:, row, :n]
            self.cache.cache_seqlens[seq.slot] = n
            self.cache.prev_embedding[seq.slot] = self.staging.prev_embedding[row]
            self.stages[row], seq.stage = None, None
        if self.static:  # sample the first tokens on the device, one transfer
            logits = torch.stack([lg for _, lg in finished])
            rows = [BatchSampler.row_values(seq.params, 0, self._forced(seq)) for seq, _ in finished]
            ints = torch.tensor([r[0] for r in rows], device=self.device)
            floats = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=self.device)
            res = sample_batch(logits, floats[:, 0], ints[:, 0], floats[:, 1], ints[:, 1], ints[:, 2], ints[:, 3],
                               ints[:, 4], self.sampler.token_hash).cpu().tolist()
            for (seq, _), r in zip(finished, res):
                self._emit(seq, int(r[0]), packed=r)
        else:
            for seq, lg in finished:
                self._emit(seq, sample_row(lg[None], seq.params, seq.rng), logits=lg)

    # ---------------------------------------------------------------- decode

    def _decode_dynamic(self, running: list[Sequence]):
        m = max(s.slot for s in running) + 1
        m = -(-m // self.row_multiple) * self.row_multiple  # batch-invariant: a multiple of 8 rows (see above)
        tokens = torch.zeros(m, 1, dtype=torch.long)
        active = torch.zeros(m, dtype=torch.bool)
        for s in running:
            tokens[s.slot, 0] = s.last_token
            active[s.slot] = True
        lens = self.cache.cache_seqlens[:m]
        lens[~active.to(lens.device)] = 0  # dummy rows (free slots, padding): outputs unused
        view = _Rows(self.cache, 0, m)
        if self.batch_invariant:
            _tls.rows = sorted(s.slot for s in running)
        try:
            logits = self.model.forward(tokens.to(self.device), kv_cache=view)[:, -1, :]  # (m, vocab)
        finally:
            _tls.rows = None
        view.sync()
        self.stats["decode_steps"] += 1
        for s in running:
            row = logits[s.slot]
            self._emit(s, sample_row(row[None], s.params, s.rng), logits=row)

    def _decode(self, running: list[Sequence]):
        """Static path: fill the decoder's input buffers, one (graph) step, one host transfer for all rows."""
        m = max(s.slot for s in running) + 1
        tokens, lens = [0] * m, [0] * m
        ints, floats = [[0] * 6] * m, [[0.0, 1.0]] * m  # idle rows: greedy, nothing forced
        for s in running:
            tokens[s.slot] = s.last_token
            lens[s.slot] = len(s.prompt) + s.num_generated - 1  # tokens in the cache before this step
            ints[s.slot], floats[s.slot] = BatchSampler.row_values(s.params, s.num_generated, self._forced(s))
        self.decoder.tokens[:m, 0].copy_(torch.tensor(tokens))
        self.cache.cache_seqlens[:m].copy_(torch.tensor(lens, dtype=torch.int32))
        self.sampler.set_rows(ints, floats)
        res = self.decoder.step(m, max(lens))[:m].cpu().tolist()  # the step's one device->host transfer
        self.stats["decode_steps"] += 1
        for s in running:
            self._emit(s, int(res[s.slot][0]), packed=res[s.slot])

    @staticmethod
    def _forced(seq: Sequence) -> int:
        return seq.state.forced_tokens[0] if seq.state.forced_tokens else -1

    # ---------------------------------------------------------------- events

    def _emit(self, seq: Sequence, sampled: int, logits: torch.Tensor | None = None, packed: list | None = None):
        """Apply the tool state machine to a sampled token, report it, and retire the row if it is done.
        logits: (vocab,), the row's logits at this position (per-row path); packed: the batched sampler's row."""
        token, mask = self._engine._step_row(seq.state, sampled, self._ids)
        event = TokenEvent(token, bool(mask))
        k = seq.params.logprobs
        if k is not None:
            event.logprob, event.top_logprobs = row_logprobs(logits, token, k) if packed is None \
                else unpack_logprobs(packed, k)
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
        if seq.stage is not None:
            self.stages[seq.stage] = None
            seq.stage = None

    @staticmethod
    def _call(seq, event):
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the other rows
            logger.exception("on_event callback failed")


def _cast_linear_weights(model):
    """Store every Linear weight in the compute dtype (gpt.Linear casts per call otherwise: a weight-sized copy per
    layer per step). Inference only: the model must not be trained afterwards."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != COMPUTE_DTYPE:
            module.weight.data = module.weight.data.to(COMPUTE_DTYPE)


class QueueFull(RuntimeError):
    """Too many requests waiting for a batch slot (HTTP 503 + Retry-After)."""
