"""python -m pytest tests/test_optim.py -q

MuonAdamW: AdamW against torch.optim.AdamW; both halves against upstream nanochat's golden run
(tests/fixtures/upstream_optim.pt, written by dev/make_upstream_fixtures_optim.py) single-process, with the bf16
Muon cast, and per rank at world size 2; a 2-rank torchrun step (gloo, native and fallback collectives) against
single-process gradient accumulation on a tiny GPT; re-sharding 2 -> 1 and 1 -> 2 ranks; determinism; the eager CPU
kernels (chunked AdamW, in-place Muon) equal the reference kernels bit for bit.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker module, whatever pytest's import mode
import _optim_dist_worker as W  # noqa: E402

import nanochat.optim as optim_module  # noqa: E402
from nanochat.common import NanochatError  # noqa: E402
from nanochat.optim import (  # noqa: E402
    MuonAdamW,
    gather_full_optimizer_state,
    load_resharded_state_dict,
    shard_optimizer_state,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fixture():
    return torch.load(W.FIXTURE)


@pytest.fixture(autouse=True)
def _fp32_compute(monkeypatch):
    # The golden runs used COMPUTE_DTYPE = float32 (the bf16 test switches it on purpose).
    monkeypatch.setattr(optim_module, "COMPUTE_DTYPE", torch.float32)


def assert_state_dicts_close(ours: dict, theirs: dict, atol=1e-6, rtol=1e-5):
    """Same layout (indices, keys, shapes, step counts, group hyperparameters) and close tensors."""
    assert ours["param_groups"] == theirs["param_groups"]
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, entry in theirs["state"].items():
        assert sorted(ours["state"][index]) == sorted(entry), index
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert ours["state"][index][key].shape == value.shape, (index, key)
                torch.testing.assert_close(ours["state"][index][key], value, atol=atol, rtol=rtol)
            else:
                assert ours["state"][index][key] == value, (index, key)


def assert_params_close(ours, theirs, atol=1e-6, rtol=1e-5):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"param {i}: {m}")


def run_fixture_steps(fixture, variant):
    params, opt = W.fixture_params_and_groups(fixture)
    for step, grads in enumerate(fixture[variant]["grads"]):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        assert_params_close(W.snapshot(params), fixture[variant]["after"][step])
    return params, opt


# -----------------------------------------------------------------------------
# Single process


def test_adamw_matches_torch_reference():
    hypers = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 32, generator=gen)), torch.nn.Parameter(torch.randn(40, generator=gen))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = MuonAdamW([dict(kind="adamw", params=ours, **hypers)])
    opt_ref = torch.optim.AdamW(ref, **hypers)
    for _ in range(10):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_ref.step()
    assert_params_close(ours, ref)


def test_adamw_bf16_params_update_in_fp32():
    """bf16 storage (as upstream's embeddings on GPU): the math runs in fp32 and rounds once at the end."""
    p32 = torch.nn.Parameter(torch.randn(32, 32))
    p16 = torch.nn.Parameter(p32.detach().bfloat16())
    group = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    ref = MuonAdamW([dict(kind="adamw", params=[p32], **group)])
    low = MuonAdamW([dict(kind="adamw", params=[p16], **group)])
    p32.grad = torch.randn(32, 32)
    p16.grad = p32.grad.bfloat16()
    with torch.no_grad():
        p32.copy_(p16.float())
    ref.step()
    low.step()
    assert p16.dtype == torch.bfloat16 and low.state[p16]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(p16.float(), p32.detach(), atol=1e-2, rtol=1e-2)


def test_matches_upstream_single_process(fixture):
    """Three steps of every group kind equal upstream's parameters, and the state dict equals upstream's file."""
    _, opt = run_fixture_steps(fixture, "single")
    assert_state_dicts_close(opt.state_dict(), fixture["single"]["state_dict"])


def test_matches_upstream_bf16_muon(fixture, monkeypatch):
    """COMPUTE_DTYPE = bf16: the polar iteration runs in bf16 exactly as upstream's (same CPU kernels)."""
    monkeypatch.setattr(optim_module, "COMPUTE_DTYPE", torch.bfloat16)
    _, opt = run_fixture_steps(fixture, "bf16")
    assert_state_dicts_close(opt.state_dict(), fixture["bf16"]["state_dict"])


def test_loads_upstream_state_dict(fixture):
    """An upstream optimizer file loads and round-trips bit for bit and continues like the run that wrote it; a
    state saved and reloaded here continues bit for bit. (Upstream's file was written on another CPU, whose
    kernels round differently in the last bit, so continuing from it is compared at run_fixture_steps' tolerance.)"""
    params, opt = W.fixture_params_and_groups(fixture)
    with torch.no_grad():
        for p, saved in zip(params, fixture["single"]["after"][-1]):
            p.copy_(saved)
    opt.load_state_dict(fixture["single"]["state_dict"])
    assert_state_dicts_close(opt.state_dict(), fixture["single"]["state_dict"], atol=0, rtol=0)
    ref_params, ref_opt = run_fixture_steps(fixture, "single")
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ref_params], "optim": ref_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed_params, resumed = W.fixture_params_and_groups(fixture)
    with torch.no_grad():
        for p, q in zip(resumed_params, saved["params"]):
            p.copy_(q)
    resumed.load_state_dict(saved["optim"])
    for group in (params, ref_params, resumed_params):
        for p in group:
            p.grad = torch.full_like(p, 0.01)
    for o in (opt, ref_opt, resumed):
        o.step()
    assert_params_close(W.snapshot(params), W.snapshot(ref_params))
    assert_params_close(W.snapshot(resumed_params), W.snapshot(ref_params), atol=0, rtol=0)


def test_determinism(fixture):
    runs = [W.snapshot(run_fixture_steps(fixture, "single")[0]) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_convergence_and_orthogonality():
    """Behaviour, not just equality: distance to a target shrinks; the first Muon update is near-orthogonal."""
    gen = torch.Generator().manual_seed(3)
    targets = [torch.randn(48, generator=gen), torch.randn(32, 32, generator=gen)] + \
              [torch.randn(16, 32, generator=gen) for _ in range(2)]
    params = [torch.nn.Parameter(t + 0.1) for t in targets]
    opt = MuonAdamW([dict(kind="adamw", params=params[:2], lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0),
                     dict(kind="muon", params=params[2:], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9,
                          weight_decay=0)])
    start = [(p - t).norm().item() for p, t in zip(params, targets)]
    for _ in range(40):
        for p, t in zip(params, targets):
            p.grad = 2 * (p.detach() - t)
        opt.step()
    for i, (p, t) in enumerate(zip(params, targets)):
        assert (p - t).norm().item() < 0.5 * start[i], i

    p = torch.nn.Parameter(torch.zeros(32, 64))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=1.0, momentum=0.0, ns_steps=5, beta2=1.0, weight_decay=0.0)])
    p.grad = torch.randn(32, 64, generator=gen)
    opt.step()
    s = torch.linalg.svdvals(p.detach())
    assert s.max() / s.min() < 4.0, s


def test_compile_is_optional(monkeypatch):
    p = torch.nn.Parameter(torch.randn(8, 8))
    group = dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    assert MuonAdamW([group])._use_compile() is False  # CPU parameters: eager by default
    assert MuonAdamW([group], compile=True)._use_compile() is True
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "1")
    assert MuonAdamW([group])._use_compile() is True
    assert MuonAdamW([group], compile=False)._use_compile() is False


def _hyper(*values):
    return [torch.tensor(float(v)) for v in values]


def _same_bits(a, b):
    """Bitwise equality (tells +0 from -0, and a NaN equals the same NaN)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_inplace_kernels_equal_reference_kernels_bitwise(monkeypatch, compute_dtype, param_dtype):
    """The eager CPU kernels (chunked AdamW, in-place Muon) give exactly the reference kernels' bits."""
    monkeypatch.setattr(optim_module, "COMPUTE_DTYPE", compute_dtype)
    gen = torch.Generator().manual_seed(5)
    # AdamW: several chunks with a ragged tail, one chunk, a non-contiguous gradient (allocating fallback); second
    # moments with exact zeros and subnormals (the sqrt floor) and epsilons with and without the floor, and a NaN.
    for shape, chunk, transpose_grad, eps in (((300, 70), 4096, False, 1e-10), ((300, 70), 4096, False, 1e-13),
                                              ((37,), 4096, False, 1e-8), ((24, 40), 256, True, 0.0)):
        tensors = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 0.1,
                   torch.randn(shape, generator=gen) * 0.01, torch.rand(shape, generator=gen) * 1e-3]
        tensors[1][:9] = 0.0  # rows 0-4 never seen (zero moments); rows 5-8 rare: subnormal second moments
        tensors[2][:5] = 0.0
        tensors[3][:5] = 0.0
        tensors[3][5:9] = 1e-40 if param_dtype == torch.float32 else 1e-39
        tensors[1].view(-1)[-1] = float("nan")
        tensors = [t.to(param_dtype) for t in tensors]
        if transpose_grad:
            tensors[1] = tensors[1].t().contiguous().t()
        ref, ours = [t.clone() for t in tensors], [t.clone() for t in tensors]
        for step in (1, 2, 3):
            hyper = _hyper(step, 0.01, 0.8, 0.95, eps, 0.1)
            optim_module.adamw_step_fused(*ref, *hyper)
            optim_module.adamw_step_chunked(*ours, *hyper, scratch=torch.empty(chunk))
        for a, b in zip(ref, ours):
            assert _same_bits(a, b), (shape, chunk, eps)
    # Muon: square, tall and wide stacks; odd and even ns_steps (the polar buffers swap every iteration).
    for (k, m, n), ns_steps in (((3, 32, 32), 5), ((2, 48, 16), 2), ((2, 16, 40), 5), ((1, 24, 20), 1)):
        red_dim = -1 if m >= n else -2
        second = (k, m, 1) if m >= n else (k, 1, n)
        tensors = [torch.randn(k, m, n, generator=gen), torch.randn(k, m, n, generator=gen) * 0.05,
                   torch.randn(k, m, n, generator=gen), torch.rand(second, generator=gen)]
        tensors = [t.to(param_dtype) for t in tensors]
        ref, ours = [t.clone() for t in tensors], [t.clone() for t in tensors]
        for step in range(2):
            grad = torch.randn(k, m, n, generator=gen).to(param_dtype)
            hyper = _hyper(0.95, 0.02, 0.3, 0.9)
            optim_module.muon_step_fused(grad.clone(), *ref[1:], *hyper, ns_steps, red_dim)
            optim_module.muon_step_inplace(grad.clone(), *ours[1:], *hyper, ns_steps, red_dim)
            for a, b in zip(ref[1:], ours[1:]):  # params and both moments (the grads are scratch)
                assert _same_bits(a, b), ((k, m, n), ns_steps, step)


def test_eager_cpu_step_avoids_the_allocating_kernels(monkeypatch):
    """Default CPU runs take the in-place kernels (the reference ones allocate full-size temporaries per op)."""

    def refuse(*args, **kwargs):
        raise AssertionError("allocating reference kernel called on the eager CPU path")

    monkeypatch.setattr(optim_module, "adamw_step_fused", refuse)
    monkeypatch.setattr(optim_module, "muon_step_fused", refuse)
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(200, 48, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]
    muon = [torch.nn.Parameter(torch.randn(16, 24, generator=gen)) for _ in range(2)]
    opt = MuonAdamW([dict(kind="adamw", params=params, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
                     dict(kind="muon", params=muon, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1)])
    before = [p.detach().clone() for p in params + muon]
    for p in params + muon:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params + muon, before))


def test_bad_groups_raise_clear_errors():
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[a, b], lr=0.1, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0)])
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([dict(kind="adamw", params=[a], lr=0.1)])
    opt = MuonAdamW([dict(kind="adamw", params=[a], lr=0.1, betas=(0.9, 0.9), eps=1e-8, weight_decay=0)])
    with pytest.raises(NanochatError, match="no gradient"):
        opt.step()


# -----------------------------------------------------------------------------
# Re-sharding (pure functions, single process)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_then_gather_is_identity(fixture, world):
    """Any world size, including ones that need padding (rows 32 on 3/5 ranks, K = 3 on 2 ranks)."""
    _, opt = run_fixture_steps(fixture, "single")
    full = opt.state_dict()
    shards = [shard_optimizer_state(full, opt, r, world) for r in range(world)]
    assert_state_dicts_close(gather_full_optimizer_state(shards, opt), full, atol=0, rtol=0)


def test_gather_upstream_rank_files(fixture):
    """Upstream's 2-rank files merge into one full state; cutting it again gives upstream's files back."""
    params, opt = W.fixture_params_and_groups(fixture)
    ranks = fixture["dist"]["rank_state_dicts"]
    full = gather_full_optimizer_state(ranks, opt)
    opt.load_state_dict(full)  # fits world size 1
    assert opt.state[params[2]]["momentum_buffer"].shape == (3, 16, 32)
    for r in range(2):
        assert_state_dicts_close(shard_optimizer_state(full, opt, r, 2), ranks[r], atol=0, rtol=0)


def test_wrong_world_size_is_a_clear_error(fixture):
    _, opt = W.fixture_params_and_groups(fixture)
    with pytest.raises(NanochatError, match="different number of ranks"):
        opt.load_state_dict(fixture["dist"]["rank_state_dicts"][0])
    with pytest.raises(NanochatError, match="different number of ranks"):  # one rank file of two missing
        gather_full_optimizer_state(fixture["dist"]["rank_state_dicts"][:1], opt)
    load_resharded_state_dict(opt, fixture["dist"]["rank_state_dicts"])  # the supported way


# -----------------------------------------------------------------------------
# torchrun, 2 ranks (gloo): one launch, results compared below


def single_process_gpt(steps):
    """Reference: one process, gradient accumulation over the 2 micro-batches the 2 ranks take."""
    model = W.build_gpt()
    opt = W.gpt_optimizer(model)
    after = []
    for step in steps:
        for micro in range(2):
            x, y = W.micro_batch(step, micro)
            (model(x, y) / 2).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        after.append(W.snapshot(model))
    return model, opt, after


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    ref_dir, out_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("out")
    model, opt, after = single_process_gpt([0, 1, 2])
    # The 1 -> 2 resume needs the single-process state after step 1: rerun 2 steps (cheap) to capture it.
    model2, opt2, after2 = single_process_gpt([0, 1])
    torch.save(after2[-1], ref_dir / "single_params_step1.pt")
    torch.save(opt2.state_dict(), ref_dir / "single_optim_step1.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_DTYPE="float32",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NANOCHAT_OPTIM_COMM", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(REPO, "tests", "_optim_dist_worker.py"), str(ref_dir), str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    def load(name):
        return torch.load(out_dir / name)

    def load_json(name):
        return json.loads((out_dir / name).read_text())

    return dict(load=load, load_json=load_json, single_after=after, single_step1_state=opt2.state_dict())


def test_cleanup_joins_gloo_threads_before_exit(torchrun_results):
    """compute_cleanup leaves no gloo thread behind, although the optimizers imported torch._dynamo after the group
    existed (a thread that outlives destroy_process_group can abort the interpreter's shutdown)."""
    for r in range(2):
        names = torchrun_results["load_json"](f"threads_after_cleanup_rank{r}.json")
        assert not [n for n in names if "gloo" in n], names


def test_dist_matches_upstream_per_rank(fixture, torchrun_results):
    """Same inputs as upstream's 2-rank run: identical per-rank optimizer files and parameters."""
    load = torchrun_results["load"]
    for r in range(2):
        assert_state_dicts_close(load(f"fixture_optim_rank{r}.pt"), fixture["dist"]["rank_state_dicts"][r])
    assert_params_close(load("fixture_params.pt"), fixture["dist"]["after"][-1])


@pytest.mark.parametrize("mode", ["native", "fallback"])
def test_dist_step_equals_grad_accumulation(torchrun_results, mode):
    load, single = torchrun_results["load"], torchrun_results["single_after"]
    for step in (0, 1):
        assert_params_close(load(f"gpt_{mode}_params_step{step}.pt"), single[step], atol=1e-5, rtol=0)


def test_fallback_collectives_equal_native(torchrun_results):
    load = torchrun_results["load"]
    assert_params_close(load("gpt_fallback_params_step1.pt"), load("gpt_native_params_step1.pt"), atol=1e-6)
    for r in range(2):
        assert_state_dicts_close(load(f"gpt_fallback_optim_step1_rank{r}.pt"), load(f"gpt_native_optim_step1_rank{r}.pt"))


def test_reshard_2_to_1_preserves_update(torchrun_results):
    """Resume the 2-rank run (after step 1) in one process: step 2 lands where the 2-rank run's step 2 did."""
    load = torchrun_results["load"]
    model = W.build_gpt()
    opt = W.gpt_optimizer(model)
    with torch.no_grad():
        for p, saved in zip(model.parameters(), load("gpt_native_params_step1.pt")):
            p.copy_(saved)
    rank_files = [load(f"gpt_native_optim_step1_rank{r}.pt") for r in range(2)]
    load_resharded_state_dict(opt, rank_files)
    assert_state_dicts_close(opt.state_dict(), torchrun_results["single_step1_state"], atol=1e-5)
    for micro in range(2):
        x, y = W.micro_batch(2, micro)
        (model(x, y) / 2).backward()
    opt.step()
    assert_params_close(W.snapshot(model), load("gpt_native_params_step2.pt"), atol=1e-5, rtol=0)
    assert_params_close(W.snapshot(model), torchrun_results["single_after"][2], atol=1e-5, rtol=0)


def test_reshard_1_to_2_preserves_update(torchrun_results):
    """The 2-rank run resumed from the single-process state: its step 2 equals the single-process step 2."""
    load = torchrun_results["load"]
    assert_params_close(load("resumed_params_step2.pt"), torchrun_results["single_after"][2], atol=1e-5, rtol=0)


def test_dist_padding_paths(torchrun_results):
    """AdamW rows % world != 0 and Muon K % world != 0 across 2 ranks equal one process with averaged grads."""
    load = torchrun_results["load"]
    params, opt = W.odd_params_and_optimizer()
    for step in range(2):
        per_rank = [W.odd_grads(step, r) for r in range(2)]
        for p, g0, g1 in zip(params, *per_rank):
            p.grad = (g0 + g1) / 2
        opt.step()
    assert_params_close(load("odd_params.pt"), W.snapshot(params), atol=1e-5, rtol=0)
    full = gather_full_optimizer_state([load(f"odd_optim_rank{r}.pt") for r in range(2)], opt)
    assert_state_dicts_close(full, opt.state_dict(), atol=1e-5)
