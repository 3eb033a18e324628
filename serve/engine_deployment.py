"""
The Ray Serve engine deployment: one model per replica, requests batched token by token (serve.batching).

Each replica loads a checkpoint (`load_model(source, device, "eval", model_tag, step)`, base dir local or s3://),
starts a BatchScheduler thread, and serves `generate(request)` as an async generator of small dict events:

    {"type": "start", "replica": <actor name>, "device": "cpu", "prompt_tokens": n}      first, or instead:
    {"type": "error", "status": 400|503, "message": "..."}                               (then nothing else)
    {"type": "delta", "text": "...", "tokens": k}                                         text never splits a char
    {"type": "end", "finish_reason": "stop"|"length", "prompt_tokens": n, "completion_tokens": m}

Deciding the HTTP status from the first event lets the ingress answer 400/503 before it starts a stream. If the
consumer goes away (client disconnect, cancellation) the request leaves the batch at the next token boundary.
Built into an application by serve.app; not meant to be run directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import torch
from ray import serve

from nanochat.checkpoint_manager import load_model
from nanochat.common import NanochatError
from serve.batching import FINISH_CANCELLED, BatchScheduler, QueueFull, SamplingParams
from serve.protocol import ChatRequest, TextStream, render_prompt

logger = logging.getLogger("ray.serve")
REPLICA_FAILED = "engine replica cannot start: "  # prefix of a load error in the deployment's status message


def pick_device(device_type: str) -> torch.device:
    if device_type in ("", None):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but this replica sees no GPU; give replicas GPUs (num_gpus) or use cpu")
    return torch.device(device_type)


class NanochatEngine:
    """One model replica. `settings` is serve.app.ChatAppArgs as a dict (only the engine keys are read)."""

    def __init__(self, settings: dict):
        if settings.get("base_dir"):
            os.environ["NANOCHAT_BASE_DIR"] = settings["base_dir"]
        if settings.get("torch_threads"):
            torch.set_num_threads(int(settings["torch_threads"]))
        self.device = pick_device(settings.get("device_type", ""))
        t0 = time.time()
        try:
            model, self.tokenizer, meta = load_model(settings.get("source", "sft"), self.device, phase="eval",
                                                     model_tag=settings.get("model_tag"), step=settings.get("step"))
        except NanochatError as e:  # one line in Serve's deployment status (and chat_web's error), no torch frames
            raise NanochatError(f"{REPLICA_FAILED}{e}") from None
        self.model_config = meta.get("model_config", {})
        self.scheduler = BatchScheduler(model, self.tokenizer, max_batch_size=settings.get("max_batch_size", 16),
                                        max_waiting=settings.get("max_waiting", 64),
                                        max_seq_len=settings.get("max_seq_len"),
                                        batch_invariant=settings.get("batch_invariant")).start()
        try:
            import ray

            self.name = ray.get_runtime_context().get_actor_name() or "local"
        except Exception:  # outside Ray (unit use)
            self.name = "local"
        logger.info(f"engine {self.name} ready on {self.device} in {time.time() - t0:.1f}s")

    # ------------------------------------------------------------------ requests

    async def generate(self, request: dict):
        """request = serve.protocol.ChatRequest.to_dict(). Yields the events described in the module docstring."""
        req = ChatRequest(**request)
        try:
            prompt = render_prompt(self.tokenizer, req.messages)
        except Exception as e:  # tokenizer trouble with odd input is the client's problem
            yield {"type": "error", "status": 400, "message": f"could not tokenize the conversation: {e}"}
            return
        seed = req.seed if req.seed is not None else random.randint(0, 2**31 - 1)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, seed=seed)
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
        stream = TextStream(self.tokenizer, stop=req.stop)
        finish, completion = None, 0
        try:
            yield {"type": "start", "replica": self.name, "device": str(self.device), "prompt_tokens": len(prompt),
                   "seed": seed}
            while finish is None:
                events = [await queue.get()]
                while not queue.empty():  # drain: under load one chunk may carry several tokens
                    events.append(queue.get_nowait())
                text = ""
                for ev in events:
                    if ev.token >= 0:
                        completion += 1
                        text += stream.push(ev.token)
                    if ev.finish_reason is not None:
                        finish = ev.finish_reason
                if stream.stopped and finish is None:  # a stop string matched: free the row now
                    seq.cancel()
                    finish = "stop"
                if finish is not None:
                    text += stream.flush()
                if text:
                    yield {"type": "delta", "text": text, "tokens": len(events)}
            if finish == "error" or finish == FINISH_CANCELLED:
                yield {"type": "error", "status": 500, "message": "generation failed on the engine"}
                return
            yield {"type": "end", "finish_reason": "stop" if stream.stopped else finish,
                   "prompt_tokens": len(prompt), "completion_tokens": completion}
        finally:
            seq.cancel()  # no-op when finished; frees the batch slot when the consumer went away

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict:
        return {**self.scheduler.snapshot(), "replica": self.name, "model_config": self.model_config}

    def check_health(self):
        """Serve's health check: a dead batcher thread means this replica must be replaced."""
        if not self.scheduler.is_alive():
            raise RuntimeError("the batch scheduler thread died")

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()


EngineDeployment = serve.deployment(name="NanochatEngine", graceful_shutdown_timeout_s=5)(NanochatEngine)
