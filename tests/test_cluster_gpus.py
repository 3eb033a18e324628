"""python -m pytest tests/test_cluster_gpus.py -q

GPU or CPU Train workers, decided after joining the cluster (ray_jobs/cluster_gpus.py), as `ray job submit` on a
CPU-only head does it: on a local multi-node cluster whose head has no GPU. Cases: nothing known (CPU), autoscaler
node types from a `ray up` config file and from the GCS cluster config (GPU types at min 0 -> GPU; none -> CPU, and
`--use-gpu 1` fails with one line), then a worker node that declares GPUs. Checks the decision, the entry point's
prepared config and the trainer's ScalingConfig (no CUDA needed). Also: a Ray Train worker started by our trainer
wiring gets PYTORCH_ALLOC_CONF=expandable_segments:True, and a user's own value wins.

ray.cluster_utils.AutoscalingCluster is not used: its start() runs `ray stop --force`, which would also stop every
other Ray cluster on a shared machine; the GCS cluster config is reported the way an autoscaler reports it.
"""

import json
import os
import sys

import pytest

from nanochat.common import NanochatError
from ray_jobs import base_train, cluster_gpus
from ray_jobs import train_common as tc

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))  # no stray ~/ray_bootstrap_...
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):  # recorded as absent: main() may set them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def args(*extra):
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern",
            "L", "--num-iterations", "2", "--device-batch-size", "2", "--total-batch-size", "1024", "--data",
            "synthetic", "--vocab-size", "512", "--num-workers", "8", *extra]


def prepared(*extra):
    cfg, cluster = base_train.parse_args(args(*extra))
    cfg, use_gpu, _ = base_train.prepare(cfg, cluster)
    return cfg, cluster, use_gpu


def write_ray_up_config(path, gpus_per_worker):
    """What `ray up` leaves on the head (~/ray_bootstrap_config.yaml): JSON, resources filled in per node type."""
    config = {"max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "workers": {"min_workers": 0, "max_workers": 4,
                    "resources": {"CPU": 192, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}}}}
    path.write_text(json.dumps(config))
    return str(path)


def report_cluster_config(groups):
    """Put a ClusterConfig into the GCS as an autoscaler does (ray._private.state reads it back)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        g = config.node_group_configs.add()
        g.name, g.max_count = name, max_count
        for k, v in resources.items():
            g.resources[k] = v
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())


def test_nothing_known_trains_on_cpu_workers(cluster, env, capsys):
    cfg, cl, use_gpu = prepared()
    assert (use_gpu, cfg.device_type) == (False, "cpu")
    assert "[ray] training on CPU workers: no GPU in the cluster" in capsys.readouterr().out
    assert tc.scaling_config(cl, use_gpu).use_gpu is False
    # --use-gpu 1 without any visible node types: trusted (the trainer waits for GPU nodes to join)
    _, _, use_gpu = prepared("--use-gpu", "1")
    assert use_gpu is True and "waits for GPU nodes" in capsys.readouterr().out


def test_ray_up_config_with_gpu_workers_at_min_zero(cluster, env, tmp_path, capsys):
    env.setenv("NANOCHAT_AUTOSCALER_CONFIG", write_ray_up_config(tmp_path / "bootstrap.json", 8))
    cfg, cl, use_gpu = prepared()
    assert use_gpu is True and cfg.device_type == ""  # workers pick their own cuda:LOCAL_RANK
    assert "the autoscaler can add workers (autoscaling config file)" in capsys.readouterr().out
    sc = tc.scaling_config(cl, use_gpu)
    assert (sc.use_gpu, sc.num_workers, sc.resources_per_worker) == (True, 8, {"CPU": 4, "GPU": 1})


def test_cpu_only_cluster_rejects_use_gpu_1_in_one_line(cluster, env, tmp_path, capsys):
    env.setenv("NANOCHAT_AUTOSCALER_CONFIG", write_ray_up_config(tmp_path / "bootstrap.yaml", 0))
    assert prepared()[2] is False
    with pytest.raises(NanochatError, match="can never provide GPUs"):
        prepared("--use-gpu", "1")
    capsys.readouterr()
    assert base_train.main(args("--use-gpu", "1")) == 2  # the user's view: exit 2, one line naming the fix
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --use-gpu 1, but this cluster can never provide GPUs")
    assert "--use-gpu 0" in err[0]


def test_gcs_cluster_config(cluster, env, tmp_path):
    """An autoscaler that reports its node groups to the GCS (read first, as Ray Train V2 does)."""
    env.setenv("NANOCHAT_AUTOSCALER_CONFIG", write_ray_up_config(tmp_path / "bootstrap.json", 0))
    report_cluster_config([("cpu-group", {"CPU": 16}, 4), ("gpu-8x", {"CPU": 180, "GPU": 8}, 2)])
    outlook = cluster_gpus.gpu_outlook()
    assert (outlook.gpus_now, outlook.gpu_node_types, outlook.source) == (0, ["gpu-8x"], "GCS cluster config")
    assert prepared()[2] is True
    report_cluster_config([("cpu-group", {"CPU": 16}, 4), ("gpu-8x", {"CPU": 180, "GPU": 8}, 0)])  # max 0
    with pytest.raises(NanochatError, match="can never provide GPUs"):
        prepared("--use-gpu", "1")


def test_gpu_worker_node_joined(cluster, env, capsys):
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    cfg, cl, use_gpu = prepared()
    assert use_gpu is True and cfg.device_type == ""
    assert "[ray] training on GPU workers: the cluster has 2 GPUs" in capsys.readouterr().out
    assert tc.scaling_config(cl, use_gpu).resources_per_worker == {"CPU": 4, "GPU": 1}
    assert prepared("--use-gpu", "0")[2] is False


def test_embedded_cluster_decision_is_local():
    assert cluster_gpus.decide_local("auto", False)[0] is False
    assert cluster_gpus.decide_local("auto", True)[0] is True
    with pytest.raises(NanochatError, match="no CUDA GPU and no cluster address"):
        cluster_gpus.decide_local("1", False)


# -----------------------------------------------------------------------------
# PYTORCH_ALLOC_CONF in Ray Train workers


def report_alloc_conf(config):
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as d:  # Result.metrics are those of the newest checkpointed report
        open(os.path.join(d, "x"), "w").close()
        ray.train.report({k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def worker_env(tmp_path, name):
    cl = tc.ClusterArgs(num_workers=1, cpus_per_worker=1, storage=str(tmp_path / "runs"), max_failures=0,
                        ray_data_actors=0)
    return tc.run_trainer(report_alloc_conf, {}, cl, use_gpu=False, run_name=name).metrics


def test_train_workers_get_expandable_segments_unless_the_user_set_a_value(cluster, env, tmp_path):
    env.delenv("PYTORCH_ALLOC_CONF", raising=False)
    env.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert worker_env(tmp_path, "alloc-default")["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    env.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False,max_split_size_mb:64")
    assert worker_env(tmp_path, "alloc-user")["PYTORCH_ALLOC_CONF"] == "expandable_segments:False,max_split_size_mb:64"
