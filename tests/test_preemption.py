"""Preemption and node loss on a simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`, CPU nodes).

python -m pytest tests/test_preemption.py -q

One cluster for the module: a head without CPUs and two 1-CPU nodes (elastic runs of 1 to 2 workers).
Pretraining of a depth-2 model on the seeded synthetic stream (its batches do not depend on the world size). A
"gate" actor holds rank 0 at a known step while the test drains or removes a node, so nothing depends on timing:
- drain (preemption reason, 30 s deadline) the node of rank 1, then remove it once the just-in-time checkpoint
  exists: the run resumes from that checkpoint on the surviving node and finishes; no real-failure budget is used
  (max_failures=0), steps lost <= 1 (the run report's interruption record, and the restart's start step);
- remove a node without notice with --save-every-minutes set: the run continues on the remaining node from the last
  periodic checkpoint (work lost <= one interval), grows back to 2 workers when a node is added, finishes, and its
  val bpb equals an uninterrupted run's within float noise; retention kept the newest 2 + final, all ranks' shards.
"""

import json
import os
import sys
import threading
import time

import pytest
import ray
import torch

from nanochat.checkpoint_manager import complete_steps, steps_on_storage
from nanochat.train import BaseTrainConfig, train
from ray_jobs import base_train, run_metrics
from ray_jobs import train_common as tc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WATCHDOG_S = 600  # a held step opens by itself after this long (only if the test itself is stuck)
START_S = 900  # generous: on a loaded shared machine a Cluster's worker group can take minutes to start


@ray.remote(num_cpus=0)
class Gate:
    """Holds rank 0 in on_step at each of `hold_steps` until the test releases that step (any worker group that
    gets there); records where every rank of the current worker group runs."""

    def __init__(self, hold_steps):
        self.released = {s: False for s in hold_steps}
        self.held, self.nodes, self.held_since = None, {}, {}

    def where(self, rank: int, world: int, node_id: str):
        self.nodes[rank] = node_id

    def arrive(self, step: int) -> bool:
        """True = go on (rank 0, after every step)."""
        since = self.held_since.setdefault(step, time.time())
        if self.released.get(step, True) or time.time() - since > WATCHDOG_S:
            return True
        self.held = step
        return False

    def state(self):
        return {"held": self.held, "nodes": dict(self.nodes)}

    def release(self, step: int):
        self.released[step] = True
        self.held = None


class GatedSink(run_metrics.MetricsSink):
    gate = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ray.get(self.gate.where.remote(self.rank, self.world, ray.get_runtime_context().get_node_id()))

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        if self.rank == 0:
            while not ray.get(self.gate.arrive.remote(step)):
                time.sleep(0.05)


def gated_worker(config):
    import functools

    GatedSink.gate = config["gate"]
    base_train.worker_fn(config, sink_cls=functools.partial(GatedSink, metrics_file=config["metrics_file"]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]  # one train worker fits per node
    c.wait_for_nodes()
    env = {"NANOCHAT_DTYPE": "float32", "NANOCHAT_COLLECTIVE_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1",
           "NANOCHAT_PREEMPTION_CHECK_S": "0",  # ask about a preemption at every step
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5", "NANOCHAT_ELASTIC_RESIZE_S": "3"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the driver (and the Train controller it starts) see them too
    ray.init(address=c.address, runtime_env={"env_vars": env})
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def cfg(**kw) -> BaseTrainConfig:
    base = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", num_iterations=30,
                device_batch_size=2, total_batch_size=256, eval_every=-1, eval_tokens=512, core_metric_every=-1,
                sample_every=-1, save_every=-1, data="synthetic", vocab_size=512, warmup_steps=2, device_type="cpu",
                keep_checkpoints=2)  # fmt: skip
    base.update(kw)
    return BaseTrainConfig(**base)


def start(c: BaseTrainConfig, name: str, base, hold_steps, **cluster_kw):
    """fit() in a thread; returns (thread, out dict, gate, metrics file)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the head node (the driver's), which the test never removes: a gate on a removed node would die with it
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    gate = Gate.options(scheduling_strategy=here).remote(hold_steps)
    metrics_file = str(base / f"{name}.jsonl")
    args = tc.ClusterArgs(num_workers=2, min_workers=1, cpus_per_worker=1, storage=str(base / "ray_runs"),
                          report_every=1, **cluster_kw)  # fmt: skip
    config = {"cfg": c.to_dict(), "run_name": name, "report_every": 1, "gate": gate, "metrics_file": metrics_file}
    out = {}

    def fit():
        try:
            out["result"] = tc.run_trainer(gated_worker, config, args, use_gpu=False, run_name=name)
        except Exception as e:  # surfaced by the assertions
            out["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, out, gate, metrics_file


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def node_of(cluster, node_id):
    return next(n for n in cluster.list_all_nodes() if n.node_id == node_id)


def held_at(gate, step, timeout=START_S):
    """Wait until rank 0 is held at `step` with both ranks' nodes known; returns the gate's state."""
    return wait_for(lambda: (s := ray.get(gate.state.remote()))["held"] == step and s, timeout, f"the hold at {step}")


def drain(node_id: str, deadline_s: int):
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "test: spot reclaim", int(time.time() * 1000) + deadline_s * 1000)
    assert accepted, why


def metas(ckpt_dir) -> dict:
    out = {}
    for s in complete_steps(ckpt_dir):
        with open(os.path.join(ckpt_dir, f"meta_{s:06d}.json")) as f:
            out[s] = json.load(f)
    return out


def test_drain_notice_gives_a_just_in_time_checkpoint_and_the_run_resumes_from_it(cluster, tmp_path, monkeypatch):
    c, nodes = cluster
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    HOLD = 8
    thread, out, gate, metrics_file = start(cfg(model_tag="drain"), "drain-run", tmp_path, [HOLD], max_failures=0)
    state = held_at(gate, HOLD)
    assert len(state["nodes"]) == 2
    victim = node_of(c, state["nodes"][1])  # the node of rank 1 (rank 0 keeps running on its own node)
    deadline = time.time() + 30
    drain(victim.node_id, deadline_s=30)
    ray.get(gate.release.remote(HOLD))
    ckpt = str(tmp_path / "base_checkpoints" / "drain")
    jit = wait_for(lambda: [s for s, m in metas(ckpt).items() if m.get("save_reason") == "preemption"], 120,
                   "a just-in-time checkpoint")[0]
    assert jit >= HOLD  # saved after the drain notice (issued while rank 0 was held at step HOLD)
    # the reclaim itself, at the deadline (as a spot reclaim: Ray restarts the group then, charged to the preemption
    # budget, and records a node that dies after its drain deadline as preempted, one that dies earlier as failed)
    time.sleep(max(0.0, deadline - time.time()) + 1)
    c.remove_node(victim, allow_graceful=False)
    thread.join(timeout=START_S)
    assert not thread.is_alive(), "the run did not finish after the preemption"
    assert "error" not in out, out.get("error")  # max_failures=0: the restart was charged to the preemption budget
    m = out["result"].metrics
    assert m["step"] == 30 and m["start_step"] == jit and m["world_size"] == 1
    intr = [r for r in run_metrics.read_metrics(metrics_file) if r["kind"] == "interruption"]
    assert intr and intr[0]["cause"] == "preemption", intr
    # (Ray may first restart on both nodes at the deadline, before the drained node is gone: then once more)
    assert all(r["resumed_from"] == jit and r["steps_lost"] <= 1 for r in intr), intr
    c.add_node(num_cpus=1)  # back to two nodes for the next test
    c.wait_for_nodes()


def test_node_lost_without_notice_resumes_from_the_periodic_checkpoint_and_grows_back(cluster, tmp_path,
                                                                                       monkeypatch):
    c, _ = cluster
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    STEPS, HOLD, HOLD_SMALL = 60, 20, 40
    run_cfg = cfg(model_tag="lost", num_iterations=STEPS, save_every_minutes=0.005, eval_every=STEPS)
    thread, out, gate, metrics_file = start(run_cfg, "lost-run", tmp_path, [HOLD, HOLD_SMALL])
    state = held_at(gate, HOLD)
    assert len(state["nodes"]) == 2
    ckpt = str(tmp_path / "base_checkpoints" / "lost")
    periodic = [s for s, m in metas(ckpt).items() if m.get("save_reason") == "minutes"]
    assert periodic, "no periodic checkpoint before the hold step"
    interval = max(1, periodic[-1] - (periodic[-2] if len(periodic) > 1 else 0))
    c.remove_node(node_of(c, state["nodes"][1]), allow_graceful=False)  # no notice: node and worker vanish
    ray.get(gate.release.remote(HOLD))
    # the survivor restarts alone from the newest checkpoint; held again later, it sees a node come back: the group
    # grows to 2 workers (Ray restarts it from the newest checkpoint) and the test lets it finish
    held_at(gate, HOLD_SMALL)
    c.add_node(num_cpus=1)
    wait_for(lambda: any(r["kind"] == "interruption" and r["cause"] == "resize"
                         for r in run_metrics.read_metrics(metrics_file)), START_S, "the group to grow back")
    ray.get(gate.release.remote(HOLD_SMALL))
    thread.join(timeout=START_S)
    assert not thread.is_alive(), "the run did not finish after losing a node"
    assert "error" not in out, out.get("error")
    m = out["result"].metrics
    intr = [r for r in run_metrics.read_metrics(metrics_file) if r["kind"] == "interruption"]
    lost = intr[0]
    assert lost["cause"] == "node lost" and lost["world_size"] == 1 and lost["previous_world_size"] == 2, intr
    assert lost["resumed_from"] >= periodic[-1] and lost["last_step"] - lost["resumed_from"] <= interval + 1, intr
    assert any(r["cause"] == "resize" and r["world_size"] == 2 for r in intr), intr  # grew back
    assert m["step"] == STEPS and m["world_size"] == 2
    # retention: the newest 2 checkpoints of the run + the final one, every rank's shard of each, nothing else
    files = steps_on_storage(ckpt)
    assert STEPS in files and len(files) <= 3, sorted(files)
    assert sorted(files[STEPS]) == [f"meta_{STEPS:06d}.json", f"model_{STEPS:06d}.pt",
                                    f"optim_{STEPS:06d}_rank0.pt", f"optim_{STEPS:06d}_rank1.pt"]  # fmt: skip
    # same rows, same math at any world size: the interrupted run's val bpb matches an uninterrupted one
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "reference"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(cfg(model_tag="ref", num_iterations=STEPS, eval_every=STEPS, keep_checkpoints=1))
    finally:
        torch.set_num_threads(threads)
    assert abs(m["val_bpb"] - ref["val_bpb"]) < 1e-3, (m["val_bpb"], ref["val_bpb"])
