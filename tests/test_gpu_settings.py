"""python -m pytest tests/test_gpu_settings.py -q

Upstream's CUDA allocator setting (PYTORCH_ALLOC_CONF=expandable_segments:True) in our GPU processes unless the user
chose a value. The `gpu` test checks that the allocator really uses expandable segments when an entry point applies
the default after torch was imported (as `python -m ray_jobs.base_train` does), and that a user's value wins.
Ray Train workers: tests/test_cluster_gpus.py. Also the auto choice of torch.compile (CUDA; long CPU runs).
"""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import ALLOC_CONF_DEFAULT, gpu_env_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_only_when_the_user_set_nothing():
    assert gpu_env_defaults({}) == {"PYTORCH_ALLOC_CONF": ALLOC_CONF_DEFAULT}
    assert gpu_env_defaults({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) == {}
    assert gpu_env_defaults({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {}  # the older name counts


SCRIPT = """
import torch  # imported first, as in our entry points
from nanochat.common import apply_gpu_env_defaults
apply_gpu_env_defaults()
x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
print(any(seg.get("is_expandable") for seg in torch.cuda.memory_snapshot()))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("user, expandable", [(None, "True"), ("expandable_segments:False", "False")])
def test_allocator_uses_expandable_segments(user, expandable):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env["PYTHONPATH"] = ROOT
    if user:
        env["PYTORCH_ALLOC_CONF"] = user
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expandable


# -----------------------------------------------------------------------------
# torch.compile's auto choice (BaseTrainConfig.compile = -1)


def test_compile_choice(monkeypatch):
    from nanochat import common

    assert common.compile_choice(-1, "cuda", 1)[0] is True
    assert common.compile_choice(0, "cuda", 1e9)[0] is False and common.compile_choice(1, "cpu", 1)[0] is True
    assert common.compile_choice(-1, "mps", 1e9)[0] is False
    monkeypatch.setattr(common, "have_cpp_compiler", lambda: True)
    use, why = common.compile_choice(-1, "cpu", 60)
    assert not use and "too short to pay back" in why  # tests, smoke runs, the CPU speedrun's budgets
    assert common.compile_choice(-1, "cpu", 3600)[0] is True
    monkeypatch.setattr(common, "have_cpp_compiler", lambda: False)
    assert common.compile_choice(-1, "cpu", 3600) == (False, "auto: no C++ compiler for inductor on CPU")
