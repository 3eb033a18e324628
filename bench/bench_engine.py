"""
Engine decode throughput: our Engine + GPT vs upstream nanochat's, same random weights, same prompt.

    python bench/bench_engine.py                                   # ours only
    python bench/bench_engine.py --upstream /work/upstream         # side by side with an upstream checkout
    python bench/bench_engine.py --upstream /work/upstream --profile   # + aten ops and host reads per decode step
    # GPU (d12 and d20, bf16):
    python bench/bench_engine.py --upstream /work/upstream --device cuda --dtype bfloat16 --depth 12 \
        --batch-sizes 1,8,32,64 --profile

Engines: `upstream`, `ours` (eager: Engine(static=False)) and `ours_static` (Engine(static=True): fixed-shape decode,
replayed as CUDA graphs on CUDA; on CPU the same fixed-shape code runs eagerly, which only shows its overhead).

Each engine runs in its own fresh subprocess (the two packages are both called `nanochat`), alternating for
--rounds rounds; the best round per batch size is kept (the machine may be shared). Decoding is greedy, and the
tokenizer's special ids lie outside the vocabulary, so no row stops early and both engines do the same work.
Per batch size: TTFT (prefill + first token), TPOT (median decode step), decode tok/s = B * steps / decode time,
and the same per CPU-second of the worker process (with 1 thread this ignores time lost to other processes on a
shared machine, so it is the default comparison metric on CPU; wall time is used on GPU).
--profile (batch 1, CPU profiler): dispatcher ops per decode step (each one a kernel launch or more on a GPU, unless
a CUDA graph replays them) and device->host reads per step (each a GPU sync).
Prints a table, then one JSON object as the last line.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def model_config(args):
    # base_train's depth -> shape rule: model_dim = ceil(depth * 64 / 128) * 128, head_dim 128
    dim = math.ceil(args.depth * 64 / 128) * 128
    return dict(sequence_len=args.sequence_len, vocab_size=args.vocab_size, n_layer=args.depth,
                n_head=dim // 128, n_kv_head=dim // 128, n_embd=dim, window_pattern=args.window_pattern)


class BenchTokenizer:
    """Special tokens live past the vocabulary, so the model can never emit them (no early stops, no tool calls)."""

    def __init__(self, vocab_size):
        self.base = vocab_size

    def encode_special(self, s):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        return self.base + names.index(s)

    def get_bos_token_id(self):
        return self.base

    def encode(self, s):
        return [ord(c) % self.base for c in s]

    def decode(self, ids):
        return ""


def random_model(gpt_mod, config: dict, device):
    """A GPT with seeded random weights (init_weights zeroes projections; random is fairer), in eval mode."""
    import torch

    with torch.device("meta"):
        model = gpt_mod.GPT(gpt_mod.GPTConfig(**config))
    model.to_empty(device=device)
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # same seeded weights for every engine
        for name, p in sorted(model.named_parameters()):
            std = (1.0 if "wte" in name or "value_embeds" in name else p.shape[-1] ** -0.5) if p.ndim >= 2 else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * std + (0.5 if p.ndim < 2 else 0.0)).to(p.dtype))
    return model.eval()


def worker(args):
    """Build one engine (ours or upstream's) and time it; prints a JSON line."""
    # both packages are called `nanochat`: put the one we want first on the path
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.abspath(args.upstream) if args.worker == "upstream" else here
    sys.path.insert(0, root)
    import torch  # noqa: I001 (after the sys.path choice on purpose)
    import nanochat.engine as engine_mod
    import nanochat.gpt as gpt_mod

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = random_model(gpt_mod, model_config(args), device)
    tok = BenchTokenizer(args.vocab_size)
    prompt = [(7 * i + 3) % args.vocab_size for i in range(args.prompt_len)]
    engine = engine_mod.Engine(model, tok) if args.worker == "upstream" else \
        engine_mod.Engine(model, tok, static=args.worker == "ours_static")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(batch, steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        times, cpu, first_row = [], [], []
        for col, _ in engine.generate(prompt, num_samples=batch, max_tokens=steps, temperature=0.0):
            sync()
            t, c = time.perf_counter(), time.process_time()
            times.append(t - t0)
            cpu.append(c - c0)
            t0, c0 = t, c
            first_row.append(col[0])
        return times[0], times[1:], cpu[1:], first_row

    out = {"engine": args.worker, "sweep": []}
    for batch in args.batch_sizes:
        timed(batch, 8)  # warmup
        best = None
        for _ in range(args.repeats):
            ttft, steps, cpu, first_row = timed(batch, args.decode_tokens)
            run = {"batch_size": batch, "ttft_sec": ttft, "tpot_sec": statistics.median(steps),
                   "tok_per_sec": batch * len(steps) / sum(steps),
                   "cpu_tok_per_sec": batch * len(cpu) / max(sum(cpu), 1e-9), "decode_steps": len(steps)}
            if best is None or run[args.metric] > best[args.metric]:
                best = run
        out["sweep"].append(best)
        out.setdefault("tokens", first_row)
    if args.profile:
        out["profile"] = profile_decode(engine, prompt, here)
    assert os.path.abspath(engine_mod.__file__).startswith(root), engine_mod.__file__
    print(json.dumps(out))


def profile_decode(engine, prompt, here, steps=5):
    """Dispatcher ops and device->host reads per decode step at batch 1."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, here)
    from tests.decode_helpers import count_host_reads

    gen = engine.generate(prompt, num_samples=1, max_tokens=steps + 4, temperature=0.0)
    for _ in range(3):
        next(gen)
    with count_host_reads() as reads, profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            next(gen)
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    del torch
    return {"aten_ops_per_step": sum(ops.values()) / steps, "host_reads_per_step": reads["n"] / steps}


def run_worker(args, which):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which] + args.passthrough
    res = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env={**os.environ, "NANOCHAT_DTYPE": args.dtype})
    if res.returncode != 0:
        raise SystemExit(f"{which} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default=None, help="unpacked upstream nanochat checkout to compare against")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--window-pattern", default="L")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size per round (best kept)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/upstream rounds (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="NANOCHAT_DTYPE for both engines")
    parser.add_argument("--metric", choices=["cpu_tok_per_sec", "tok_per_sec"], default=None,
                        help="what picks the best run and the ratio: tokens per CPU-second (default on CPU: robust "
                             "on a shared machine with 1 thread) or per wall-second (default on GPU)")
    parser.add_argument("--profile", action="store_true", help="count ops and host reads per decode step")
    parser.add_argument("--worker", choices=["ours", "ours_static", "upstream"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream and not os.path.isfile(os.path.join(args.upstream, "nanochat", "engine.py")):
        raise SystemExit(f"--upstream {args.upstream}: no nanochat/engine.py there (unpack upstream 92d63d4)")
    if args.metric is None:
        args.metric = "cpu_tok_per_sec" if args.device == "cpu" and args.threads == 1 else "tok_per_sec"
    if args.worker:
        return worker(args)
    args.passthrough = sys.argv[1:]

    engines = ["ours", "ours_static"] + (["upstream"] if args.upstream else [])
    best = {e: {} for e in engines}
    tokens, profiles = {}, {}
    for _ in range(args.rounds):
        for e in engines:
            res = run_worker(args, e)
            tokens[e] = res["tokens"]
            profiles[e] = res.get("profile")
            for row in res["sweep"]:
                b = row["batch_size"]
                if b not in best[e] or row[args.metric] > best[e][b][args.metric]:
                    best[e][b] = row

    cfg = model_config(args)
    print(f"Engine decode benchmark: depth {args.depth} (dim {cfg['n_embd']}, vocab {args.vocab_size}), "
          f"prompt {args.prompt_len}, {args.decode_tokens} greedy tokens, {args.device}, {args.dtype}, "
          f"{args.threads} thread(s), best of {args.rounds}x{args.repeats}")
    print(f"ratio = engine/upstream {args.metric}")
    header = (f"{'batch':>5} | {'engine':>11} | {'TTFT ms':>8} | {'TPOT ms':>8} | {'tok/s':>9} | {'tok/cpu-s':>9} | "
              f"{'ratio':>6}")
    print(header)
    print("-" * len(header))
    sweep = []
    for b in args.batch_sizes:
        entry = {"batch_size": b}
        for e in engines:
            r = best[e][b]
            entry[e] = r
            ratio = ""
            if args.upstream and e != "upstream":
                entry[f"ratio_{e}"] = r[args.metric] / best["upstream"][b][args.metric]
                ratio = f"{entry[f'ratio_{e}']:.2f}x"
            print(f"{b:>5} | {e:>11} | {r['ttft_sec'] * 1e3:>8.2f} | {r['tpot_sec'] * 1e3:>8.2f} | "
                  f"{r['tok_per_sec']:>9.1f} | {r['cpu_tok_per_sec']:>9.1f} | {ratio:>6}")
        entry["ratio"] = entry.get("ratio_ours")  # the older key: eager ours / upstream
        sweep.append(entry)
    same = {e: tokens[e] == tokens["upstream"] for e in engines if e != "upstream"} if args.upstream else None
    if args.upstream:
        print(f"greedy tokens identical to upstream: {same}")
    if args.profile:
        print("per decode step at batch 1: " + ", ".join(
            f"{e} {p['aten_ops_per_step']:.0f} ops / {p['host_reads_per_step']:.0f} host reads"
            for e, p in profiles.items()))
    print(json.dumps({"benchmark": "engine_decode", "model_config": cfg, "device": args.device, "dtype": args.dtype,
                      "threads": args.threads, "metric": args.metric, "prompt_tokens": args.prompt_len,
                      "decode_tokens": args.decode_tokens, "upstream": args.upstream, "tokens_match_upstream": same,
                      "profile": profiles if args.profile else None, "sweep": sweep}))


def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
