"""Presets carry the checkpoint cadence, retry budgets and elastic bounds; the speedrun passes them to Ray Train.

python -m pytest tests/test_elastic_presets.py -q
"""

import pytest

from nanochat.common import NanochatError
from nanochat.train import BaseTrainConfig, plan_for
from ray_jobs import presets, speedrun
from ray_jobs import train_common as tc


@pytest.mark.parametrize("name", ["speedrun", "d24", "d12", "miniseries"])
def test_gpu_presets_checkpoint_every_15_minutes_with_separate_budgets(name):
    p = presets.get_preset(name)
    assert p["base_train"]["save_every_minutes"] == 15 and p["base_train"]["keep_checkpoints"] == 2
    assert p["ray"]["max_failures"] == 3  # real failures: bounded
    assert p["ray"]["max_preemption_failures"] == -1  # preemptions: unlimited
    assert p["ray"]["min_workers"] == 8  # may continue on one 8-GPU node


def test_cpu_preset_checkpoints_by_time():
    p = presets.get_preset("cpu")
    assert p["base_train"]["save_every_minutes"] == p["chat_sft"]["save_every_minutes"] == 1.0


def test_speedrun_passes_min_workers_and_budgets():
    p = speedrun.resolve_config(speedrun.parse_args(["--preset", "speedrun", "--nodes", "2"]))
    pipe = speedrun.Pipeline("/nonexistent", p, {"run_id": "r"}, None, set())
    args = pipe._cluster_args("x")
    assert (args.num_workers, args.min_workers) == (16, 8)
    assert (args.max_failures, args.max_preemption_failures, args.narrow_elastic) == (3, -1, True)
    one_node = speedrun.Pipeline("/nonexistent", presets.get_preset("speedrun"), {"run_id": "r"}, None, set())
    assert one_node._cluster_args("x").min_workers == -1  # 8 of 8: nothing to shrink to


def test_every_world_size_is_checked_up_front():
    cfg = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=2,
                          total_batch_size=512, num_iterations=4)  # 4 rows of 128 tokens: 1, 2 or 4 workers
    check = lambda world: plan_for(cfg, 512, world)  # noqa: E731
    fixed_elastic = tc.ClusterArgs(num_workers=4, min_workers=1)
    with pytest.raises(NanochatError, match="3 workers"):  # a user's explicit range: an error naming the fix
        tc.check_world_sizes(fixed_elastic, check)
    preset = tc.ClusterArgs(num_workers=4, min_workers=1, narrow_elastic=True)
    tc.check_world_sizes(preset, check)  # the speedrun's presets: the range shrinks to sizes that divide
    assert preset.min_workers == -1  # 3 does not divide: 4..4, i.e. fixed (logged)
    two = tc.ClusterArgs(num_workers=2, min_workers=1, narrow_elastic=True)
    tc.check_world_sizes(two, check)
    assert two.min_workers == 1  # 1 and 2 both divide: fully elastic
    with pytest.raises(NanochatError):  # the full size itself never divides: always an error
        tc.check_world_sizes(tc.ClusterArgs(num_workers=3, min_workers=1, narrow_elastic=True), check)


def test_elastic_pretraining_deals_the_batch_unevenly_below_the_full_size(tmp_path, monkeypatch):
    """A node lost from an elastic run may leave a worker count the batch does not divide over: base_train deals the
    micro-batches out unevenly there (tests/test_torchrun.py: same math), so every size stays possible."""
    from ray_jobs import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    kw = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=2, total_batch_size=512,
              num_iterations=4, data="synthetic", vocab_size=512, device_type="cpu")  # 4 micro-batches of 2 x 64
    elastic = tc.ClusterArgs(num_workers=4, min_workers=1, narrow_elastic=True, storage=str(tmp_path / "runs"))
    cfg, _, _ = base_train.prepare(BaseTrainConfig(**kw), elastic)
    assert cfg.uneven_batch == 1 and elastic.min_workers == 1  # 3 workers: 2/1/1 micro-steps, not a narrower range
    plan = plan_for(cfg, 512, 3)
    assert (plan.micro_batches, plan.grad_accum_steps) == (4, 2)
    fixed = tc.ClusterArgs(num_workers=4, storage=str(tmp_path / "runs"))
    assert base_train.prepare(BaseTrainConfig(**kw), fixed)[0].uneven_batch == 0  # fixed size: upstream's rule
    with pytest.raises(NanochatError, match="3 workers"):  # the full size must still divide (or ask: --uneven-batch 1)
        base_train.prepare(BaseTrainConfig(**kw), tc.ClusterArgs(num_workers=3, min_workers=1))
    with pytest.raises(NanochatError, match="at least one micro-batch for each of 5 workers"):
        plan_for(BaseTrainConfig(**kw, uneven_batch=1), 512, 5)
    with pytest.raises(NanochatError, match="--uneven-batch must be 1, 0 or -1"):
        BaseTrainConfig(**kw, uneven_batch=2)
