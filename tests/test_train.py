"""Pretraining loop without Ray: derivations vs the spec's numbers, schedules, flag validation, exact resume.

python -m pytest tests/test_train.py -q
"""

import math
import subprocess
import sys

import pytest
import torch

from nanochat.common import NanochatError
from nanochat.train import (
    BaseTrainConfig,
    build_model_meta,
    derive_plan,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    plan_for,
    scaling_params,
    synthetic_loader,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Scaling params (transformer matrices incl. ve_gates + lm_head) at vocab 32768, computed by hand from the shapes:
# per layer 12*C^2, plus ceil(n/2) value-embedding gates of n_head x 12, plus lm_head C x 32768.
SCALING = {12: 110_100_912, 20: 435_160_240, 24: 729_810_624, 26: 918_423_532}



def tiny_cfg(**kw):
    base = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", num_iterations=6,
                device_batch_size=2, total_batch_size=256, eval_every=-1, eval_tokens=256, core_metric_every=-1,
                sample_every=-1, save_every=-1, data="synthetic", vocab_size=512, warmup_steps=2)
    base.update(kw)
    return BaseTrainConfig(**base)


# -----------------------------------------------------------------------------
# Derived quantities (spec §4.6 table, §6.4)


@pytest.mark.parametrize("depth", [12, 20, 24, 26])
def test_meta_model_scaling_params_match_hand_count(depth):
    model = build_model_meta(BaseTrainConfig(depth=depth), vocab_size=32768)
    assert scaling_params(model) == SCALING[depth]
    width = {12: 768, 20: 1280, 24: 1536, 26: 1664}[depth]
    assert (model.config.n_embd, model.config.n_head) == (width, width // 128)


def test_d24_ratio12_at_524288_gives_16704_steps():
    cfg = BaseTrainConfig(depth=24, total_batch_size=524288, device_batch_size=16)
    plan = derive_plan(cfg, SCALING[24], SCALING[12], 4.78e9, world_size=8)
    assert plan.num_iterations == 16704
    assert plan.grad_accum_steps == 524288 // (16 * 2048 * 8) == 2
    assert plan.batch_lr_scale == 1.0


@pytest.mark.parametrize("depth,batch,iters,wd", [
    (12, 524_288, 2520, 0.28), (20, 1_048_576, 4980, 0.1002), (24, 1_048_576, 8352, 0.0597),
    (26, 1_048_576, 10510, None),
])  # fmt: skip
def test_auto_batch_horizon_and_weight_decay(depth, batch, iters, wd):
    cfg = BaseTrainConfig(depth=depth)
    plan = derive_plan(cfg, SCALING[depth], SCALING[12], 1e9, world_size=8)
    assert plan.auto_batch and plan.total_batch_size == batch
    assert plan.num_iterations == iters
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(batch / 2**19))
    if wd is not None:
        assert round(plan.weight_decay, 4) == wd


def test_target_flops_horizon_and_precedence():
    cfg = BaseTrainConfig(depth=12, target_flops=1e18, total_batch_size=524288)
    plan = derive_plan(cfg, SCALING[12], SCALING[12], 7.6e8, world_size=8)
    assert plan.horizon_source == "flops" and plan.num_iterations == round(1e18 / (7.6e8 * 524288))
    cfg = BaseTrainConfig(depth=12, target_flops=1e18, num_iterations=7, total_batch_size=524288)
    assert derive_plan(cfg, SCALING[12], SCALING[12], 7.6e8, world_size=8).num_iterations == 7


def test_plan_for_uses_real_model_counts():
    plan = plan_for(BaseTrainConfig(depth=24, total_batch_size=524288, device_batch_size=16), 32768, world_size=8)
    assert plan.num_iterations == 16704


# -----------------------------------------------------------------------------
# Schedules (spec §6.5)


def test_lr_schedule_warmup_flat_warmdown():
    n = 1000  # warmdown = 650 steps starting after step 350
    assert lr_multiplier(0, n, 40, 0.65, 0.05) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(350, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(n, n, 40, 0.65, 0.05) == pytest.approx(0.05)
    assert lr_multiplier(675, n, 40, 0.65, 0.05) == pytest.approx(0.5 + 0.5 * 0.05)


def test_muon_momentum_and_weight_decay_schedules():
    n = 2000  # warmdown starts at 700
    assert muon_momentum(0, n, 0.65) == pytest.approx(0.85)
    assert muon_momentum(200, n, 0.65) == pytest.approx(0.91)
    assert muon_momentum(500, n, 0.65) == 0.97
    assert muon_momentum(n, n, 0.65) == pytest.approx(0.90)
    assert muon_weight_decay(0, n, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(n // 2, n, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(n, n, 0.2) == pytest.approx(0.0)


# -----------------------------------------------------------------------------
# Flag validation: errors name the flag


@pytest.mark.parametrize("kwargs,flag", [
    (dict(depth=0), "--depth"), (dict(device_type="tpu"), "--device-type"), (dict(window_pattern="SXL"),
    "--window-pattern"), (dict(num_iterations=-1, target_flops=-1, target_param_data_ratio=-1), "--num-iterations"),
    (dict(fp8_recipe="rowwise"), "--fp8-recipe"), (dict(total_batch_size=0), "--total-batch-size"),
])  # fmt: skip
def test_bad_flags_name_the_flag(kwargs, flag):
    with pytest.raises(NanochatError, match=flag):
        BaseTrainConfig(**kwargs)


def test_batch_not_divisible_names_flags():
    cfg = BaseTrainConfig(depth=4, max_seq_len=512, device_batch_size=3, total_batch_size=1024)
    with pytest.raises(NanochatError, match="--total-batch-size"):
        plan_for(cfg, 4096, world_size=1)


def test_cli_rejects_bad_flags_before_ray(base_dir):
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.base_train", "--depth", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--depth" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.base_train", "--data", "synthetic", "--vocab-size", "512",
                           "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "3", "--total-batch-size",
                           "256", "--num-workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--total-batch-size" in proc.stderr, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # rejected before Ray started


def test_unreachable_storage_fails_fast(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "s3://no-such-bucket/base")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.base_train", "--data", "synthetic", "--vocab-size", "512",
                           "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size",
                           "256", "--num-workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # the storage check comes first


# -----------------------------------------------------------------------------
# Data and the loop


def test_synthetic_rows_do_not_depend_on_world_size():
    # one step of 4 rows: (1 worker, 2 micro-steps of 2) vs (2 workers, 1 micro-step of 2)
    one = synthetic_loader(2, 8, 100, seed=1, rank=0, world=1, device="cpu")
    rows_1 = torch.cat([next(one)[0], next(one)[0]])
    r0 = synthetic_loader(2, 8, 100, seed=1, rank=0, world=2, device="cpu")
    r1 = synthetic_loader(2, 8, 100, seed=1, rank=1, world=2, device="cpu")
    assert torch.equal(rows_1, torch.cat([next(r0)[0], next(r1)[0]]))
    # resuming from a yielded state continues with the next batch, for any world size
    _, _, state = next(r0)
    x_next = next(r0)[0]
    assert torch.equal(next(synthetic_loader(2, 8, 100, 1, 0, 2, "cpu", state))[0], x_next)
    x_one = next(synthetic_loader(4, 8, 100, 1, 0, 1, "cpu", {"ranks": [state, state]}))[0]
    assert torch.equal(x_one[:2], x_next)


def test_resume_is_exact(base_dir):
    full = train(tiny_cfg(save_every=3))
    assert full["step"] == 6 and len(full["losses"]) == 6
    ckpt = base_dir / "base_checkpoints" / "d2"
    assert {p.name for p in ckpt.iterdir()} >= {"model_000003.pt", "meta_000003.json", "optim_000003_rank0.pt",
                                                "model_000006.pt", "meta_000006.json", "optim_000006_rank0.pt"}
    reference = torch.load(ckpt / "model_000006.pt")
    resumed = train(tiny_cfg(save_every=3, resume_from_step=3))
    assert resumed["start_step"] == 3 and [s for s, _ in resumed["losses"]] == [3, 4, 5]
    assert resumed["losses"] == full["losses"][3:]
    after = torch.load(ckpt / "model_000006.pt")
    for k in reference:
        assert torch.equal(reference[k], after[k]), k


def test_val_bpb_and_step_line(base_dir, capsys):
    result = train(tiny_cfg(eval_every=3, num_iterations=3))
    out = capsys.readouterr().out
    assert "Step 00000 | Validation bpb:" in out and "Step 00003 | Validation bpb:" in out
    assert "step 00002/00003 (66.67%) | loss: " in out and "| bf16_mfu: " in out and "| tok/sec: " in out
    assert result["val_bpb"] == pytest.approx(math.log2(512), rel=0.05)  # random tokens: ~9 bits per token
    assert result["mfu"] > 0  # CPU MFU against the measured peak, not 0


@pytest.mark.slow  # the wandb service process takes tens of seconds to start on a loaded 2-core machine
def test_wandb_offline_run_is_written_by_rank0(base_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # real wandb client, no account, no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(tiny_cfg(run="unit-run", num_iterations=1, eval_every=1))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_cpu_peak_measurement_leaves_the_global_rng_alone():
    """MFU's CPU peak is measured lazily inside train(); it must not shift the weights a seed gives."""
    from nanochat.common import cpu_peak_flops

    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    peak = cpu_peak_flops.__wrapped__(n=128, bursts=3, burst_s=0.01, gap_s=0.01)
    assert torch.equal(torch.rand(4), expected)
    assert math.isfinite(peak) and peak > 0


def test_cpu_peak_refresh_only_raises_the_estimate():
    """A start-up measurement taken while other processes held the cores is corrected by later bursts."""
    from nanochat.common import PeakFlops, cpu_peak_flops

    peak = PeakFlops(torch.device("cpu"))
    assert peak.value == cpu_peak_flops()
    peak.value = 1.0  # as if every start-up burst had been starved
    assert peak.refresh() > 1e8  # one real burst: any CPU multiplies faster than 0.1 GFLOP/s
    peak.value = 1e30
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    assert peak.refresh() == 1e30 and torch.equal(torch.rand(4), expected)  # never lowers it; global RNG untouched


def test_cpu_peak_current_refreshes_on_every_tenth_call():
    from nanochat.common import PeakFlops

    peak = PeakFlops(torch.device("cpu"))
    peak.value = 1.0
    assert peak.current() > 1e8  # 1st call: a burst
    peak.value = 1.0
    assert [peak.current() for _ in range(9)] == [1.0] * 9  # 2nd..10th: no burst
    assert peak.current() > 1e8  # 11th
