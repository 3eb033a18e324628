"""python -m pytest tests/test_optim_compile.py -q

MuonAdamW with torch.compile'd kernels (the CUDA default) gives the same parameters as the eager kernels (the CPU
default). Slow on CPU: inductor runs a C++ compiler for each kernel (one AdamW and one Muon graph here).
"""

import pytest
import torch

from nanochat.optim import MuonAdamW

pytestmark = pytest.mark.slow


def run(compile_kernels: bool):
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(32, 32, generator=gen) * 0.1)] + \
             [torch.nn.Parameter(torch.randn(16, 32, generator=gen) * 0.1) for _ in range(2)]
    opt = MuonAdamW([
        dict(kind="adamw", params=params[:1], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(kind="muon", params=params[1:], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2),
    ], compile=compile_kernels)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        # Schedules change lr/momentum every step: values travel as 0-D tensors, so nothing recompiles.
        for group in opt.param_groups:
            group["lr"] *= 0.9
        opt.step()
    return [p.detach().clone() for p in params]


def test_compiled_kernels_match_eager():
    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
