"""Checkpoint retention (--keep-checkpoints) and time-based cadence (--save-every-minutes), no Ray.

python -m pytest tests/test_checkpoint_retention.py -q

Real pretraining runs of a depth-2 model on the seeded synthetic stream, checkpoints on local disk and on a moto S3
server: after a run with 10 saves and K=2 exactly the newest 2 + the final one remain (model, meta and optimizer
files); steps of another run and protected steps are never touched; a delete that dies half-way leaves the newest
checkpoint loadable.
"""

import json

import pytest
import torch

from nanochat import storage
from nanochat.checkpoint_manager import (
    complete_steps,
    delete_checkpoint,
    find_last_step,
    load_checkpoint,
    prune_checkpoints,
    steps_on_storage,
)
from nanochat.common import NanochatError
from nanochat.train import BaseTrainConfig, train
from tests.s3server import S3Server


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def tiny_cfg(**kw):
    base = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", num_iterations=20,
                device_batch_size=2, total_batch_size=128, eval_every=-1, eval_tokens=128, core_metric_every=-1,
                sample_every=-1, save_every=2, data="synthetic", vocab_size=256, warmup_steps=2, device_type="cpu",
                model_tag="ret")  # fmt: skip
    base.update(kw)
    return BaseTrainConfig(**base)


def files_by_step(checkpoint_dir) -> dict:
    return {s: sorted(n) for s, n in steps_on_storage(checkpoint_dir).items()}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_ten_saves_keep_newest_two_plus_final(backend, base_dir, s3, monkeypatch):
    if backend == "s3":
        s3.apply_env(monkeypatch)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", s3.uri("retention"))
    out = train(tiny_cfg(keep_checkpoints=2))
    ckpt = out["checkpoint_dir"]
    assert out["saved_steps"] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # 10 saves
    files = files_by_step(ckpt)
    assert sorted(files) == [16, 18, 20], files  # newest 2 + final, nothing of the older 7 steps
    for s in (16, 18, 20):
        assert files[s] == [f"meta_{s:06d}.json", f"model_{s:06d}.pt", f"optim_{s:06d}_rank0.pt"]
    if backend == "s3":  # the bucket holds exactly those objects under the checkpoint prefix
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="retention/base_checkpoints/")
                .get("Contents", [])]
        assert len(keys) == 9, keys
    assert find_last_step(ckpt) == 20


def test_keep_all_is_upstream_behaviour(base_dir):
    out = train(tiny_cfg(num_iterations=8, keep_checkpoints=-1))
    assert complete_steps(out["checkpoint_dir"]) == [2, 4, 6, 8]


def test_prune_spares_other_runs_protected_steps_and_the_final(base_dir):
    out = train(tiny_cfg(num_iterations=10, keep_checkpoints=-1))
    ckpt = out["checkpoint_dir"]
    # step 2 "belongs" to another launcher run (same tag dir, e.g. a run with other settings)
    meta2 = json.loads(storage.read_bytes(storage.join(ckpt, "meta_000002.json")))
    meta2["launcher"] = {"kind": "ray", "ray_run_name": "someone-else"}
    storage.write_bytes(storage.join(ckpt, "meta_000002.json"), json.dumps(meta2).encode())
    # a save that died before its meta: an incomplete step older than what is kept
    storage.write_bytes(storage.join(ckpt, "model_000001.pt"), b"partial")
    deleted = prune_checkpoints(ckpt, keep=1, final=10, protect={4})
    assert deleted == [1, 6]
    assert complete_steps(ckpt) == [2, 4, 8, 10]


def test_a_delete_that_dies_half_way_leaves_the_newest_loadable(base_dir, monkeypatch):
    out = train(tiny_cfg(num_iterations=6, keep_checkpoints=-1))
    ckpt = out["checkpoint_dir"]
    real_remove, calls = storage.remove, []

    def dying_remove(path):  # the process "dies" after the first file of a step is gone
        calls.append(path)
        if len(calls) > 1:
            raise OSError("killed mid-delete")
        real_remove(path)

    monkeypatch.setattr(storage, "remove", dying_remove)
    with pytest.raises(OSError):
        delete_checkpoint(ckpt, 4)
    monkeypatch.setattr(storage, "remove", real_remove)
    assert calls[0].endswith("meta_000004.json")  # meta first: step 4 is now incomplete, never half-complete
    assert complete_steps(ckpt) == [2, 6]
    model, _, meta = load_checkpoint(ckpt, find_last_step(ckpt), "cpu")
    assert meta["step"] == 6 and model
    # the next retention pass removes the leftovers of the half-deleted step
    prune_checkpoints(ckpt, keep=1)
    assert sorted(files_by_step(ckpt)) == [6]


def test_save_every_minutes_turns_into_a_step_interval(base_dir, capsys):
    # 0.002 min = 0.12 s: a few steps of this model; measured after 3 steps, re-measured at each time-based save
    out = train(tiny_cfg(num_iterations=24, save_every=-1, save_every_minutes=0.002, keep_checkpoints=-1))
    saved = out["saved_steps"]
    assert saved[-1] == 24 and len(saved) >= 3, saved  # periodic saves happened, plus the final one
    assert saved[0] >= 3  # nothing before the step time was measured
    assert "Checkpoint cadence:" in capsys.readouterr().out
    assert all(json.loads(storage.read_bytes(storage.join(out["checkpoint_dir"], f"meta_{s:06d}.json")))
               ["save_reason"] in ("minutes", "final") for s in saved)  # fmt: skip


@pytest.mark.parametrize("kwargs,flag", [({"save_every_minutes": 0}, "--save-every-minutes"),
                                         ({"keep_checkpoints": 0}, "--keep-checkpoints")])
def test_bad_checkpoint_flags_name_the_flag(kwargs, flag):
    with pytest.raises(NanochatError, match=flag):
        tiny_cfg(**kwargs)
