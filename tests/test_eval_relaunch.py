"""An asynchronous CORE evaluation lost with its worker group is launched again after the restart.

python -m pytest tests/test_eval_relaunch.py -q

One TorchTrainer worker (local Ray cluster, the mini eval bundle of dev/make_eval_fixtures.py over loopback HTTP)
launches CORE at step 2 while a gate actor holds every free CPU, so the evaluation cannot even start (the loop
also saves step 2: an evaluation in flight needs its weights on storage); the worker dies right after the step-3
checkpoint is complete. The gate, owned by the dead worker, dies with it, as do the evaluation's tasks. The
restarted worker group resumes from step 3, finds the step-2 evaluation in that checkpoint's meta and relaunches it
from the step-2 checkpoint: the run's result carries the step-2 CORE, equal to in-process CORE of that checkpoint.
"""

import os
import sys

import pytest
import ray
import torch

from nanochat.core_eval import evaluate_core
from nanochat.train import BaseTrainConfig
from ray_jobs import base_train
from ray_jobs import train_common as tc
from tests.test_train_async_eval import Gate, env  # noqa: F401, F811  (env: this module's cluster + fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_PER_TASK = 8


@pytest.fixture(scope="module", autouse=True)
def pickle_this_module_by_value():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/


class DyingSink(tc.RaySink):
    """First worker group: CORE at step 2 behind the gate, then death after the step-3 checkpoint is announced."""

    marker = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = None

    def eval_resources(self, device):
        return {"cpus_per_worker": 1, "gpus_per_worker": 0}

    def core_metric(self, model, tokenizer, device, step, max_per_task):
        if self.rank == 0 and not os.path.exists(self.marker) and self.gate is None:
            self.gate = Gate.options(num_cpus=ray.available_resources().get("CPU", 0)).remote()
            ray.get(self.gate.ready.remote())
        return super().core_metric(model, tokenizer, device, step, max_per_task)

    def on_checkpoint(self, step, checkpoint_dir, metrics):
        super().on_checkpoint(step, checkpoint_dir, metrics)
        if step == 3 and not os.path.exists(self.marker):
            assert any(s == 2 for _, s, _ in self.pending_evals), "the step-2 CORE should still be running"
            open(self.marker, "w").close()
            raise RuntimeError("injected failure while the step-2 CORE evaluation is in flight")


STEPS = 6


def dying_worker(config):
    DyingSink.marker = config["marker"]
    base_train.worker_fn(config, sink_cls=DyingSink)


def test_lost_core_evaluation_is_relaunched_after_a_restart(env, tmp_path):  # noqa: F811
    cfg = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", num_iterations=STEPS,
                          device_batch_size=2, total_batch_size=128, eval_every=-1, eval_tokens=128,
                          core_metric_every=2, core_metric_max_per_task=MAX_PER_TASK, sample_every=-1, save_every=3,
                          data="synthetic", warmup_steps=1, model_tag="relaunch", device_type="cpu",
                          keep_checkpoints=-1)  # fmt: skip
    cluster = tc.ClusterArgs(num_workers=1, cpus_per_worker=1, max_failures=1, storage=str(env["base"] / "ray_runs"))
    config = {"cfg": cfg.to_dict(), "run_name": "relaunch", "report_every": 1, "marker": str(tmp_path / "died")}
    out = tc.run_trainer(dying_worker, config, cluster, use_gpu=False, run_name="relaunch").metrics
    assert os.path.exists(tmp_path / "died")  # the first worker group did die mid-evaluation
    assert out["start_step"] == 3 and out["step"] == STEPS
    assert [s for s, _ in out["core_metrics"]] == [2, 4, 6]  # step 2 relaunched, 4 and 6 as usual
    from nanochat.checkpoint_manager import build_model

    for step, value in out["core_metrics"]:
        model, tokenizer, _ = build_model(out["checkpoint_dir"], step, torch.device("cpu"), phase="eval")
        assert value == evaluate_core(model, tokenizer, "cpu", max_per_task=MAX_PER_TASK)["core_metric"], step
