"""
The Ray Serve engine deployment: each replica serves one or more checkpoints, requests batched token by token.

Models are loaded through `@serve.multiplexed` (wired at init, so ChatAppArgs.max_models_per_replica sets the
bound): Serve routes a request with `multiplexed_model_id=<name>` to a replica that has that model loaded when it
can (another one when those are busy), and each replica keeps at most that many models, evicting the least recently
used (an evicted model finishes the requests it is streaming, then its scheduler stops). Every replica loads the
app's default model in its (async) constructor, through the multiplexer, so checkpoint errors surface at deploy time
and Serve balances the default model over all replicas (a model known to one replica only would get all its
traffic until that replica is full). Other models load on first use. Each model has its own BatchScheduler
(serve.engine_model).

    generate(payload)   async generator of the events documented in serve.engine_model (payload: one choice of
                        serve.protocol.engine_requests, "model" = a canonical served name)
    tokenizer(name, op) the tokenizer endpoints (info, tokenize, detokenize) of model `name`
    stats()             per-model scheduler counters of this replica, and how often each model was loaded

Serving metrics (serve.metrics) are recorded per request and published from a 1-second loop per replica.
Built into an application by serve.app; not meant to be run directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import torch
from ray import serve

from nanochat.common import NanochatError
from serve.engine_model import LoadedModel
from serve.metrics import ServeMetrics
from serve.models import ModelNotFound, ServedModels, resolve

logger = logging.getLogger("ray.serve")
METRICS_PERIOD_S = 1.0
REPLICA_FAILED = "engine replica cannot start: "  # prefix of a load error in the deployment's status message


def pick_device(device_type: str) -> torch.device:
    if device_type in ("", None):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but this replica sees no GPU; give replicas GPUs (num_gpus) or use cpu")
    return torch.device(device_type)


class NanochatEngine:
    """One engine replica. `settings` is serve.app.ChatAppArgs as a dict (only the engine keys are read)."""

    async def __init__(self, settings: dict):  # Serve awaits an async constructor
        if settings.get("base_dir"):
            os.environ["NANOCHAT_BASE_DIR"] = settings["base_dir"]
        if settings.get("torch_threads"):
            torch.set_num_threads(int(settings["torch_threads"]))
        self.settings = settings
        self.device = pick_device(settings.get("device_type", ""))
        self.served = ServedModels(settings["models"])
        try:
            import ray

            self.name = ray.get_runtime_context().get_actor_name() or "local"
        except Exception:  # outside Ray (unit use)
            self.name = "local"
        self.live: dict[str, LoadedModel] = {}  # the models this replica serves now (an evicted one leaves)
        self.loads: dict[str, int] = {}  # times each model was read from disk on this replica
        self._lock = threading.Lock()
        self.metrics = ServeMetrics()

        async def load(model_id: str) -> LoadedModel:
            return await self._load(model_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=settings.get("max_models_per_replica", 2))(load)
        try:
            await self._get_model(self.served.default)
        except NanochatError as e:  # one line in Serve's deployment status (and chat_web's error), no torch frames
            raise NanochatError(f"{REPLICA_FAILED}{e}") from None
        self._stop = threading.Event()
        threading.Thread(target=self._publish_loop, name="nanochat-metrics", daemon=True).start()

    # ------------------------------------------------------------------ models

    def _load_sync(self, name: str) -> LoadedModel:
        t0 = time.time()
        checkpoint_dir, step = resolve(name)
        model = LoadedModel(name, checkpoint_dir, step, self.device, self.settings, replica=self.name)
        with self._lock:
            old = self.live.get(name)
            self.live[name] = model
            self.loads[name] = self.loads.get(name, 0) + 1
        if old is not None:
            old.retire()
        self.metrics.register(name)
        logger.info(f"engine {self.name}: model {name} ({checkpoint_dir} step {step}) ready on {self.device} in "
                    f"{time.time() - t0:.1f}s")
        return model

    async def _load(self, name: str) -> LoadedModel:
        """The multiplexer's loader (it serializes calls and evicts LRU before calling)."""
        model = await asyncio.to_thread(self._load_sync, name)
        model.__del__ = lambda: self._retire(model)  # what the multiplexer calls on eviction
        return model

    def _retire(self, model: LoadedModel):
        model.retire()
        with self._lock:
            if self.live.get(model.name) is model:
                del self.live[model.name]
        self.metrics.clear(model.name)

    # ------------------------------------------------------------------ requests

    async def generate(self, payload: dict):
        """payload: one of serve.protocol.engine_requests. Yields serve.engine_model's events."""
        name = payload["model"]
        try:
            model = await self._get_model(name)
        except ModelNotFound as e:
            yield {"type": "error", "status": 404, "message": str(e), "code": "model_not_found"}
            return
        except Exception as e:  # a corrupt or unreadable checkpoint: say which, keep serving the others
            logger.error(f"engine {self.name}: could not load model {name}: {type(e).__name__}: {e}")
            yield {"type": "error", "status": 500, "message": f"could not load model {name}: {e}"}
            return
        async for ev in model.generate(payload, self.metrics):
            yield ev

    async def tokenizer(self, name: str, op: str, arg=None) -> dict:
        """serve.engine_model.LoadedModel.tokenizer_call on model `name`: {"result": ...} or {"error", "status"}."""
        try:
            return {"result": (await self._get_model(name)).tokenizer_call(op, arg)}
        except ModelNotFound as e:
            return {"error": str(e), "status": 404}
        except ValueError as e:
            return {"error": str(e), "status": 400}

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict:
        """{"models": {name: scheduler snapshot}, "loads": {name: times loaded}, ...}; at the top level also the
        default model's snapshot (or another loaded one's), with running/waiting summed over the models."""
        with self._lock:
            models = {name: m.snapshot() for name, m in self.live.items()}
        top = models.get(self.served.default) or next(iter(models.values()), {})
        return {**top, "replica": self.name, "device": str(self.device),
                "running": sum(s["running"] for s in models.values()),
                "waiting": sum(s["waiting"] for s in models.values()),
                "max_batch_size": self.settings.get("max_batch_size", 16), "models": models,
                "loads": dict(self.loads)}

    def _publish_loop(self):
        while not self._stop.wait(METRICS_PERIOD_S):
            with self._lock:
                live = list(self.live.values())
            for model in live:
                try:
                    self.metrics.publish(model.name, model.scheduler.snapshot())
                except Exception as e:  # metrics must never take the replica down
                    logger.warning(f"publishing serving metrics failed: {type(e).__name__}: {e}")

    def check_health(self):
        """Serve's health check: a dead batcher thread means this replica must be replaced."""
        with self._lock:
            dead = [m.name for m in self.live.values() if not m.retired and not m.scheduler.is_alive()]
        if dead:
            raise RuntimeError(f"the batch scheduler thread of {dead} died")

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for model in list(getattr(self, "live", {}).values()):
            model.retire()


EngineDeployment = serve.deployment(name="NanochatEngine", graceful_shutdown_timeout_s=5)(NanochatEngine)
