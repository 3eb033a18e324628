"""
Regenerate tests/fixtures/upstream_optim.pt by running upstream nanochat's MuonAdamW once (eager, CPU, fp32).

    python dev/make_upstream_fixtures_optim.py /path/to/upstream/nanochat [--out tests/fixtures/upstream_optim.pt]

The upstream checkout (commit 92d63d4) is imported from the given path; nothing of it is copied into this repo.
The fixture holds small tensors only: a menagerie of parameters (small/large AdamW, wide/tall/tiny Muon stacks,
including a 3-matrix group that needs padding across 2 ranks), seeded gradients, and upstream's parameters and
optimizer state after each step, for
  - "single": 3 single-process steps with COMPUTE_DTYPE = float32,
  - "bf16":   2 single-process steps with COMPUTE_DTYPE = bfloat16 (the Muon bf16 cast),
  - "dist":   2 steps under torchrun --nproc-per-node=2 (gloo), each rank with its own gradients; the per-rank
              optimizer state dicts are exactly upstream's optim_XXXXXX_rankN.pt contents.
tests/test_optim.py and tests/_optim_dist_worker.py rebuild the same parameters from the fixture.
"""

import argparse
import os
import subprocess
import sys
import tempfile

os.environ["NANOCHAT_DTYPE"] = "float32"

import torch  # noqa: E402

# (shape, group index) per parameter; group hyperparameters below. Order = state_dict index order.
PARAM_SPECS = [
    ((48,), 0),  # AdamW, numel < 1024: all_reduce path
    ((32, 32), 1),  # AdamW, numel == 1024: reduce_scatter path
    ((16, 32), 2), ((16, 32), 2), ((16, 32), 2),  # Muon wide, K=3 (padded to 4 on 2 ranks)
    ((32, 16), 3), ((32, 16), 3),  # Muon tall
    ((4, 12), 4), ((4, 12), 4),  # Muon tiny (like the ve_gate matrices)
]
GROUPS = [
    dict(kind="adamw", lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
    dict(kind="adamw", lr=0.01, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
    dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2),
    dict(kind="muon", lr=0.03, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.2),
    dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0),
]


def make_init(seed=1234):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 0.1 for shape, _ in PARAM_SPECS]


def make_grads(seed, steps):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) * 0.01 for shape, _ in PARAM_SPECS] for _ in range(steps)]


def run(optim_module, init, grads_per_step):
    """Step upstream's MuonAdamW; return params after every step and the final state dict."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    groups = []
    for gi, hyper in enumerate(GROUPS):
        members = [p for p, (_, g) in zip(params, PARAM_SPECS) if g == gi]
        groups.append(dict(params=members, **hyper))
    opt = optim_module.MuonAdamW(groups)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    after = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        after.append([p.detach().clone() for p in params])
    return after, opt.state_dict()


def import_upstream(path):
    sys.path.insert(0, os.path.abspath(path))
    import nanochat.optim as upstream_optim

    assert os.path.abspath(upstream_optim.__file__).startswith(os.path.abspath(path)), upstream_optim.__file__
    # Run the kernels eagerly: compiling on CPU needs a C++ toolchain, and eager is the reference semantics.
    for name in ("adamw_step_fused", "muon_step_fused"):
        setattr(upstream_optim, name, getattr(upstream_optim, name)._torchdynamo_orig_callable)
    return upstream_optim


class _DoneWork:
    """A finished collective whose get_future() works (gloo's reduce_scatter Work has no future)."""

    def get_future(self):
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut


def _synchronous(collective):
    def run(*args, async_op=False, **kwargs):
        collective(*args, **kwargs)  # blocking: same result, no overlap
        return _DoneWork() if async_op else None

    return run


def dist_worker(upstream, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"):
        setattr(dist, name, _synchronous(getattr(dist, name)))
    rank = dist.get_rank()
    optim_module = import_upstream(upstream)
    rank_grads = [make_grads(200 + r, 2) for r in range(dist.get_world_size())]
    after, sd = run(optim_module, make_init(), rank_grads[rank])
    torch.save(dict(after=after, state_dict=sd), os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("upstream", help="path to an upstream nanochat checkout (commit 92d63d4)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                                                  "upstream_optim.pt"))
    ap.add_argument("--dist-worker", metavar="OUTDIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dist_worker:
        return dist_worker(args.upstream, args.dist_worker)

    optim_module = import_upstream(args.upstream)
    init = make_init()
    fixture = dict(param_shapes=[s for s, _ in PARAM_SPECS], param_groups=[g for _, g in PARAM_SPECS],
                   groups=GROUPS, init=init)

    grads = make_grads(100, 3)
    after, sd = run(optim_module, init, grads)
    fixture["single"] = dict(grads=grads, after=after, state_dict=sd)

    optim_module.COMPUTE_DTYPE = torch.bfloat16  # read by the (eager) Muon kernel at call time
    after, sd = run(optim_module, init, grads[:2])
    fixture["bf16"] = dict(grads=grads[:2], after=after, state_dict=sd)
    optim_module.COMPUTE_DTYPE = torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", os.path.abspath(__file__),
                        args.upstream, "--dist-worker", tmp], check=True, env=env)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["after"][-1], ranks[1]["after"][-1]))
    fixture["dist"] = dict(world=2, grads=[make_grads(200 + r, 2) for r in range(2)], after=ranks[0]["after"],
                           rank_state_dicts=[r["state_dict"] for r in ranks])

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
