"""
The speedrun's bookkeeping in the base dir (local or s3://): the stage graph, per-stage completion markers
(`speedrun/stages/<stage>.json`), the run record (`speedrun/run.json`) and the environment record for the report.
ray_jobs/speedrun.py drives the stages; this module only reads and writes their state.
"""

import hashlib
import json
import os
import time
import uuid

from nanochat import storage

MARKER_VERSION = 1
# stage -> stages whose outputs it consumes (their hashes feed its hash: a change upstream reruns it)
DEPENDS = {
    "data": (),
    "tokenizer": ("data",),
    "tok_eval": ("tokenizer",),
    "base_train": ("tokenizer",),
    "base_eval": ("base_train",),
    "chat_sft": ("base_train",),
    "chat_eval": ("chat_sft",),
    "chat_rl": ("chat_sft",),
    "chat_eval_rl": ("chat_rl",),
}
STAGES = tuple(DEPENDS)
# stage -> preset section holding its settings
SECTION = {"data": "data", "tokenizer": "tokenizer", "tok_eval": "tokenizer", "base_train": "base_train",
           "base_eval": "base_eval", "chat_sft": "chat_sft", "chat_eval": "chat_eval", "chat_rl": "chat_rl",
           "chat_eval_rl": "chat_eval"}  # fmt: skip


def log(msg: str) -> None:
    print(f"[speedrun] {msg}", flush=True)


# -----------------------------------------------------------------------------
# Stage markers (JSON in the base dir, local or s3://)


def speedrun_dir(base_dir: str) -> str:
    return storage.join(base_dir, "speedrun")


def marker_path(base_dir: str, stage: str) -> str:
    return storage.join(speedrun_dir(base_dir), "stages", f"{stage}.json")


def read_json(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError:
        return None  # a torn or foreign file counts as absent


def write_json(path: str, obj: dict) -> None:
    storage.write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_run(base_dir: str, preset: dict, fresh: bool) -> dict:
    """The run record (run id, preset, config), created on first use; a new run id with --fresh."""
    path = storage.join(speedrun_dir(base_dir), "run.json")
    run = None if fresh else read_json(path)
    if run is None:
        run = {"run_id": uuid.uuid4().hex[:8], "created": time.time()}
    run.update(preset=preset["preset"], config={k: v for k, v in preset.items() if k != "preset"}, updated=time.time())
    write_json(path, run)
    return run


# -----------------------------------------------------------------------------
# Environment (for the report)


def _git_commit() -> dict:
    import subprocess

    env = {k: os.environ[k] for k in ("NANOCHAT_GIT_COMMIT",) if k in os.environ}
    if env:
        return {"commit": env["NANOCHAT_GIT_COMMIT"], "dirty": None}
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


def collect_environment(cluster_info) -> dict:
    import platform

    import ray
    import torch

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = {}
    for n in nodes:
        for k in n.get("Resources", {}):
            if k.startswith("accelerator_type:"):
                name = k.split(":", 1)[1]
                gpus[name] = gpus.get(name, 0) + int(n["Resources"].get("GPU", 0))
    res = ray.cluster_resources()
    return {
        **_git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
        "driver_cpu": platform.processor() or platform.machine(),
        "driver_cpu_count": os.cpu_count(),
        "cuda_on_driver": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nodes": len(nodes),
        "cluster_cpus": res.get("CPU", 0),
        "cluster_gpus": res.get("GPU", 0),
        "gpu_types": gpus,
        "cluster_memory_gib": round(res.get("memory", 0) / 2**30, 1),
        "embedded_ray": cluster_info.embedded,
        "ray_init_seconds": round(cluster_info.init_seconds, 2),
        "dashboard_url": cluster_info.dashboard_url,
        "job_submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
    }
