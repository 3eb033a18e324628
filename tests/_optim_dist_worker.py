"""
Distributed half of tests/test_optim.py: run under torchrun (gloo, CPU), write results for the test to compare.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/_optim_dist_worker.py REF_DIR OUT_DIR

REF_DIR holds what the test computed single-process first (the full optimizer state after 2 GPT steps, for the
1 -> 2 rank resume). Every rank writes its own optimizer state dicts; rank 0 writes the parameters. The helpers at
the top (tiny GPT, micro-batches, fixture menagerie) are shared with the test, which imports this module.
"""

import faulthandler
import json
import os
import sys

import torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "upstream_optim.pt")
MICRO_BATCH, SEQ_LEN = 2, 16

# -----------------------------------------------------------------------------
# Shared helpers


def build_gpt():
    """A depth-2 GPT whose Muon groups have K = 1, 2 and 8 (K = 1 leaves rank 1 with nothing to update)."""
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def gpt_optimizer(model):
    # Non-zero Muon weight decay so the cautious mask matters; prints the LR scale line, as upstream does.
    return model.setup_optimizer(weight_decay=0.1)


def micro_batch(step: int, micro: int):
    """Tokens for (optimizer step, micro-batch index); rank r of 2 takes micro-batch r."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    tokens = torch.randint(0, 100, (MICRO_BATCH, SEQ_LEN + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def fixture_params_and_groups(fixture: dict):
    """Parameters initialised from the fixture and MuonAdamW groups in the fixture's layout."""
    from nanochat.optim import MuonAdamW

    params = [torch.nn.Parameter(t.clone()) for t in fixture["init"]]
    groups = [dict(params=[p for p, g in zip(params, fixture["param_groups"]) if g == gi], **hyper)
              for gi, hyper in enumerate(fixture["groups"])]
    opt = MuonAdamW(groups)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # set by the caller, as GPT.setup_optimizer does
    return params, opt


ODD_SHAPES = [(33, 32), (5,), (8, 16), (8, 16), (8, 16)]  # 33 rows: the padded AdamW path on 2 ranks


def odd_params_and_optimizer():
    """AdamW rows not divisible by 2 and a 3-matrix Muon group: the padding paths."""
    from nanochat.optim import MuonAdamW

    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in ODD_SHAPES]
    opt = MuonAdamW([
        dict(kind="adamw", params=params[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        dict(kind="muon", params=params[2:], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1),
    ])
    return params, opt


def odd_grads(step: int, rank: int):
    gen = torch.Generator().manual_seed(500 + 10 * step + rank)
    return [torch.randn(s, generator=gen) for s in ODD_SHAPES]


def snapshot(module_or_params):
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return [p.detach().clone() for p in params]


# -----------------------------------------------------------------------------
# Distributed runs (each rank)


def gpt_steps(model, opt, steps, rank, out_dir, tag):
    for step in steps:
        x, y = micro_batch(step, rank)
        model(x, y).backward()  # one micro-batch per rank; the optimizer averages the gradients
        opt.step()
        model.zero_grad(set_to_none=True)
        if rank == 0:
            torch.save(snapshot(model), os.path.join(out_dir, f"{tag}_params_step{step}.pt"))


def native_threads() -> list[str]:
    """Names of this process's threads (gloo's are gloo_tcp_loop and pt_gloo_runloop)."""
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names


def main(ref_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from nanochat.common import compute_cleanup, compute_init
    from nanochat.optim import shard_optimizer_state

    # A native abort (SIGABRT from std::terminate) otherwise leaves no trace of where it happened: dump every
    # thread's Python stack to stderr, which the test shows when the launch fails.
    faulthandler.enable(all_threads=True)
    compute_init("cpu")  # the library's process-group set-up (gloo) and teardown, as a torchrun launch uses them
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world

    # A. Upstream's fixture menagerie, each rank with its own gradients (same inputs upstream ran with).
    fixture = torch.load(FIXTURE)
    params, opt = fixture_params_and_groups(fixture)
    for grads in fixture["dist"]["grads"][rank]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    torch.save(opt.state_dict(), os.path.join(out_dir, f"fixture_optim_rank{rank}.pt"))
    if rank == 0:
        torch.save(snapshot(params), os.path.join(out_dir, "fixture_params.pt"))

    # B. Tiny GPT, 3 steps; state saved after step 1 (index 1 = second step) for the 2 -> 1 resume.
    for mode in ("native", "fallback"):
        os.environ["NANOCHAT_OPTIM_COMM"] = mode  # read when the optimizer first communicates
        model = build_gpt()
        opt = gpt_optimizer(model)
        gpt_steps(model, opt, [0, 1], rank, out_dir, f"gpt_{mode}")
        torch.save(opt.state_dict(), os.path.join(out_dir, f"gpt_{mode}_optim_step1_rank{rank}.pt"))
        if mode == "native":
            gpt_steps(model, opt, [2], rank, out_dir, f"gpt_{mode}")
    os.environ.pop("NANOCHAT_OPTIM_COMM")

    # C. 1 -> 2 ranks: continue from the single-process state after steps 0 and 1.
    model = build_gpt()
    opt = gpt_optimizer(model)
    with torch.no_grad():
        for p, saved in zip(model.parameters(), torch.load(os.path.join(ref_dir, "single_params_step1.pt"))):
            p.copy_(saved)
    full = torch.load(os.path.join(ref_dir, "single_optim_step1.pt"))
    opt.load_state_dict(shard_optimizer_state(full, opt, rank, world))
    gpt_steps(model, opt, [2], rank, out_dir, "resumed")

    # D. Padding paths (AdamW rows % world != 0, Muon K % world != 0), 2 steps.
    params, opt = odd_params_and_optimizer()
    for step in range(2):
        for p, g in zip(params, odd_grads(step, rank)):
            p.grad = g
        opt.step()
    if rank == 0:
        torch.save(snapshot(params), os.path.join(out_dir, "odd_params.pt"))
    torch.save(opt.state_dict(), os.path.join(out_dir, f"odd_optim_rank{rank}.pt"))
    dist.barrier()  # no rank tears its gloo pairs down while the other still has traffic or files in flight
    compute_cleanup()
    # The group must really be gone (its gloo threads joined) before the interpreter shuts down: see compute_init.
    with open(os.path.join(out_dir, f"threads_after_cleanup_rank{rank}.json"), "w") as f:
        json.dump(native_threads(), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
