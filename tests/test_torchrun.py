"""python -m pytest tests/test_torchrun.py -q

`torchrun --nproc-per-node=2 -m ray_jobs.base_train --num-workers 0` (gloo, CPU, tiny model), as README's table
promises: both ranks exit cleanly (no abort at interpreter shutdown), every rank writes its optimizer shard, and the
run equals the same command in one process (2 ranks x 1 micro-batch = 1 rank x 2 accumulation steps on the seeded
synthetic stream): same losses, same final weights. The same holds for an uneven deal (--uneven-batch 1, what an
elastic run uses after shrinking to a size the batch does not divide over): 3 ranks share 4 micro-batches 2/1/1.
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
    three = tmp_path_factory.mktemp("torchrun3")
    uneven = [*FLAGS, "--device-batch-size", "1", "--uneven-batch", "1"]  # 256 tokens = 4 micro-batches of 1 x 64
    out3 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m",
                "ray_jobs.base_train", *uneven], three)  # fmt: skip
    return {"two": (two / "base_checkpoints" / "tr", out2), "one": (one / "base_checkpoints" / "tr", out1),
            "three": (three / "base_checkpoints" / "tr", out3)}


def test_two_ranks_write_their_shards_and_exit_cleanly(runs):
    ck, out = runs["two"]
    names = sorted(p.name for p in ck.iterdir())
    assert names == [f"meta_{STEPS:06d}.json", f"model_{STEPS:06d}.pt", f"optim_{STEPS:06d}_rank0.pt",
                     f"optim_{STEPS:06d}_rank1.pt"], names  # fmt: skip
    assert json.loads((ck / f"meta_{STEPS:06d}.json").read_text())["world_size"] == 2
    assert "gradient accumulation steps: 1" in out and "gradient accumulation steps: 2" in runs["one"][1]


@pytest.mark.parametrize("ranks", ["two", "three"])
def test_torchrun_equals_one_process(runs, ranks):
    (ck2, out2), (ck1, out1) = runs[ranks], runs["one"]
    l2, l1 = losses(out2), losses(out1)
    assert sorted(l2) == sorted(l1) == list(range(STEPS)), (l2, l1)
    for s in l1:
        assert abs(l1[s] - l2[s]) < 1e-4, (s, l1[s], l2[s])
    m2 = torch.load(ck2 / f"model_{STEPS:06d}.pt")
    m1 = torch.load(ck1 / f"model_{STEPS:06d}.pt")
    assert m1.keys() == m2.keys()
    diff = {k: (m1[k].float() - m2[k].float()).abs().max().item() for k in m1}
    if ranks == "two":  # 2 ranks add the 2 micro-batch gradients in the order one process does: the same weights
        assert max(diff.values()) < 1e-4, diff
    else:
        # 3 ranks add in another order. The scalar gains (Adam on gradients near zero, where rounding flips the
        # update's sign) drift even between two one-process runs that only batch differently (backout_lambda by
        # 0.08 at 1x3 vs 3x1 rows); every matrix and embedding must agree
        assert max(d for k, d in diff.items() if m1[k].dim() >= 2) < 1e-3, diff


def test_an_uneven_deal_says_so_and_every_rank_writes_its_shard(runs):
    ck, out = runs["three"]
    assert "Uneven batch: 4 micro-batches over 3 workers: rank 0 runs 2 micro-steps, the others 1" in out
    assert sorted(p.name for p in ck.glob("optim_*")) == [f"optim_{STEPS:06d}_rank{r}.pt" for r in range(3)]
