"""
Does the Ray cluster this driver joined have GPUs, or can its autoscaler add some? Decides GPU vs CPU workers.

`ray job submit -- python -m ray_jobs.base_train --num-workers 8` runs the driver on the head node, which has no GPU
in the usual `ray up` / KubeRay layout, and the GPU workers may not be up yet (min_workers 0). So the decision is
made after connecting, from what the cluster says, in this order:
  1. GPUs in the cluster now (`ray.cluster_resources()`);
  2. the autoscaler's node types: the cluster config an autoscaler reports to the GCS
     (`ray._private.state.state.get_cluster_config()`, which Ray Train V2 itself reads to reject impossible
     worker groups), else the config a `ray up` head was started with (`~/ray_bootstrap_config.yaml`, resources
     filled in by `ray up`; NANOCHAT_AUTOSCALER_CONFIG points elsewhere). Ray 2.60's own autoscaler does not
     report (1) to the GCS, and KubeRay's autoscaler keeps its node types in the RayCluster resource, out of a
     driver's sight: there the node types are unknown.
Outcome: auto -> GPU when (1) or (2) shows GPUs; else CPU. `--use-gpu 1` fails with a clear message when the node
types are known and none has GPUs (or the cluster is this machine's embedded one and it has none); when they are
unknown it trusts the user and the trainer waits for GPU nodes to join.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from nanochat.common import NanochatError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass
class GpuOutlook:
    gpus_now: float  # GPUs in the cluster's live nodes
    gpu_node_types: list[str] | None  # autoscaler node types with GPUs ([] = none can have any; None = unknown)
    source: str  # where the node types came from

    def describe(self) -> str:
        if self.gpu_node_types is None:
            return "the autoscaler's node types are not visible to this driver"
        kinds = ", ".join(self.gpu_node_types) or "none with GPUs"
        return f"autoscaler node types ({self.source}): {kinds}"


def node_types_from_gcs() -> dict[str, dict] | None:
    """{name: {"GPU": per node, "max": max nodes (-1 = unbounded)}} from the GCS cluster config, or None."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the key, a client connection: no information
        return None
    if config is None or not config.node_group_configs:
        return None
    return {g.name or f"group{i}": {"GPU": float(g.resources.get("GPU", 0)), "max": int(g.max_count)}
            for i, g in enumerate(config.node_group_configs)}


def node_types_from_bootstrap(path: str | None = None) -> dict[str, dict] | None:
    """The same from a `ray up` autoscaling config file (JSON or YAML), or None if there is none."""
    path = os.path.expanduser(path or os.environ.get("NANOCHAT_AUTOSCALER_CONFIG") or BOOTSTRAP_CONFIG)
    try:
        with open(path) as f:
            text = f.read()
        config = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    config = config if isinstance(config, dict) else {}
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    default_max = int(config.get("max_workers", 0) or 0)
    out = {}
    for name, spec in types.items():
        spec = spec or {}
        most = 1 if name == head else int(spec.get("max_workers", default_max) or 0)
        out[name] = {"GPU": float((spec.get("resources") or {}).get("GPU", 0)), "max": most}
    return out or None


def gpu_outlook(bootstrap_path: str | None = None) -> GpuOutlook:
    """What the connected cluster offers (call after ray.init)."""
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    for source, types in (("GCS cluster config", node_types_from_gcs()),
                          ("autoscaling config file", node_types_from_bootstrap(bootstrap_path))):
        if types is not None:
            gpu_types = sorted(n for n, t in types.items() if t["GPU"] > 0 and t["max"] != 0)
            return GpuOutlook(now, gpu_types, source)
    return GpuOutlook(now, None, "")


def decide(requested: str, outlook: GpuOutlook) -> tuple[bool, str]:
    """(use_gpu, one line for the log) for --use-gpu `requested` ("auto" | "1"); NanochatError if impossible."""
    if outlook.gpus_now > 0:
        return True, f"training on GPU workers: the cluster has {outlook.gpus_now:g} GPUs"
    if outlook.gpu_node_types:
        return True, (f"training on GPU workers: no GPU node is up yet, the autoscaler can add "
                      f"{', '.join(outlook.gpu_node_types)} ({outlook.source})")
    if requested == "1":
        if outlook.gpu_node_types == []:
            raise NanochatError(
                f"--use-gpu 1, but this cluster can never provide GPUs: none of its nodes has one and none of "
                f"its {outlook.describe()}. Add a GPU node type to the cluster config, or use --use-gpu 0")
        return True, ("--use-gpu 1: no GPU in the cluster yet and the autoscaler's node types are not visible "
                      "here; the trainer waits for GPU nodes to join")
    return False, f"training on CPU workers: no GPU in the cluster and {outlook.describe()}"


def decide_local(requested: str, cuda_available: bool) -> tuple[bool, str]:
    """The same for an embedded cluster started on this machine: its GPUs are this machine's."""
    if cuda_available:
        return True, "training on GPU workers: this machine's GPUs (embedded Ray cluster)"
    if requested == "1":
        raise NanochatError(
            "--use-gpu 1, but this machine has no CUDA GPU and no cluster address was given (the embedded Ray "
            "cluster can never provide GPUs): pass --address or set RAY_ADDRESS to a GPU cluster, or --use-gpu 0")
    return False, "training on CPU workers: this machine has no CUDA GPU (embedded Ray cluster)"
