"""
Serve the chat UI and API with Ray Serve: the upstream `scripts.chat_web` command, with replicas and batching.

    python -m serve.chat_web                          # embedded Ray, one engine replica, http://localhost:8000
    python -m serve.chat_web -n 8 -i sft              # 8 engine replicas (one GPU each when GPUs are present)
    RAY_ADDRESS=auto python -m serve.chat_web -n 4    # on an existing cluster (`ray start` / `ray up`)

    python -m serve.chat_web --models sft,base,rl --api-key "$KEY"    # three checkpoints by name, key required

Flags are upstream's (-n/--num-gpus, -i, -t 0.8, -k 50, -m 512, -g, -s, -p/--port 8000, --device-type, --host),
plus --num-replicas (alias of -n), --max-replicas (autoscaling), --max-batch-size, --base-dir, --no-ui, --models
and --max-models-per-replica (several checkpoints, serve.models), --api-key (default: NANOCHAT_API_KEY) and
--cors-origin (repeatable; CORS is off without it). `--host 0.0.0.0` stays upstream's default, with a warning when
no API key is set. The same app deploys with `serve deploy serve/config.yaml` (see serve/app.py). Ctrl-C shuts the
app down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="NanoChat Web Server (Ray Serve)")
    p.add_argument("-n", "--num-gpus", "--num-replicas", dest="num_replicas", type=int, default=1,
                   help="engine replicas (one model copy per GPU on GPU machines)")
    p.add_argument("-i", "--source", type=str, default="sft", help="Source of the model: base|sft|rl")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="Default temperature for generation")
    p.add_argument("-k", "--top-k", type=int, default=50, help="Default top-k sampling parameter")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="Default max tokens for generation")
    p.add_argument("-g", "--model-tag", type=str, default=None, help="Model tag to load")
    p.add_argument("-s", "--step", type=int, default=None, help="Step to load")
    p.add_argument("-p", "--port", type=int, default=8000, help="Port to run the server on")
    p.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps; empty = cuda when the cluster has GPUs, else cpu")
    p.add_argument("--host", type=str, default="0.0.0.0", help="Host to bind the server to")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale engine replicas up to this many")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together per replica")
    p.add_argument("--base-dir", type=str, default=None, help="NANOCHAT_BASE_DIR for the replicas (local or s3://)")
    p.add_argument("--no-ui", action="store_true", help="API only, no Gradio page at /")
    p.add_argument("--models", type=str, default=None,
                   help="comma-separated model names to serve, first = default (e.g. sft,base,sft:d20@650); "
                        "default: the one -i/-g/-s pick")
    p.add_argument("--max-models-per-replica", type=int, default=2, help="loaded models per replica (LRU)")
    p.add_argument("--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API and a login on the page "
                        "(default: $NANOCHAT_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="browser origin allowed to call the API (repeatable; '*' = any); default: CORS off")
    return p.parse_args(argv)


def exposure_warnings(args) -> list[str]:
    """Start-up warnings about how the server is exposed."""
    warnings = []
    if args.host in ("0.0.0.0", "::", "") and not args.api_key:
        warnings.append(f"WARNING: listening on all interfaces ({args.host or '*'}:{args.port}) without an API key: "
                        "anyone who can reach this port can use the model. Set --api-key / NANOCHAT_API_KEY, or "
                        "--host 127.0.0.1 for this machine only.")
    if "*" in args.cors_origin:
        warnings.append("WARNING: --cors-origin '*': any web page may call this API from its visitors' browsers.")
    return warnings


def app_args(args, cluster_gpus: float):
    from serve.app import ChatAppArgs

    device = args.device_type or ("cuda" if cluster_gpus > 0 else "cpu")
    if device == "cuda" and cluster_gpus < args.num_replicas:
        raise ValueError(f"{args.num_replicas} GPU replicas requested but the cluster has {cluster_gpus:g} GPUs; "
                         f"lower -n/--num-gpus or add GPU nodes")
    return ChatAppArgs(source=args.source, model_tag=args.model_tag, step=args.step,
                       base_dir=args.base_dir or os.environ.get("NANOCHAT_BASE_DIR"), device_type=device,
                       num_replicas=args.num_replicas, num_gpus_per_replica=1.0 if device == "cuda" else 0.0,
                       max_replicas=args.max_replicas, max_batch_size=args.max_batch_size,
                       temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, ui=not args.no_ui,
                       models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
                       max_models_per_replica=args.max_models_per_replica, api_key=args.api_key or None,
                       cors_origins=args.cors_origin)


def check_model(args) -> None:
    """Before Ray starts: the checkpoint error a replica would hit for each served model, as one line
    (NanochatError). Skipped when a cluster (RAY_ADDRESS) is used and its base dir is not visible from here."""
    from nanochat import storage
    from nanochat.checkpoint_manager import CHECKPOINT_SOURCES, check_model_checkpoint
    from nanochat.common import get_base_dir
    from serve.models import ModelName, default_model_name

    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else [
        default_model_name(args.source, args.model_tag, args.step)]
    for name in names:
        parsed = ModelName.parse(name)
        checkpoints_dir = storage.join(args.base_dir or get_base_dir(), CHECKPOINT_SOURCES[parsed.source][0])
        if os.environ.get("RAY_ADDRESS") and not storage.isdir(checkpoints_dir):
            continue
        check_model_checkpoint(checkpoints_dir, parsed.tag, parsed.step)


def deployment_error(app_name: str = "chat") -> str | None:
    """The one-line load error of a failed engine deployment (see NanochatEngine), if that is why it failed."""
    from ray import serve

    from serve.engine_deployment import REPLICA_FAILED

    app = serve.status().applications.get(app_name)
    for dep in (app.deployments.values() if app else []):
        for line in (dep.message or "").splitlines():
            if REPLICA_FAILED in line:
                return line[line.index(REPLICA_FAILED) + len(REPLICA_FAILED):].strip()
    return None


def main(argv=None):
    args = parse_args(argv)
    from nanochat.common import NanochatError

    try:
        check_model(args)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from serve.app import build_app

    print("Starting NanoChat Web Server")
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {args.max_tokens}")
    embedded = not os.environ.get("RAY_ADDRESS")
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")  # embedded unless RAY_ADDRESS names a cluster
    try:
        chat_args = app_args(args, ray.cluster_resources().get("GPU", 0))
    except ValueError as e:  # also pydantic's ValidationError (a bad model name, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_app(chat_args), name="chat", route_prefix="/")
    except RuntimeError:
        message = deployment_error("chat")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"Server ready at http://localhost:{args.port} (models: {', '.join(chat_args.served_models())}; "
          f"API key {'required' if args.api_key else 'not set'})")
    for warning in exposure_warnings(args):
        print(warning, file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Shutting down", flush=True)
        if embedded:  # the whole embedded cluster goes, Serve with it: no app-by-app teardown to wait for
            ray.shutdown()
        else:  # a shared cluster keeps running: remove just this app
            serve.delete("chat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
