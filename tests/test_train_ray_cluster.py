"""Node loss on a simulated 2-node Ray cluster: the run restarts elastically on the surviving node and finishes.

python -m pytest tests/test_train_ray_cluster.py -q
"""

import os
import sys
import threading
import time

import pytest

from nanochat.train import BaseTrainConfig
from ray_jobs import base_train
from ray_jobs import train_common as tc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 24


class SlowSink(tc.RaySink):
    """Stretches each step a little so the test can remove a node while training is surely under way."""

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        time.sleep(0.3)


def slow_worker(config):
    base_train.worker_fn(config, sink_cls=SlowSink)


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]  # one train worker fits per node
    cluster.wait_for_nodes()
    env = {"NANOCHAT_DTYPE": "float32", "NANOCHAT_COLLECTIVE_TIMEOUT_S": "120"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_node_removed_mid_run_finishes_on_the_survivor(two_node_cluster, tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import complete_steps

    cluster, nodes = two_node_cluster
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    cfg = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L",
                          num_iterations=STEPS, device_batch_size=2, total_batch_size=256, eval_every=-1,
                          core_metric_every=-1, sample_every=-1, save_every=3, data="synthetic", vocab_size=512,
                          warmup_steps=2, model_tag="elastic", device_type="cpu")
    ckpt_dir = str(tmp_path / "base" / "base_checkpoints" / "elastic")
    args = tc.ClusterArgs(num_workers=2, min_workers=1, cpus_per_worker=1, max_failures=3,
                          storage=str(tmp_path / "runs"), report_every=1)
    config = {"cfg": cfg.to_dict(), "run_name": "elastic-run", "report_every": 1}
    out = {}

    def fit():
        try:
            out["result"] = tc.run_trainer(slow_worker, config, args, use_gpu=False, run_name="elastic-run")
        except Exception as e:  # surfaced by the assertions below
            out["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.isdir(ckpt_dir) and complete_steps(ckpt_dir)):
        time.sleep(0.2)
    assert complete_steps(ckpt_dir), "training never wrote its first checkpoint"
    removed_at = complete_steps(ckpt_dir)[-1]
    cluster.remove_node(nodes[1], allow_graceful=False)  # the node and its worker vanish mid-run
    thread.join(timeout=400)
    assert not thread.is_alive(), "the run did not finish after losing a node"
    assert "error" not in out, out.get("error")
    metrics = out["result"].metrics
    assert metrics["step"] == STEPS and removed_at < STEPS
    assert metrics["world_size"] == 1, "the restarted group should run on the one surviving node"
    assert 0 < metrics["start_step"] < STEPS  # resumed from a checkpoint, optimizer re-sharded 2 -> 1
    assert STEPS in complete_steps(ckpt_dir)
