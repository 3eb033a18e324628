"""
One loaded checkpoint inside an engine replica: its model, tokenizer and BatchScheduler, prompt scoring (the
log-probabilities of prompt tokens, for `echo`), and the event stream of one engine request.

    model = LoadedModel("sft", checkpoint_dir, step, device, settings)
    async for event in model.generate(payload, metrics): ...       # payload = one of serve.protocol.engine_requests
    model.retire()                                                  # stop the scheduler once running requests end

Events (the ingress turns them into HTTP/SSE; see serve.api):

    {"type": "start", "replica", "device", "model", "prompt_tokens": n, "seed", "echo": {...} | None}   or instead
    {"type": "error", "status": 400|404|503, "message": "..."}                                           (then nothing)
    {"type": "delta", "text": "...", "tokens": k, "logprobs": [entry, ...] | None}    text never splits a character
    {"type": "end", "finish_reason": "stop"|"length", "prompt_tokens": n, "completion_tokens": m}

A logprob entry is {"token": str, "bytes": bytes, "logprob": float | None, "offset": int,
"top": [(token str, bytes, logprob), ...]}: the model's raw log-probabilities (log_softmax of its logits, before
temperature/top-k/top-p), `offset` = where the token's text starts in the choice's text. Token strings are the
text of the token, its special-token name, or "bytes:\\xNN..." when the token is not whole UTF-8 (OpenAI's
convention). `echo` = {"text": prompt text, "logprobs": [entry per prompt token]}; a text prompt's first token is
scored after <|bos|> (which the text does not show), a token-id prompt's first token has logprob None.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import torch

from nanochat.checkpoint_manager import build_model
from serve.batching import FINISH_CANCELLED, BatchScheduler, QueueFull, SamplingParams
from serve.protocol import TOOL_TEXT, TextStream, render_prompt

SCORE_CHUNK = 256  # prompt positions per log_softmax when scoring (bounds the (T, vocab) temporaries)
# serve.protocol.render_prompt as a Jinja chat template (for /tokenizer_info; its output tokenizes to the same ids)
CHAT_TEMPLATE = ("<|bos|>{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant_start|>{{ m['content'] }}"
                 "<|assistant_end|>{% else %}<|user_start|>{{ m['content'] }}<|user_end|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant_start|>{% endif %}")


class LoadedModel:
    """A checkpoint with its own scheduler. Thread model: generate() on the replica's event loop, the scheduler in
    its own thread, prompt scoring in a worker thread (one at a time per model)."""

    def __init__(self, name: str, checkpoint_dir: str, step: int, device: torch.device, settings: dict,
                 replica: str = "local"):
        self.name, self.replica, self.device = name, replica, device
        self.loaded_at = time.time()
        model, self.tokenizer, meta = build_model(checkpoint_dir, step, device, "eval")
        self.model = model
        self.model_config = meta.get("model_config", {})
        self.checkpoint = {"dir": checkpoint_dir, "step": step}
        self.scheduler = BatchScheduler(model, self.tokenizer, max_batch_size=settings.get("max_batch_size", 16),
                                        max_waiting=settings.get("max_waiting", 64),
                                        max_seq_len=settings.get("max_seq_len"),
                                        batch_invariant=settings.get("batch_invariant")).start()
        tok = self.tokenizer
        self.special = {tok.encode_special(s): s for s in tok.get_special_tokens()}
        self.vocab_size = tok.get_vocab_size()
        self._strings: dict[int, tuple[str, bytes]] = {}
        self._score_lock = threading.Lock()
        self.active = 0  # requests being streamed right now
        self.retired = False

    # ------------------------------------------------------------------ lifecycle

    def retire(self):
        """No new requests; the scheduler stops as soon as the running ones have ended (an evicted model may still
        be streaming). Idempotent (the multiplexer calls __del__, and so does the garbage collector)."""
        self.retired = True
        if self.active == 0:
            self.scheduler.stop()

    def __del__(self):
        if getattr(self, "scheduler", None) is not None:
            self.retire()

    def snapshot(self) -> dict:
        return {**self.scheduler.snapshot(), "model": self.name, "checkpoint": self.checkpoint,
                "model_config": self.model_config, "active_streams": self.active}

    # ------------------------------------------------------------------ tokens and log-probabilities

    def token_str(self, token: int) -> tuple[str, bytes]:
        """(display string, UTF-8 bytes) of one token; see the module docstring."""
        hit = self._strings.get(token)
        if hit is None:
            if token in self.special:
                hit = (self.special[token], self.special[token].encode())
            else:
                raw = self.tokenizer.decode_single_token_bytes(token)
                try:
                    hit = (raw.decode("utf-8"), raw)
                except UnicodeDecodeError:
                    hit = ("bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw)
            self._strings[token] = hit
        return hit

    def entry(self, token: int, logprob: float | None, top, offset: int) -> dict:
        text, raw = self.token_str(token)
        return {"token": text, "bytes": raw, "logprob": logprob, "offset": offset,
                "top": None if top is None else [(*self.token_str(t), lp) for t, lp in top]}

    @torch.inference_mode()
    def score(self, ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """(raw logprob of ids[j] given ids[:j], its k most likely alternatives) for j = 1..len(ids)-1: one forward
        pass over the prompt, without the KV cache or the scheduler."""
        with self._score_lock:
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model.forward(x)[0]  # (T, vocab), fp32
            out = []
            for s in range(0, len(ids) - 1, SCORE_CHUNK):
                logp = torch.log_softmax(logits[s:s + SCORE_CHUNK].float(), dim=-1)[:len(ids) - 1 - s]
                nxt = torch.tensor(ids[s + 1:s + 1 + logp.size(0)], device=self.device)
                chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
                if k:
                    vals, idx = torch.topk(logp, k, dim=-1)
                    tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
                else:
                    tops = [[] for _ in chosen]
                out += list(zip(chosen, tops))
            return out

    def _echo(self, ids: list[int], kind: str, k: int | None) -> dict:
        """The prompt as text and (if k is not None) the log-probability entry of each of its tokens."""
        shown = ids[1:] if kind == "text" else ids  # a text prompt's <|bos|> is ours, not part of its text
        stream = TextStream(self.tokenizer)
        offsets, text = [], ""
        for t in shown:
            offsets.append(len(text))
            text += self.special[t] if t in self.special else stream.push(t)
        text += stream.flush()
        entries = None
        if k is not None:
            scored = self.score(ids, k) if len(ids) > 1 else []
            if kind != "text":
                scored = [(None, None)] + scored
            entries = [self.entry(t, lp, top, o) for t, (lp, top), o in zip(shown, scored, offsets)]
        return {"text": text, "logprobs": entries}

    def tokenizer_call(self, op: str, arg=None):
        """The tokenizer endpoints: op "info" | "tokenize" (special-token strings become their ids, as a chat
        template's output needs) | "detokenize". ValueError for token ids outside the vocabulary."""
        tok = self.tokenizer
        if op == "tokenize":
            return tok.enc.encode(arg, allowed_special="all")
        if op == "detokenize":
            bad = next((t for t in arg if t >= self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is out of range; this model's vocabulary is 0..{self.vocab_size - 1}")
            return tok.decode(arg)
        bos = self.special[tok.get_bos_token_id()]
        return {"tokenizer_class": "nanochat", "bos_token": bos, "eos_token": bos, "pad_token": None,
                "model_max_length": self.scheduler.max_seq_len, "vocab_size": self.vocab_size,
                "chat_template": CHAT_TEMPLATE}

    # ------------------------------------------------------------------ requests

    def prompt_ids(self, payload: dict) -> list[int]:
        kind, prompt = payload["kind"], payload["prompt"]
        if kind == "chat":
            return render_prompt(self.tokenizer, prompt)
        if kind == "text":
            return [self.tokenizer.get_bos_token_id()] + self.tokenizer.encode(prompt)
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is out of range; this model's vocabulary is 0..{self.vocab_size - 1}")
        return list(prompt)

    def _keep(self, token: int, raw: bool) -> bool:
        """Does a generated token get a logprob entry? Completions: every token; chat: those that show in the text
        (ordinary tokens and tool-call tokens), not <|assistant_end|> and the like."""
        return raw or token not in self.special or self.special[token] in TOOL_TEXT

    async def generate(self, payload: dict, metrics=None):
        """Yields the events of one engine request (module docstring). metrics: serve.metrics.ServeMetrics."""
        t_arrival = time.perf_counter()
        try:
            prompt = self.prompt_ids(payload)
            if len(prompt) >= self.scheduler.max_seq_len:
                raise ValueError(f"the prompt is {len(prompt)} tokens but this server's context is "
                                 f"{self.scheduler.max_seq_len} tokens (prompt + reply); shorten it")
        except Exception as e:  # tokenizer trouble with odd input is the client's problem
            yield {"type": "error", "status": 400, "message": f"could not tokenize the prompt: {e}"}
            return
        k, raw = payload.get("logprobs"), payload["kind"] != "chat"
        seed = payload["seed"] if payload.get("seed") is not None else random.randint(0, 2**31 - 1)
        start = {"type": "start", "replica": self.replica, "device": str(self.device), "model": self.name,
                 "prompt_tokens": len(prompt), "seed": seed, "echo": None}
        self.active += 1
        try:
            if payload.get("echo"):
                start["echo"] = await asyncio.to_thread(self._echo, prompt, payload["kind"], k)
            if payload["max_tokens"] == 0:  # scoring only
                yield start
                yield {"type": "end", "finish_reason": "length", "prompt_tokens": len(prompt),
                       "completion_tokens": 0}
                return
            async for ev in self._sample(prompt, payload, seed, k, raw, start, t_arrival, metrics):
                yield ev
        finally:
            self.active -= 1
            if self.retired and self.active == 0:
                self.scheduler.stop()

    async def _sample(self, prompt, payload, seed, k, raw, start, t_arrival, metrics):
        params = SamplingParams(max_tokens=payload["max_tokens"], temperature=payload["temperature"],
                                top_k=payload["top_k"] or None, top_p=payload["top_p"], seed=seed, logprobs=k)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            seq = self.scheduler.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except QueueFull as e:
            yield {"type": "error", "status": 503, "message": f"server busy: {e}"}
            return
        except ValueError as e:
            yield {"type": "error", "status": 400, "message": str(e)}
            return
        stream = TextStream(self.tokenizer, stop=payload["stop"], raw=raw)
        finish, completion, first_at, last_at = None, 0, None, None
        pending = []  # (text offset, logprob entry) not yet handed out (their text may be held back)
        try:
            yield start
            while finish is None:
                events = [await queue.get()]
                while not queue.empty():  # drain: under load one chunk may carry several tokens
                    events.append(queue.get_nowait())
                text = ""
                for ev in events:
                    if ev.token >= 0:
                        completion += 1
                        last_at = time.perf_counter()
                        first_at = first_at or last_at
                        offset = len(stream.text)
                        text += stream.push(ev.token)
                        if k is not None and self._keep(ev.token, raw):
                            pending.append((offset, self.entry(ev.token, ev.logprob, ev.top_logprobs, offset)))
                    if ev.finish_reason is not None:
                        finish = ev.finish_reason
                if stream.stopped and finish is None:  # a stop string matched: free the row now
                    seq.cancel()
                    finish = "stop"
                if finish is not None:
                    text += stream.flush()
                done = finish is not None and not stream.stopped
                released = [e for o, e in pending if o < stream.sent or done]
                pending = [(o, e) for o, e in pending if not (o < stream.sent or done)]
                if text or released:
                    yield {"type": "delta", "text": text, "tokens": len(events), "logprobs": released or None}
                if metrics is not None:
                    metrics.add_tokens(self.name, sum(ev.token >= 0 for ev in events))
            if finish == "error" or finish == FINISH_CANCELLED:
                yield {"type": "error", "status": 500, "message": "generation failed on the engine"}
                return
            if metrics is not None and first_at is not None:
                metrics.observe_request(self.name, first_at - t_arrival,
                                        (last_at - first_at) / (completion - 1) if completion > 1 else None)
            yield {"type": "end", "finish_reason": "stop" if stream.stopped else finish,
                   "prompt_tokens": len(prompt), "completion_tokens": completion}
        finally:
            seq.cancel()  # no-op when finished; frees the batch slot when the consumer went away
