"""
The chat application: NanochatEngine replicas (serve.engine_deployment) behind one ingress replica that serves the
HTTP/OpenAI API (serve.api) and the Gradio page at "/" (serve.ui). A typed app builder, so it is the import_path:

    serve run serve.app:build_app source=sft num_replicas=2            # dev, args as key=value
    serve deploy serve/config.yaml                                      # prod (import_path: serve.app:build_app)
    python -m serve.chat_web                                            # upstream-style launcher (serve/chat_web.py)

In Python:  serve.run(build_app(ChatAppArgs(base_dir="/tmp/tinychat")), name="chat", route_prefix="/")

Several checkpoints in one app: `models=["sft", "base", "rl:d20@650"]` (names: serve.models; the first is the
default); each engine replica keeps up to `max_models_per_replica` of them loaded (LRU). Exposure: `api_key` (or the
NANOCHAT_API_KEY environment variable of the ingress replica, the way to set it for `serve deploy`) and
`cors_origins` (see serve.guard).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve import Application

from serve.api import EngineClient, build_api
from serve.engine_deployment import EngineDeployment
from serve.models import ServedModels, default_model_name


class ChatAppArgs(BaseModel):
    """Every knob of the chat app (also the `args:` of serve/config.yaml)."""

    # --- which checkpoint (as upstream's -i/-g/-s); base_dir overrides NANOCHAT_BASE_DIR on the replicas
    source: Literal["base", "sft", "rl"] = "sft"
    model_tag: str | None = None
    step: int | None = None
    base_dir: str | None = None
    # several checkpoints by name (serve.models: "sft", "base:d20", "sft:d20@650"); first = default; None = the one
    # that source/model_tag/step pick
    models: list[str] | None = None
    max_models_per_replica: int = Field(2, ge=1)  # loaded models per engine replica; least recently used evicted
    # --- engine replicas
    device_type: Literal["", "cuda", "cpu", "mps"] = ""  # "" = cuda if the replica sees a GPU, else cpu
    num_replicas: int = Field(1, ge=1)  # upstream's --num-gpus: one model copy per GPU
    num_gpus_per_replica: float = Field(0.0, ge=0)  # 1 on GPU clusters
    num_cpus_per_replica: float = Field(1.0, ge=0)
    torch_threads: int | None = None  # None = Ray's default (OMP_NUM_THREADS = the replica's CPUs)
    max_replicas: int | None = None  # set (> num_replicas) to autoscale between num_replicas and this
    target_ongoing_requests: int = 8  # autoscaling target per replica
    # --- batching and back-pressure
    max_batch_size: int = Field(16, ge=1)  # rows decoded together per replica
    max_waiting: int = Field(32, ge=0)  # requests queued inside a replica for a free row
    max_queued_requests: int = 64  # requests queued at the ingress for a replica (-1 = no limit); beyond -> 503
    max_seq_len: int | None = None  # prompt + reply tokens per request; None = the model's sequence_len
    batch_invariant: bool | None = None  # None = on for CPU (see serve/batching.py)
    # --- generation defaults (upstream's chat_web flags)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(50, ge=0, le=200)
    max_tokens: int = Field(512, ge=1, le=4096)
    # --- front end
    ui: bool = True  # mount the Gradio page at "/"
    first_event_timeout_s: float = 60.0  # a request with no engine answer by then gets 503 "not ready"
    api_key: str | None = Field(None, repr=False)  # bearer key for the API and the page; None = NANOCHAT_API_KEY
    cors_origins: list[str] = []  # browser origins allowed to call the API ("*" = any); empty = CORS off

    @field_validator("models")
    @classmethod
    def _names(cls, models):
        if models is not None:
            ServedModels(models)  # ValueError naming the bad name
        return models

    def served_models(self) -> list[str]:
        return self.models or [default_model_name(self.source, self.model_tag, self.step)]


@serve.deployment(name="ChatIngress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.5},
                  graceful_shutdown_timeout_s=5)
@serve.ingress()
class ChatIngress:
    """FastAPI (+ Gradio) built on the replica, so nothing unpicklable crosses the wire."""

    def __init__(self, engine, settings: dict):
        settings = {**settings, "api_key": settings.get("api_key") or os.environ.get("NANOCHAT_API_KEY") or None}
        self.client = EngineClient(engine, settings)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        app = build_api(self.client)
        if self.settings.get("ui", True):
            from serve.ui import mount_ui  # gradio is imported only where the page is served

            app = mount_ui(app, self.client, api_key=self.settings["api_key"])
        return app


def build_app(args: ChatAppArgs) -> Application:
    if isinstance(args, dict):
        args = ChatAppArgs(**args)
    settings = {**args.model_dump(), "models": args.served_models()}
    engine_settings = {k: v for k, v in settings.items() if k not in ("api_key", "cors_origins")}
    options = dict(max_ongoing_requests=args.max_batch_size + args.max_waiting,
                   max_queued_requests=args.max_queued_requests,
                   ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica})
    if args.max_replicas and args.max_replicas > args.num_replicas:
        options["autoscaling_config"] = {"min_replicas": args.num_replicas, "initial_replicas": args.num_replicas,
                                         "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": args.target_ongoing_requests}
    else:
        options["num_replicas"] = args.num_replicas
    engine = EngineDeployment.options(**options).bind(engine_settings)
    return ChatIngress.bind(engine, settings)
