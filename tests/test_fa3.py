"""python -m pytest tests/test_fa3.py -q

Which attention runs and why (nanochat/fa3.py, flash_attention.describe_backend): upstream's GPU list and repos,
the one start-up line, and that the real kernel lookup falls back to SDPA in seconds without network (offline
mode, a refused endpoint, an endpoint that never answers), measured in fresh processes with an empty HF cache.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from nanochat import fa3, flash_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("capability, repo", [
    ((8, 0), fa3.AMPERE_ADA_REPO), ((8, 6), fa3.AMPERE_ADA_REPO), ((8, 9), fa3.AMPERE_ADA_REPO),
    ((9, 0), fa3.HOPPER_REPO),
])  # fmt: skip
def test_supported_gpus_try_upstreams_kernels(capability, repo):
    assert fa3.plan(True, capability, torch.bfloat16) == (repo, "")


@pytest.mark.parametrize("cuda, capability, dtype, why", [
    (False, None, torch.float32, "no CUDA device"),
    (True, (7, 5), torch.float32, "sm75 is not a GPU the FA3 kernels are built for"),
    (True, (10, 0), torch.bfloat16, "sm100 is not a GPU the FA3 kernels are built for"),
    (True, (12, 0), torch.bfloat16, "sm120 is not"),
    (True, (9, 0), torch.float32, "compute dtype is float32, FA3 needs bfloat16"),
    (True, (8, 6), torch.float16, "compute dtype is float16"),
])  # fmt: skip
def test_unsupported_cases_name_the_reason(cuda, capability, dtype, why):
    repo, reason = fa3.plan(cuda, capability, dtype)
    assert repo is None and why in reason


def test_start_up_line_on_cpu(monkeypatch):
    monkeypatch.setattr(flash_attention, "_fa3_lookup", None)
    line = flash_attention.describe_backend()
    assert line.startswith("Attention: PyTorch SDPA") and "no CUDA device (CPU run)" in line
    assert "\n" not in line


def test_without_the_kernels_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    module, reason = fa3.load_kernel(fa3.HOPPER_REPO)
    assert module is None and "pip install -e '.[gpu]'" in reason


# -----------------------------------------------------------------------------
# The real lookup without network, in a fresh process with an empty HF cache

LOOKUP = """
import json, sys, time
t0 = time.time()
import kernels  # imports (torch, huggingface_hub) timed apart: they cost the same with or without network
from nanochat import fa3
t1 = time.time()
module, reason = fa3.load_kernel(sys.argv[1])
print(json.dumps({"loaded": module is not None, "reason": reason, "seconds": time.time() - t1, "imports": t1 - t0}))
"""


def run_lookup(tmp_path, **env):
    pytest.importorskip("kernels")
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    full.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=ROOT, **env)
    out = subprocess.run([sys.executable, "-c", LOOKUP, fa3.HOPPER_REPO], env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{env}: lookup {result['seconds']:.2f} s (imports {result['imports']:.1f} s): {result['reason']}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_mode_falls_back_at_once(tmp_path):
    r = run_lookup(tmp_path, HF_HUB_OFFLINE="1")
    assert not r["loaded"] and "not in the HF cache and HF_HUB_OFFLINE is set" in r["reason"]
    assert r["seconds"] < 60  # a hang detector; measured 0.01 s on the 2-core dev machine (+ 4-7 s of imports)


def test_refused_endpoint_falls_back(tmp_path):
    r = run_lookup(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert not r["loaded"] and "could not be reached" in r["reason"] and "--prefetch" in r["reason"]
    assert r["seconds"] < 60


def test_silent_endpoint_falls_back_after_the_probe(tmp_path):
    """An endpoint that accepts connections and never answers (a black hole): bounded by the probe."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, say nothing
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        r = run_lookup(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}")
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        server.close()
    assert held, "the lookup never tried the endpoint"
    assert not r["loaded"] and "could not be reached (limit 3 s" in r["reason"]
    assert r["seconds"] < 60


# -----------------------------------------------------------------------------
# On a GPU (skips without CUDA): the start-up line names what runs, quickly, whatever the machine has


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_start_up_line(tmp_path):
    script = ("import time; t=time.time(); from nanochat.flash_attention import describe_backend; "
              "line = describe_backend(); print(line); print(f'{time.time() - t:.1f}')")
    env = {**os.environ, "PYTHONPATH": ROOT, "NANOCHAT_DTYPE": "bfloat16"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line, seconds = out.stdout.strip().splitlines()[-2:]
    print(f"\n{line} ({seconds} s)")
    assert line.startswith("Attention: ")
    major = torch.cuda.get_device_capability()[0]
    if major not in (8, 9):
        assert "is not a GPU the FA3 kernels are built for" in line


# -----------------------------------------------------------------------------
# The blocked sliding-window path trains under selective activation checkpointing: same values and gradients


def test_blocked_windows_checkpointing_keeps_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, 4, 16, generator=g).requires_grad_() for _ in range(3))
    out = flash_attention.flash_attn_func(q, k, v, causal=True, window_size=(16, 0))  # T 96 > 2 w: blocked
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = flash_attention._sdpa_sliding_blocks(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), 16)
    ref.transpose(1, 2).square().sum().backward()
    assert torch.equal(out, ref.transpose(1, 2))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip((q, k, v), (q2, k2, v2)))
