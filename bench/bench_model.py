"""
Training throughput of the model on CPU: forward + backward + MuonAdamW step, ours vs upstream nanochat side by side.

    python bench/bench_model.py                               # ours only
    python bench/bench_model.py --upstream /tmp/upstream      # ours and upstream (an unpacked nanochat@92d63d4)
    python bench/bench_model.py --upstream UP --upstream-compile --threads 2 --head-dim 64 --window-pattern L \
        --vocab 2048 --batch-size 4     # each side's default: ours eager, upstream compiled (issue #12 item 5)

Default shape: depth 4 (dim 256, 2 heads of 128), T=512, vocab 4096, window pattern SSSL, batch 2, fp32, eager.
Both implementations are loaded into this one process (upstream's `nanochat` package is imported after ours has
been moved out of sys.modules; each keeps references to its own modules), built with the same seed, and their
training steps are interleaved one by one (ABBA order), so a load spike on a shared machine hits both alike.
Each step records wall time and process CPU time (split into forward+backward and optimizer). The headline ratio uses median CPU time per step (tokens per
CPU-second), which other processes competing for the cores barely disturb; wall-clock best/median are shown
too. tok/s uses the best wall step. MFU = FLOPs/token (GPT.estimate_flops) x tokens per CPU-second / matmul
FLOPs per CPU-second (same thread count); "wall MFU" = best-step tok/s over nanochat.common.cpu_peak_flops()
(wall-clock based, so on a busy machine both of its terms are distorted). Prints a table, then one JSON line.
"""

import argparse
import importlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpt_module(root):
    """Import `nanochat.gpt` from `root`; a previously imported `nanochat` package is set aside first."""
    for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
        del sys.modules[name]  # the already-loaded modules stay alive through the objects that reference them
    sys.path.insert(0, root)
    try:
        gpt = importlib.import_module("nanochat.gpt")
    finally:
        sys.path.remove(root)
    if not os.path.abspath(gpt.__file__).startswith(os.path.abspath(root)):
        raise SystemExit(f"imported {gpt.__file__}, expected a module under {root}")
    return gpt


def package_modules() -> dict:
    """The `nanochat` package's modules now in sys.modules (to put one implementation's back later)."""
    return {n: m for n, m in sys.modules.items() if n == "nanochat" or n.startswith("nanochat.")}


def cpu_time_peak_flops(n=1024, cpu_seconds=0.5):
    """fp32 matmul FLOPs per CPU-second of this process (same matmul as nanochat.common.cpu_peak_flops, but timed
    with process_time, so it is the right denominator for tokens per CPU-second)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    calls, start = 0, time.process_time()
    while time.process_time() - start < cpu_seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.process_time() - start)


def build(gpt, args, compile: bool):
    import torch

    hd = args.head_dim
    dim = -(-args.depth * 64 // hd) * hd  # base_train's sizing rule: aspect ratio 64, rounded up to head_dim
    config = gpt.GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab, n_layer=args.depth,
                           n_head=dim // hd, n_kv_head=dim // hd, n_embd=dim, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    optimizer = model.setup_optimizer()
    flops = model.estimate_flops()
    if compile:
        model = torch.compile(model, dynamic=False)
    return model, optimizer, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default=None, help="path to an unpacked upstream nanochat checkout")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window-pattern", default="SSSL")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: per-CPU-second numbers stay meaningful on a shared box)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow to warm up on CPU)")
    parser.add_argument("--upstream-compile", action="store_true",
                        help="torch.compile upstream's model only: each side's base_train default on CPU for short "
                             "runs (ours eager, upstream compiled)")
    parser.add_argument("--optim-compile", action="store_true",
                        help="torch.compile our MuonAdamW kernels too (NANOCHAT_OPTIM_COMPILE=1; upstream always does)")
    args = parser.parse_args()
    if args.upstream and not os.path.isfile(os.path.join(args.upstream, "nanochat", "gpt.py")):
        raise SystemExit(f"--upstream {args.upstream}: no nanochat/gpt.py there (unpack nanochat@92d63d4 first)")
    os.environ["NANOCHAT_DTYPE"] = "float32"  # both packages read it at import
    if args.optim_compile:
        os.environ["NANOCHAT_OPTIM_COMPILE"] = "1"

    import torch

    torch.set_num_threads(args.threads)
    roots = {"ours": REPO}
    if args.upstream:
        roots["upstream"] = os.path.abspath(args.upstream)
    modules, packages = {}, {}
    for name, root in roots.items():
        modules[name] = load_gpt_module(root)
        packages[name] = package_modules()
    load_gpt_module(REPO)  # leave our package as `nanochat` for the rest of the process
    from nanochat.common import cpu_peak_flops

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    y = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    runs = {}
    for name, gpt in modules.items():
        model, optimizer, flops = build(gpt, args, args.compile or (args.upstream_compile and name == "upstream"))
        runs[name] = dict(model=model, opt=optimizer, flops=flops, times=[], cpu_times=[], phases=[], losses=[],
                          package=packages[name])

    def step(run):
        sys.modules.update(run["package"])  # torch.compile looks modules up by name while it traces
        t0, c0 = time.perf_counter(), time.process_time()
        loss = run["model"](x, y)
        loss.backward()
        c1 = time.process_time()
        run["opt"].step()
        run["model"].zero_grad(set_to_none=True)
        run["losses"].append(loss.item())
        c2 = time.process_time()
        run["phases"].append((c1 - c0, c2 - c1))  # CPU seconds: (forward + backward, optimizer)
        return time.perf_counter() - t0, c2 - c0

    warmup_s = {name: sum(step(run)[0] for _ in range(args.warmup)) for name, run in runs.items()}
    order = list(runs.values())
    for i in range(args.steps):  # interleaved ABBA (ours, upstream, upstream, ours, ...): no side goes first always
        for run in (order if i % 2 == 0 else order[::-1]):
            wall, cpu = step(run)
            run["times"].append(wall)
            run["cpu_times"].append(cpu)

    peak = cpu_peak_flops()  # wall-clock based (nanochat.common)
    peak_cpu = cpu_time_peak_flops()
    tokens = args.batch_size * args.seq_len
    median = lambda v: sorted(v)[len(v) // 2]
    print(f"depth {args.depth}, T {args.seq_len}, vocab {args.vocab}, batch {args.batch_size}, windows "
          f"{args.window_pattern}, head dim {args.head_dim}, {args.threads} threads, fp32, "
          f"{'compiled' if args.compile else 'upstream compiled, ours eager' if args.upstream_compile else 'eager'}; "
          f"fp32 matmul peak {peak_cpu / 1e9:.1f} GFLOP per CPU-second ({peak / 1e9:.1f} GFLOP/s wall)")
    print(f"{'impl':<10} {'best ms':>8} {'median ms':>10} {'cpu ms':>8} {'fwd+bwd':>8} {'optim':>6} {'tok/s':>7} "
          f"{'tok/cpu-s':>10} {'MFU %':>6} {'wall MFU %':>11} {'warmup s':>9} {'last loss':>10}")
    result = {"bench": "model_train_cpu", "depth": args.depth, "seq_len": args.seq_len, "vocab": args.vocab,
              "batch_size": args.batch_size, "window_pattern": args.window_pattern, "threads": args.threads,
              "compile": args.compile, "upstream_compile": args.upstream_compile, "head_dim": args.head_dim,
              "optim_compile": args.optim_compile, "steps": args.steps, "cpu_peak_flops": round(peak),
              "cpu_time_peak_flops": round(peak_cpu)}
    for name, run in runs.items():
        best, med, cpu = min(run["times"]), median(run["times"]), median(run["cpu_times"])
        fb, opt = median([p[0] for p in run["phases"]]), median([p[1] for p in run["phases"]])
        tok_s, tok_cpu_s = tokens / best, tokens / cpu
        mfu = run["flops"] * tok_cpu_s / peak_cpu  # CPU-time over CPU-time: load on the box cancels out
        mfu_wall = run["flops"] * tok_s / peak
        print(f"{name:<10} {best * 1e3:>8.0f} {med * 1e3:>10.0f} {cpu * 1e3:>8.0f} {fb * 1e3:>8.0f} {opt * 1e3:>6.0f} "
              f"{tok_s:>7.0f} {tok_cpu_s:>10.0f} "
              f"{100 * mfu:>6.1f} {100 * mfu_wall:>11.1f} {warmup_s[name]:>9.1f} {run['losses'][-1]:>10.4f}")
        result[name] = {"tok_per_s": round(tok_s, 1), "tok_per_cpu_s": round(tok_cpu_s, 1), "mfu": round(mfu, 4), "mfu_wall": round(mfu_wall, 4),
                        "best_step_ms": round(best * 1e3, 1), "median_step_ms": round(med * 1e3, 1),
                        "median_cpu_ms": round(cpu * 1e3, 1), "median_cpu_ms_fwd_bwd": round(fb * 1e3, 1),
                        "median_cpu_ms_optim": round(opt * 1e3, 1), "last_loss": round(run["losses"][-1], 5)}
    if "upstream" in runs:
        ours, up = runs["ours"], runs["upstream"]
        ratios = {"ratio_ours_over_upstream": median(up["cpu_times"]) / median(ours["cpu_times"]),
                  "ratio_best_wall": min(up["times"]) / min(ours["times"]),
                  "ratio_median_wall": median(up["times"]) / median(ours["times"])}
        print("ours / upstream throughput: {ratio_ours_over_upstream:.3f}x per CPU-second (headline), "
              "{ratio_best_wall:.3f}x best wall step, {ratio_median_wall:.3f}x median wall step".format(**ratios))
        result.update({k: round(v, 3) for k, v in ratios.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
