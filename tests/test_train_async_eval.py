"""In-loop CORE (base_train) and ChatCORE (chat_sft) as Ray tasks on a local cluster: the loop does not wait.

python -m pytest tests/test_train_async_eval.py -q

One TorchTrainer worker trains a depth-2 model on the seeded synthetic stream (a real tokenizer, so CORE can run);
the mini eval bundle and task data of dev/make_eval_fixtures.py are served over loopback HTTP. The first CORE
evaluation (and, in SFT, the first chat evaluation) is launched while a "gate" actor holds every free CPU and its
tasks ask for one CPU each, so they cannot even start until the loop has run GATE_STEPS more steps (the gate is
released from on_step): the loop can only get there if it did not wait, and the work can only be Ray tasks. No
timing thresholds. The results must equal in-process evaluation of the
checkpoints of the same steps.
"""

import os
import sys
import threading

import pytest
import ray
import torch

from nanochat.core_eval import evaluate_core
from nanochat.sft import SFTConfig, centered
from nanochat.train import BaseTrainConfig
from ray_jobs import base_train, chat_sft
from ray_jobs import train_common as tc
from tests.eval_fixtures import fixture_env, make_tiny_checkpoint, serve_fixtures

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, CORE_EVERY, GATE_STEPS, MAX_PER_TASK = 6, 2, 3, 8
WATCHDOG_S = 240  # the gate lets go by itself after this long (only if the loop blocked): the test then fails


@ray.remote(num_cpus=0)
class Gate:
    """Holds CPUs (given in .options) until killed; lets go by itself after WATCHDOG_S so a bug cannot hang CI."""

    def __init__(self):
        def expire():
            os._exit(0)

        threading.Timer(WATCHDOG_S, expire).start()

    def ready(self):
        return True


class GatedSink(tc.RaySink):
    """RaySink whose first evaluation launch (CORE in pretraining, chat eval in SFT) happens behind the gate;
    records what the loop did meanwhile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.log = None, {"launched_at": None, "released_at": None, "pending_at_release": None}

    def eval_resources(self, device):
        return {"cpus_per_worker": 1, "gpus_per_worker": 0}  # always one CPU: the gate can hold the tasks back

    def _close_gate(self, step):
        if self.rank == 0 and self.log["launched_at"] is None:
            free = ray.available_resources().get("CPU", 0)
            assert free >= 1, ray.available_resources()
            self.gate = Gate.options(num_cpus=free).remote()
            ray.get(self.gate.ready.remote())
            self.log["launched_at"] = step

    def core_metric(self, model, tokenizer, device, step, max_per_task):
        self._close_gate(step)
        return super().core_metric(model, tokenizer, device, step, max_per_task)

    def chat_metric(self, cfg, model, tokenizer, device, step, batch_size):
        self._close_gate(step)
        return super().chat_metric(cfg, model, tokenizer, device, step, batch_size)

    def on_step(self, step, metrics):
        if self.gate is not None and step >= self.log["launched_at"] + GATE_STEPS:
            # still pending = the loop ran GATE_STEPS steps while that evaluation could not even start
            self.log["pending_at_release"] = any(s == self.log["launched_at"] for _, s, _ in self.pending_evals)
            self.log["released_at"] = step
            ray.kill(self.gate)
            self.gate = None
        super().on_step(step, metrics)

    def report_final(self, result):
        super().report_final({**result, "gate_log": self.log})


def gated_worker(config):
    base_train.worker_fn(config, sink_cls=GatedSink)


def gated_sft_worker(config):
    chat_sft.worker_fn(config, sink_cls=GatedSink)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_eval")
    server = serve_fixtures(root / "served")
    base = root / "base"
    env = {**fixture_env(server), "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DTYPE": "float32",
           "NANOCHAT_COLLECTIVE_TIMEOUT_S": "120"}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is fastest on a shared 2-core machine
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
        _, tokenizer, _ = make_tiny_checkpoint(str(base))  # trains the tokenizer into base/tokenizer
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
        ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
        try:
            yield {"base": base, "tokenizer": tokenizer}
        finally:
            ray.shutdown()
            server.stop()
            torch.set_num_threads(threads)


def fit(worker, cfg: dict, run_name: str, base):
    cluster = tc.ClusterArgs(num_workers=1, cpus_per_worker=1, max_failures=0, storage=str(base / "ray_runs"))
    config = {"cfg": cfg, "run_name": run_name, "report_every": 1}
    return tc.run_trainer(worker, config, cluster, use_gpu=False, run_name=run_name).metrics


@pytest.fixture(scope="module")
def base_run(env):
    cfg = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L",
                          num_iterations=STEPS, device_batch_size=2, total_batch_size=128, eval_every=-1,
                          eval_tokens=128, core_metric_every=CORE_EVERY, core_metric_max_per_task=MAX_PER_TASK,
                          sample_every=-1, save_every=CORE_EVERY, data="synthetic", warmup_steps=1,
                          model_tag="async", device_type="cpu")  # fmt: skip
    return fit(gated_worker, cfg.to_dict(), "async-core", env["base"])


def test_core_runs_as_ray_tasks_without_stalling_training(env, base_run):
    log = base_run["gate_log"]
    assert log["launched_at"] == CORE_EVERY and log["released_at"] == CORE_EVERY + GATE_STEPS, log
    assert log["pending_at_release"] is True, f"the loop waited for the CORE evaluation: {log}"
    assert base_run["step"] == STEPS
    # every CORE step is reported (the last one awaited at the end), each equal to in-process CORE of its checkpoint
    steps = [s for s, _ in base_run["core_metrics"]]
    assert steps == list(range(CORE_EVERY, STEPS + 1, CORE_EVERY))
    from nanochat.checkpoint_manager import build_model

    for step, value in base_run["core_metrics"]:
        model, tokenizer, _ = build_model(base_run["checkpoint_dir"], step, torch.device("cpu"), phase="eval")
        expected = evaluate_core(model, tokenizer, "cpu", max_per_task=MAX_PER_TASK)["core_metric"]
        assert value == expected, (step, value, expected)
    # rank 0's final report carries the last result with the step it belongs to
    assert base_run["core_metric"] == base_run["core_metrics"][-1][1]
    assert base_run["core_metric_step"] == STEPS


def test_sft_chat_eval_runs_as_ray_tasks_without_stalling_training(env, base_run):
    from nanochat.checkpoint_manager import build_model
    from nanochat.sft import chat_eval

    # rows of 256 tokens: whole conversations with the tiny tokenizer (supervised tokens in every row)
    cfg = SFTConfig(model_tag="async", mixture="offline", offline_size=200, num_iterations=6, max_seq_len=256,
                    total_batch_size=512, eval_every=-1, eval_tokens=512, chatcore_every=2, chatcore_max_cat=4,
                    chatcore_max_sample=2, save_every=2, device_type="cpu")  # fmt: skip
    out = fit(gated_sft_worker, cfg.to_dict(), "async-sft", env["base"])
    # the step-2 chat eval was launched as Ray tasks that could not start (the gate held every CPU) while the
    # loop trained GATE_STEPS more steps: it ran as Ray tasks, and the loop did not wait for it
    log = out["gate_log"]
    assert log["launched_at"] == 2 and log["released_at"] == 2 + GATE_STEPS, log
    assert log["pending_at_release"] is True, f"the SFT loop waited for its chat evaluation: {log}"
    last = out["step"]  # the loop stops when the loader says this batch is the last (6 - 1 prefetched)
    assert last == 5 and all(loss == loss for _, loss in out["losses"])  # no NaN: every row has targets
    assert [s for s, _ in out["chatcore_metrics"]] == [2, 4, last]
    assert out["chatcore_metric_step"] == last and out["chatcore_metric"] == out["chatcore_metrics"][-1][1]
    for step, value in out["chatcore_metrics"]:  # each equals in-process evaluation of that step's checkpoint
        model, tokenizer, _ = build_model(out["checkpoint_dir"], step, torch.device("cpu"), phase="eval")
        expected = chat_eval(cfg, model, tokenizer, batch_size=2)  # B = 2, inherited from the base run
        assert set(expected) == {"WordChoice", "Arithmetic"}
        assert value == centered(expected), (step, value, expected)
    assert out["chat_eval"] == expected  # the final results are the last step's

