"""Pretraining on Ray Train (local CPU cluster, gloo): equivalence, SIGKILL recovery, resharded resume from S3.

python -m pytest tests/test_train_ray.py -q

All runs use the seeded synthetic token stream (same global batch for any world size) and a depth-2, seq-64 model,
so a 2-worker step sees exactly the rows of a 1-worker step with 2 accumulation micro-steps.
"""

import json
import os
import signal
import socket
import sys

import pytest
import torch

from nanochat.sft import SFTConfig
from nanochat.train import BaseTrainConfig, train
from ray_jobs import base_train, chat_sft
from ray_jobs import train_common as tc
from tests.s3server import S3Server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # torch's OpenMP threads spin while waiting; on a shared 2-core machine one thread is several times faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_dict(tag, **kw):
    base = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", num_iterations=STEPS,
                device_batch_size=2, total_batch_size=256, eval_every=-1, eval_tokens=256, core_metric_every=-1,
                sample_every=-1, save_every=-1, data="synthetic", vocab_size=512, warmup_steps=2, model_tag=tag,
                device_type="cpu")  # fmt: skip
    base.update(kw)
    return BaseTrainConfig(**base).to_dict()


def fit(cfg: dict, run_name: str, num_workers=2, worker=base_train.worker_fn, storage=None, max_failures=0, **extra):
    cluster = tc.ClusterArgs(num_workers=num_workers, cpus_per_worker=1, max_failures=max_failures, storage=storage)
    config = {"cfg": cfg, "run_name": run_name, "report_every": 1, **extra}
    return tc.run_trainer(worker, config, cluster, use_gpu=False, run_name=run_name)


def final_model(checkpoint_dir, step=STEPS):
    from nanochat.checkpoint_manager import load_checkpoint

    return load_checkpoint(checkpoint_dir, step, "cpu")[0]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class FaultySink(tc.RaySink):
    """RaySink that fails once (marker file) on a given rank after a given step: SIGKILL or an exception."""

    fault: dict = {}

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        f = self.fault
        if step == f["step"] and self.rank == f["rank"] and not os.path.exists(f["marker"]):
            open(f["marker"], "w").close()
            if f["kind"] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no Python cleanup, no exception
            raise RuntimeError("injected failure")


def faulty_worker(config):
    FaultySink.fault = config["fault"]
    base_train.worker_fn(config, sink_cls=FaultySink)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def ray_cluster(s3, one_thread):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    # Ray Train's PlacementGroupCleaner asks the State API whether the controller is alive. Without our dashboard it
    # asks http://127.0.0.1:8265, which on a shared machine can be another cluster's dashboard: that one does not
    # know our controller, the cleaner takes it for dead and removes our placement group, killing the workers. Point
    # it at a port we hold without listening: the query fails and the cleaner keeps monitoring (a logged warning).
    no_api = socket.socket()
    no_api.bind(("127.0.0.1", 0))
    env = {**s3.env, "NANOCHAT_DTYPE": "float32", "NANOCHAT_COLLECTIVE_TIMEOUT_S": "120",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{no_api.getsockname()[1]}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the driver talks to the same S3 server; forwarded to workers by run_trainer
    port = _free_port()  # Prometheus export of this node's metrics (custom Gauges included)
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})  # fmt: skip
    yield port
    ray.shutdown()
    no_api.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GAUGES_SEEN = "gauges_seen"  # named actor: set by the driver once every custom gauge was scraped
WATCHDOG_S = 300  # a worker waits at most this long for it (only if the gauges never show up: the test then fails)


def _gauges_flag():
    import ray

    @ray.remote(num_cpus=0)
    class Flag:
        def __init__(self):
            self.value = False

        def set(self):
            self.value = True

        def get(self):
            return self.value

    return Flag.options(name=GAUGES_SEEN).remote()


class GaugeHoldSink(tc.RaySink):
    """Rank 0 finishes only once the driver has seen the gauges it exported (they vanish with the worker)."""

    def report_final(self, result):
        import time

        import ray

        if self.rank == 0:
            flag, deadline = ray.get_actor(GAUGES_SEEN), time.time() + WATCHDOG_S
            while not ray.get(flag.get.remote()) and time.time() < deadline:
                time.sleep(0.1)
        super().report_final(result)


def gauge_hold_worker(config):
    base_train.worker_fn(config, sink_cls=GaugeHoldSink)


def _scrape_gauges(port, found, want, flag, stop):
    """Poll the node's Prometheus endpoint until every wanted gauge has been seen, then tell the worker."""
    import time
    import urllib.request

    while not stop.is_set():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            found.update(line.split("{")[0] for line in text.splitlines() if line.startswith("ray_nanochat_train_"))
        except OSError:
            pass
        if want <= found:
            flag.set.remote()
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """Uninterrupted runs: 1 process with 2 accumulation steps, and TorchTrainer with 2 workers."""
    import threading

    base = tmp_path_factory.mktemp("ref_base")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    gauges, stop, want = set(), threading.Event(), {f"ray_{name}" for name in tc.GAUGES}
    flag = _gauges_flag()
    scraper = threading.Thread(target=_scrape_gauges, args=(ray_cluster, gauges, want, flag, stop), daemon=True)
    try:
        single = train(BaseTrainConfig(**cfg_dict("single")))
        scraper.start()
        result = fit(cfg_dict("two"), "ref-two", worker=gauge_hold_worker, storage=str(base / "ray_runs"))
    finally:
        stop.set()
        os.environ.pop("NANOCHAT_BASE_DIR")
    two = result.metrics
    return {"single": single, "two": two, "single_model": final_model(single["checkpoint_dir"]),
            "two_model": final_model(two["checkpoint_dir"]), "gauges": gauges}  # fmt: skip


def test_custom_metrics_reach_prometheus_export(reference):
    want = {f"ray_{name}" for name in tc.GAUGES}  # tokens/s, MFU, loss, step
    assert want <= reference["gauges"], reference["gauges"]


def test_two_workers_equal_one_worker_with_accumulation(reference):
    single, two = reference["single"], reference["two"]
    assert single["grad_accum_steps"] == 2 and two["grad_accum_steps"] == 1 and two["world_size"] == 2
    assert [s for s, _ in two["losses"]] == list(range(STEPS))
    for (s1, l1), (_, l2) in zip(single["losses"], two["losses"]):
        assert abs(l1 - l2) < 1e-4, (s1, l1, l2)
    assert max_abs_diff(reference["single_model"], reference["two_model"]) < 1e-4


def test_sigkill_of_a_worker_recovers_to_identical_weights(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    fault = {"step": 7, "rank": 1, "kind": "sigkill", "marker": str(tmp_path / "killed")}
    # synchronous saves: the step-6 checkpoint is registered before step 7 (a background save can still be in flight
    # when the kill lands on a loaded machine, and the run would resume from step 3)
    result = fit(cfg_dict("two", save_every=3, background_save=0), "kill-run", worker=faulty_worker,
                 storage=str(tmp_path / "runs"), max_failures=2, fault=fault)  # fmt: skip
    assert os.path.exists(fault["marker"]), "the fault was never injected"
    metrics = result.metrics
    assert metrics["step"] == STEPS and metrics["start_step"] == 6  # resumed from the step-6 checkpoint
    # Same world size, same seed, same data rows, restored optimizer + loop state: the weights are bitwise equal.
    # (Bound stated in case a BLAS picks another kernel after the restart: 1e-6.)
    assert max_abs_diff(final_model(metrics["checkpoint_dir"]), reference["two_model"]) <= 1e-6
    for (s1, l1), (s2, l2) in zip(reference["two"]["losses"][6:], metrics["losses"]):
        assert s1 == s2 and abs(l1 - l2) <= 1e-6


def test_resubmit_on_one_worker_resumes_two_worker_checkpoint_from_s3(reference, s3, monkeypatch, tmp_path):
    base = s3.uri("base_resub")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    storage = s3.uri("ray_runs")
    fault = {"step": 6, "rank": 0, "kind": "raise", "marker": str(tmp_path / "failed")}
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):  # max_failures=0: the run fails after its step-5 checkpoint
        # synchronous saves: the step-5 checkpoint is complete before the step-6 fault (a background save may still
        # be uploading then, and the run would restart from step 0)
        fit(cfg_dict("resub", save_every=5, background_save=0), "resub-run", worker=faulty_worker, storage=storage,
            fault=fault)  # fmt: skip
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert "base_resub/base_checkpoints/resub/optim_000005_rank1.pt" in keys
    assert any(k.startswith("ray_runs/resub-run/") for k in keys)
    # Resubmit the same run name with ONE worker: resumes step 5, optimizer state re-sharded 2 -> 1.
    result = fit(cfg_dict("resub", save_every=5), "resub-run", num_workers=1, storage=storage)
    metrics = result.metrics
    assert metrics["start_step"] == 5 and metrics["step"] == STEPS and metrics["world_size"] == 1
    for (s1, l1), (s2, l2) in zip(reference["two"]["losses"][5:], metrics["losses"]):
        assert s1 == s2 and abs(l1 - l2) < 1e-4, (s1, l1, l2)
    assert max_abs_diff(final_model(metrics["checkpoint_dir"]), reference["two_model"]) < 1e-4
    assert metrics["checkpoint_dir"].startswith("s3://")
    assert torch.is_tensor(final_model(metrics["checkpoint_dir"])["lm_head.weight"])


def test_ray_data_actors_auto_default():
    from nanochat.common import NanochatError

    _, cluster = base_train.parse_args([])
    assert cluster.ray_data_actors == -1  # auto
    cases = [(-1, True, "parquet", tc.AUTO_RAY_DATA_ACTORS), (-1, False, "parquet", 0), (-1, True, "synthetic", 0),
             (3, False, "parquet", 3), (0, True, "parquet", 0)]  # fmt: skip
    for given, use_gpu, data, want in cases:
        c = tc.ClusterArgs(ray_data_actors=given)
        assert tc.resolve_ray_data_actors(c, use_gpu, data) == want == c.ray_data_actors, (given, use_gpu, data)
    with pytest.raises(NanochatError, match="--ray-data-actors"):
        tc.validate_cluster(tc.ClusterArgs(ray_data_actors=-2))


class DataPathSink(FaultySink):
    """FaultySink that also appends (attempt pid, step, loss, whether the Ray Data pipeline feeds it) to a file."""

    def train_loader(self, cfg, tokenizer, device, resume_state):
        it = super().train_loader(cfg, tokenizer, device, resume_state)
        self.ray_data = it is not None
        return it

    def on_step(self, step, metrics):
        with open(self.fault["log"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": step - 1, "loss": metrics["train/step_loss"],
                                "ray_data": self.ray_data}) + "\n")  # fmt: skip
        super().on_step(step, metrics)


def data_path_worker(config):
    DataPathSink.fault = config["fault"]
    base_train.worker_fn(config, sink_cls=DataPathSink)


def test_ray_data_pipeline_gives_plain_loader_losses_and_resumes(ray_cluster, tmp_path, monkeypatch):
    """1 TorchTrainer worker fed by 1 Ray Data tokenizer actor gives the plain loader's losses (same batches by
    construction); after a failure at step 4 the restarted worker resumes from the step-3 checkpoint, whose data
    position the Ray Data path wrote, again on Ray Data, and continues with exactly the plain run's losses."""
    from nanochat.dataset import get_data_dir, write_shards
    from tests.eval_fixtures import make_tiny_checkpoint

    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    make_tiny_checkpoint(str(base))  # for its real tokenizer (the checkpoint it writes is not used)
    docs = [
        f"Document {i}: the {['cat', 'dog', 'cow'][i % 3]} sat on mat number {i}. " * (1 + i % 4) for i in range(400)
    ]
    write_shards(docs, get_data_dir(), docs_per_shard=128, val_docs=64, row_group_size=16)
    steps = 6
    kw = dict(data="parquet", vocab_size=-1, num_iterations=steps)
    plain = dict(train(BaseTrainConfig(**cfg_dict("rd_plain", **kw)))["losses"])
    fault = {"step": 4, "rank": 0, "kind": "raise", "marker": str(tmp_path / "failed"), "log": str(tmp_path / "log")}
    # synchronous saves: the step-3 checkpoint is registered before the failure at step 4 (see the SIGKILL test)
    result = fit(cfg_dict("rd", save_every=3, background_save=0, **kw), "rd-run", num_workers=1,
                 worker=data_path_worker, max_failures=1, storage=str(tmp_path / "runs"), ray_data_actors=1,
                 fault=fault).metrics  # fmt: skip
    assert os.path.exists(fault["marker"]) and result["start_step"] == 3 and result["step"] == steps
    log = [json.loads(line) for line in open(fault["log"])]
    assert all(r["ray_data"] for r in log)  # both attempts were fed by Ray Data
    first, second = log[0]["pid"], log[-1]["pid"]
    assert first != second
    assert [r["step"] for r in log] == [0, 1, 2, 3, 3, 4, 5]  # the retry redoes step 3 (after the checkpoint)
    for r in log:
        assert abs(r["loss"] - plain[r["step"]]) <= 1e-5, (r, plain[r["step"]])


def faulty_sft_worker(config):
    FaultySink.fault = config["fault"]
    chat_sft.worker_fn(config, sink_cls=FaultySink)


SFT_STEPS = 6


def sft_cfg(**kw):
    # the tiny base checkpoint has no optimizer state and no batch settings in its meta: set them. Rows are its
    # sequence_len (128): an SFT checkpoint records max_seq_len as the model's sequence_len (upstream's format) and
    # the attention window follows it, so a longer max_seq_len would resume into a model with a wider window
    base = dict(model_tag="d2", load_optimizer=0, mixture="offline", offline_size=200, num_iterations=SFT_STEPS,
                max_seq_len=128, device_batch_size=2, total_batch_size=256, eval_every=-1, eval_tokens=256,
                chatcore_every=-1, device_type="cpu")  # fmt: skip
    base.update(kw)
    return SFTConfig(**base)


def test_sft_sigkill_of_a_worker_resumes_from_its_s3_checkpoint(ray_cluster, s3, tmp_path, monkeypatch):
    """chat_sft on Ray Train with the base dir on S3: the worker is SIGKILLed after step 3, Ray restarts it, and it
    resumes from the step-2 SFT checkpoint it wrote to S3 (weights, optimizer, the loader's exact position), then
    trains to the end with exactly the losses and final weights of an uninterrupted in-process run."""
    from nanochat import storage
    from nanochat.sft import sft
    from tests.eval_fixtures import make_tiny_checkpoint

    local = tmp_path / "base"
    make_tiny_checkpoint(str(local))  # tokenizer + base_checkpoints/d2/step 5
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(local))
    reference = sft(sft_cfg())
    base = s3.uri("sft_base")
    for path in local.rglob("*"):  # the same inputs on S3 (tokenizer, base checkpoint), not the reference's output
        if path.is_file() and "chatsft_checkpoints" not in path.parts:
            storage.write_bytes(storage.join(base, *path.relative_to(local).parts), path.read_bytes())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    fault = {"step": 3, "rank": 0, "kind": "sigkill", "marker": str(tmp_path / "killed")}
    # synchronous saves: the step-2 checkpoint is complete when the kill lands (a background upload might not be)
    cfg = sft_cfg(save_every=2, background_save=0).to_dict()
    result = fit(cfg, "sft-kill", num_workers=1, worker=faulty_sft_worker, storage=s3.uri("ray_runs"),
                 max_failures=1, fault=fault).metrics  # fmt: skip
    assert os.path.exists(fault["marker"]), "the fault was never injected"
    assert result["start_step"] == 2 and result["step"] == reference["step"]
    assert result["checkpoint_dir"] == storage.join(base, "chatsft_checkpoints", "d2")
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="sft_base/")["Contents"]}
    assert "sft_base/chatsft_checkpoints/d2/optim_000002_rank0.pt" in keys  # what the restart resumed from
    ref_losses = dict(reference["losses"])
    assert [s for s, _ in result["losses"]] == list(range(2, reference["step"]))
    for s, loss in result["losses"]:
        assert abs(loss - ref_losses[s]) <= 1e-6, (s, loss, ref_losses[s])
    ref_model = final_model(str(local / "chatsft_checkpoints" / "d2"), reference["step"])
    assert max_abs_diff(final_model(result["checkpoint_dir"], result["step"]), ref_model) <= 1e-6
