"""python -m pytest tests/test_data_pipeline.py -q

The Ray Data pretraining pipeline (ray_jobs/data_pipeline.py) on one local cluster (num_cpus=4): it yields upstream's
packed batches (golden fixture), disjoint per-rank streams, exact resume (also from a plain-loader state), and it
works inside real Ray Train workers next to the training reservation.
"""

import json
import os
import sys

import pytest
import torch

from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as plain_loader
from ray_jobs.data_pipeline import make_batch_iterator
from tests.test_dataloader import UPSTREAM_KEYS, ByteTokenizer, set_rank, take, write_files

pytestmark = pytest.mark.ray

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dataloader_golden.json")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    import ray.cloudpickle

    import tests.test_dataloader

    # Actors and Train workers cannot import tests/: ship the stand-in tokenizer (and this module) by value.
    ray.cloudpickle.register_pickle_by_value(tests.test_dataloader)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def golden(ray_cluster, tmp_path_factory):
    with open(FIXTURE) as f:
        fixture = json.load(f)
    data_dir = tmp_path_factory.mktemp("golden") / "base_data_climbmix"
    write_files(data_dir, fixture["files"], row_group_size=32)
    fixture["data_dir"] = str(data_dir)
    return fixture


def ray_iter(golden, spec_or_bt, split="train", **kw):
    B, T = spec_or_bt
    return make_batch_iterator(ByteTokenizer(), B, T, split, device="cpu", data_dir=golden["data_dir"],
                               buffer_size=golden["buffer_size"], tokenizer_batch_size=golden["tokenizer_batch_size"],
                               **kw)


def close_all(*iters):
    for it in iters:
        it.close()  # stop the Ray Data executions before the next test


def assert_matches(got, expected):
    for step, (x, y, state) in enumerate(got):
        assert x.tolist() == expected["inputs"][step], f"inputs differ at step {step}"
        assert y.tolist() == expected["targets"][step], f"targets differ at step {step}"
        assert {k: state[k] for k in UPSTREAM_KEYS} == expected["states"][step]


def test_single_rank_equals_upstream_across_an_epoch_boundary(golden):
    it = ray_iter(golden, (4, 48), num_tokenizer_actors=2, rank=0, world_size=1)
    got = take(it, 40)
    close_all(it)
    assert_matches(got, golden["outputs"]["long_wraps_epoch"])
    assert got[-1][2]["epoch"] == 2


def test_two_ranks_equal_upstream_and_are_disjoint(golden):
    iters = [ray_iter(golden, (2, 24), rank=r, world_size=2) for r in (0, 1)]
    runs = [take(it, 10) for it in iters]
    close_all(*iters)
    for rank in (0, 1):
        assert_matches(runs[rank], golden["outputs"][f"ddp_rank{rank}"])
    # Row groups each rank has read or buffered: never shared.
    groups = [{(p, g) for _, _, s in run for p, g, _docs in s["buffer"]} | {(s["pq_idx"], s["rg_idx"])
                                                                             for _, _, s in run} for run in runs]
    assert groups[0] and groups[1] and not groups[0] & groups[1]
    assert all(g % 2 == 0 for _, g in groups[0]) and all(g % 2 == 1 for _, g in groups[1])


def test_resume_continues_exactly_and_interoperates_with_the_plain_loader(golden, monkeypatch):
    set_rank(monkeypatch, 0, 1)
    kw = dict(tokenizer_threads=1, tokenizer_batch_size=golden["tokenizer_batch_size"], device="cpu",
              buffer_size=golden["buffer_size"], data_dir=golden["data_dir"])
    full = take(plain_loader(ByteTokenizer(), 4, 48, "train", **kw), 40)
    # A checkpoint at step 23 (after the epoch-1 -> 2 boundary is near): the resumed Ray run sees exactly the rest.
    it = ray_iter(golden, (4, 48), resume_state=full[23][2], rank=0, world_size=1)
    resumed = take(it, 16)
    close_all(it)
    for j, (x, y, s) in enumerate(resumed):
        assert torch.equal(x, full[24 + j][0]) and torch.equal(y, full[24 + j][1]) and s == full[24 + j][2], j
    # Upstream-style state (3 keys): approximate resume = this rank's next row group, same as the plain loader.
    approx = golden["outputs"]["single"]["states"][5]
    it = ray_iter(golden, (2, 24), resume_state=approx, rank=0, world_size=1)
    got = take(it, 6)
    close_all(it)
    assert_matches(got, golden["outputs"]["resume_approx"])


def test_bad_arguments(golden, tmp_path):
    from nanochat.common import NanochatError

    with pytest.raises(ValueError, match="num_tokenizer_actors"):
        next(ray_iter(golden, (2, 24), num_tokenizer_actors=0))
    with pytest.raises(NanochatError, match="python -m nanochat.dataset"):
        next(make_batch_iterator(ByteTokenizer(), 2, 24, data_dir=str(tmp_path)))


def _train_fn(config):
    """Runs in each Ray Train worker: the interface exactly as the training loop uses it."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    it = make_batch_iterator(ByteTokenizer(), 2, 24, "train", device="cpu", data_dir=config["data_dir"],
                             buffer_size=config["buffer_size"], tokenizer_batch_size=config["tokenizer_batch_size"])
    out = [(x.tolist(), s) for x, _, s in (next(it) for _ in range(10))]
    it.close()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"env_rank": os.environ.get("RANK"), "batches": out}, f)
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_inside_ray_train_workers(golden, tmp_path):
    """2 Train workers x 1 CPU leave 2 of the 4 CPUs for the two workers' tokenizer actors."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = {k: golden[k] for k in ("data_dir", "buffer_size", "tokenizer_batch_size")}
    config["out"] = str(tmp_path)
    trainer = TorchTrainer(_train_fn, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="data_pipeline_test", storage_path=str(tmp_path / "runs")))
    trainer.fit()
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["env_rank"] == str(rank)  # the iterator took rank/world size from Ray Train's environment
        expected = golden["outputs"][f"ddp_rank{rank}"]
        assert [x for x, _ in got["batches"]] == expected["inputs"]
        assert [{k: s[k] for k in UPSTREAM_KEYS} for _, s in got["batches"]] == expected["states"]
