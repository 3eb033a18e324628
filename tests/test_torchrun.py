"""python -m pytest tests/test_torchrun.py -q

`torchrun --nproc-per-node=2 -m ray_jobs.base_train --num-workers 0` (gloo, CPU, tiny model), as README's table
promises: both ranks exit cleanly (no abort at interpreter shutdown), every rank writes its optimizer shard, and the
run equals the same command in one process (2 ranks x 1 micro-batch = 1 rank x 2 accumulation steps on the seeded
synthetic stream): same losses, same final weights.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow]

STEPS = 4
FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "L",
         "--num-iterations", str(STEPS), "--device-batch-size", "2", "--total-batch-size", "256", "--eval-every", "2",
         "--eval-tokens", "256", "--core-metric-every", "-1", "--sample-every", "-1", "--save-every", "-1", "--data",
         "synthetic", "--vocab-size", "256", "--warmup-steps", "1", "--device-type", "cpu", "--model-tag", "tr",
         "--num-workers", "0"]  # fmt: skip


def run(cmd, base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def losses(stdout):
    return {int(s): float(v) for s, v in re.findall(rf"step (\d+)/{STEPS:05d} .*?\| loss: ([0-9.]+)", stdout)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two, one = tmp_path_factory.mktemp("torchrun2"), tmp_path_factory.mktemp("inprocess1")
    out2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "ray_jobs.base_train", *FLAGS], two)  # fmt: skip
    out1 = run([sys.executable, "-m", "ray_jobs.base_train", *FLAGS], one)
    return {"two": (two / "base_checkpoints" / "tr", out2), "one": (one / "base_checkpoints" / "tr", out1)}


def test_two_ranks_write_their_shards_and_exit_cleanly(runs):
    ck, out = runs["two"]
    names = sorted(p.name for p in ck.iterdir())
    assert names == [f"meta_{STEPS:06d}.json", f"model_{STEPS:06d}.pt", f"optim_{STEPS:06d}_rank0.pt",
                     f"optim_{STEPS:06d}_rank1.pt"], names  # fmt: skip
    assert json.loads((ck / f"meta_{STEPS:06d}.json").read_text())["world_size"] == 2
    assert "gradient accumulation steps: 1" in out and "gradient accumulation steps: 2" in runs["one"][1]


def test_torchrun_equals_one_process(runs):
    (ck2, out2), (ck1, out1) = runs["two"], runs["one"]
    l2, l1 = losses(out2), losses(out1)
    assert sorted(l2) == sorted(l1) == list(range(STEPS)), (l2, l1)
    for s in l1:
        assert abs(l1[s] - l2[s]) < 1e-4, (s, l1[s], l2[s])
    m2 = torch.load(ck2 / f"model_{STEPS:06d}.pt")
    m1 = torch.load(ck1 / f"model_{STEPS:06d}.pt")
    assert m1.keys() == m2.keys()
    assert max((m1[k].float() - m2[k].float()).abs().max().item() for k in m1) < 1e-4
