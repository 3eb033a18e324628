"""Shared pytest set-up: hermetic environment defaults and a per-test base directory.

Run everything: python -m pytest -q          Fast lane: python -m pytest -q -m "not ray and not slow"
"""

import os

import pytest
import torch

# Environment defaults for every test process (and the Ray workers they start, which inherit the environment).
os.environ.setdefault("WANDB_MODE", "offline")  # real wandb, no account, no network
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller collects each worker's ray.train.report every 2 s by default, and a worker's next report waits
# until the last one was collected: tiny test runs that report (and checkpoint) every step then spend ~2 s per report
# waiting (4 s a step in test_preemption). Collected every 0.2 s, the same tests run at the speed of their training.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: OpenMP threads spin while they wait, and on a shared 2-core
    machine one thread is several times faster. Modules opt in with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto) on loopback, one per test module."""
    from tests.s3server import S3Server

    with S3Server() as server:
        yield server
