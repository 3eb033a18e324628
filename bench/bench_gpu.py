"""
Pretraining on one GPU (or a node, under torchrun): ours (`ray_jobs.base_train --num-workers 0`) vs an upstream
nanochat checkout, same shards, tokenizer and flags, for d12 and d20, SSSL and L windows, with and without --fp8.

    python bench/bench_gpu.py --upstream /path/to/nanochat                 # the default plan, fits ~8 min on an H200
    python bench/bench_gpu.py --upstream UP --configs d12:SSSL,d12:L --fp8 off --steps 30
    python bench/bench_gpu.py --upstream UP --nproc 8                      # each run under torchrun, 8 GPUs
    python bench/bench_gpu.py --device cpu --smoke                         # the pipeline on CPU (tiny model)

Needs no Ray: every run is a subprocess, in-process (`--num-workers 0`) or under `torchrun --standalone`.
NANOCHAT_BASE_DIR must hold the shards (base_data_climbmix/) and a tokenizer (tokenizer/); each run writes its
checkpoint into a scratch base dir (links to those two) that is deleted afterwards. Upstream imports wandb at top
level: without wandb installed a stand-in is put on its path (runs use --run=dummy).

Per run: steady tok/s and MFU (medians of the step lines after --warmup steps; both loops print the same line),
the first step's time (compilation included), peak memory (the loops' "Peak memory usage" line), and which
attention ran. One micro-step per optimizer step (total batch = device batch x T x GPUs), so a step is short and
the plan fits the budget: runs start in the order of the plan until --budget-s would be exceeded (the rest are
listed as skipped). Prints a table, then a JSON object as the last line.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+) \| bf16_mfu: ([\d.]+)")
PEAK = re.compile(r"Peak memory usage: ([\d.]+)MiB")


def plan(args) -> list[dict]:
    """Runs in priority order: for each (depth, pattern) ours then upstream; bf16 configs before fp8 ones."""
    configs = [c.split(":") for c in args.configs.split(",")]
    fp8s = {"off": [False], "on": [True], "both": [False, True]}[args.fp8]
    return [{"who": who, "depth": int(d.lstrip("d")), "pattern": p, "fp8": f}
            for f in fp8s for d, p in configs for who in (["ours", "upstream"] if args.upstream else ["ours"])]


def flags(args, run: dict) -> list[str]:
    """The same upstream base_train flags for both (one micro-step per optimizer step, no eval / CORE / samples)."""
    world = args.nproc
    return [f"--depth={run['depth']}", f"--window-pattern={run['pattern']}", f"--max-seq-len={args.seq}",
            f"--device-batch-size={args.batch}", f"--total-batch-size={args.batch * args.seq * world}",
            f"--num-iterations={args.steps}", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
            "--run=dummy", f"--model-tag=bench_{run['who']}", *(["--fp8"] if run["fp8"] else []),
            *([f"--device-type={args.device}"] if args.device else [])]


def command(args, run: dict) -> tuple[list[str], str, dict]:
    """(argv, cwd, extra env) of one run."""
    mod = "ray_jobs.base_train" if run["who"] == "ours" else "scripts.base_train"
    extra = ["--num-workers=0"] if run["who"] == "ours" else []
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                  "-m", mod, "--"]
    else:
        launch = [sys.executable, "-m", mod]
    cwd = ROOT if run["who"] == "ours" else args.upstream
    path = [cwd, *args.stub_path, os.environ.get("PYTHONPATH", "")]
    return launch + extra + flags(args, run), cwd, {"PYTHONPATH": os.pathsep.join(p for p in path if p)}


def scratch_base_dir(base: str) -> str:
    """A base dir whose shards and tokenizer link to `base`: checkpoints land here and are deleted with it."""
    d = tempfile.mkdtemp(prefix="bench_gpu_base_")
    for name in ("base_data_climbmix", "tokenizer"):
        os.symlink(os.path.join(base, name), os.path.join(d, name))
    return d


def parse(out: str, warmup: int) -> dict:
    steps = [(int(s), float(dt), int(tok.replace(",", "")), float(mfu)) for s, dt, tok, mfu in STEP.findall(out)]
    if not steps:
        return {}
    steady = [s for s in steps if s[0] >= warmup] or steps[-1:]
    peak = PEAK.findall(out)
    attention = next((line.strip() for line in out.splitlines()
                      if line.startswith("Attention:") or "Flash Attention 3" in line), "")
    return {"tok_per_sec": statistics.median(s[2] for s in steady), "mfu": statistics.median(s[3] for s in steady),
            "first_step_s": steps[0][1] / 1000, "steady_dt_ms": statistics.median(s[1] for s in steady),
            "peak_mib": float(peak[-1]) if peak else None, "steps_seen": len(steps), "attention": attention}


def run_one(args, run: dict, base: str) -> dict:
    argv, cwd, extra = command(args, run)
    scratch = scratch_base_dir(base)
    env = {**os.environ, **extra, "NANOCHAT_BASE_DIR": scratch, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.run_timeout_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.log_dir:
        name = f"{run['who']}_d{run['depth']}_{run['pattern']}{'_fp8' if run['fp8'] else ''}.log"
        with open(os.path.join(args.log_dir, name), "w") as f:
            f.write(" ".join(argv) + "\n\n" + out)
    result = {**run, "wall_s": round(time.time() - t0, 1), **parse(out, args.warmup)}
    if rc != 0 or "tok_per_sec" not in result:
        result["error"] = f"exit {rc}: " + " | ".join(out.strip().splitlines()[-3:])[-300:]
    return result


def wandb_stub_path() -> list[str]:
    """A directory with a wandb stand-in when wandb is not installed (upstream imports it at top level)."""
    try:
        import wandb  # noqa: F401

        return []
    except ImportError:
        d = tempfile.mkdtemp(prefix="bench_gpu_stub_")
        os.makedirs(os.path.join(d, "wandb"))
        with open(os.path.join(d, "wandb", "__init__.py"), "w") as f:
            f.write('def init(*a, **k):\n    raise RuntimeError("wandb stand-in: run with --run=dummy")\n')
        return [d]


def table(rows: list[dict]) -> None:
    print(f"{'run':<30}{'tok/s':>11}{'MFU %':>8}{'first step s':>14}{'peak GiB':>10}{'wall s':>8}  attention")
    for r in rows:
        name = f"{r['who']} d{r['depth']} {r['pattern']}{' fp8' if r['fp8'] else ''}"
        if r.get("skipped") or r.get("error"):
            print(f"{name:<30}  {r.get('skipped') or r['error']}")
            continue
        peak = f"{r['peak_mib'] / 1024:.1f}" if r.get("peak_mib") else "-"
        print(f"{name:<30}{r['tok_per_sec']:>11,.0f}{r['mfu']:>8.2f}{r['first_step_s']:>14.1f}{peak:>10}"
              f"{r['wall_s']:>8.0f}  {r.get('attention', '')[:70]}")


def ratios(rows: list[dict]) -> dict:
    """ours / upstream per configuration: tok/s (higher is better), first step and peak memory (lower is better)."""
    by = {(r["who"], r["depth"], r["pattern"], r["fp8"]): r for r in rows if "tok_per_sec" in r}
    out = {}
    for (who, d, p, f), ours in by.items():
        up = by.get(("upstream", d, p, f))
        if who != "ours" or up is None:
            continue
        key = f"d{d}_{p}{'_fp8' if f else ''}"
        out[key] = {"tok_per_sec": round(ours["tok_per_sec"] / up["tok_per_sec"], 3),
                    "first_step": round(ours["first_step_s"] / up["first_step_s"], 3)}
        if ours.get("peak_mib") and up.get("peak_mib"):
            out[key]["peak_memory"] = round(ours["peak_mib"] / up["peak_mib"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", default=None, help="upstream nanochat checkout (scripts/base_train.py)")
    p.add_argument("--configs", default="d12:SSSL,d12:L,d20:SSSL,d20:L", help="depth:window-pattern list")
    p.add_argument("--fp8", choices=["off", "on", "both"], default="both")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps before the steady window")
    p.add_argument("--batch", type=int, default=32, help="device batch size (rows)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (> 1: torchrun --standalone)")
    p.add_argument("--device", default="", help="--device-type for both (default: autodetect)")
    p.add_argument("--budget-s", type=float, default=450, help="start no run that would end after this")
    p.add_argument("--run-timeout-s", type=float, default=300)
    p.add_argument("--log-dir", default=None, help="write each run's output here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized plan to check the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.configs, args.fp8, args.steps, args.warmup, args.batch, args.seq = "d2:SL", "off", 6, 2, 2, 128
        args.run_timeout_s = max(args.run_timeout_s, 1200)  # upstream compiles on CPU: minutes on a busy machine
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    missing = [n for n in ("base_data_climbmix", "tokenizer") if not os.path.isdir(os.path.join(base, n))]
    if missing:
        p.error(f"{base} has no {' or '.join(missing)}: set NANOCHAT_BASE_DIR to a base dir with shards and a "
                f"tokenizer (python -m nanochat.dataset -n 8; python -m ray_jobs.tok_train)")
    import torch

    if args.device in ("", "cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: nothing measured (use --device cpu --smoke to check the pipeline)")
        print(json.dumps({"skipped": "no CUDA device", "results": []}))
        return 0
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    args.stub_path = wandb_stub_path() if args.upstream else []
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t_start, rows, last_wall = time.time(), [], {}
    for run in plan(args):
        guess = last_wall.get(run["depth"], 90.0)  # the last run of this depth, else a guess
        if time.time() - t_start + guess > args.budget_s:
            rows.append({**run, "skipped": f"skipped: --budget-s {args.budget_s:.0f} (would take ~{guess:.0f} s)"})
            continue
        r = run_one(args, run, base)
        last_wall[run["depth"]] = max(last_wall.get(run["depth"], 0), r["wall_s"])
        rows.append(r)
        print(f"[{time.time() - t_start:5.0f} s] {run['who']} d{run['depth']} {run['pattern']}"
              f"{' fp8' if run['fp8'] else ''}: " + (r.get("error") or f"{r['tok_per_sec']:,.0f} tok/s"), flush=True)
    print(f"\n{gpu} x {args.nproc} | torch {torch.__version__} | T {args.seq}, device batch {args.batch}, "
          f"{args.steps} steps (steady: median of steps >= {args.warmup}) | {time.strftime('%Y-%m-%d')}")
    table(rows)
    summary = {"gpu": gpu, "nproc": args.nproc, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "config": {k: v for k, v in vars(args).items() if k != "stub_path"}, "results": rows,
               "ours_vs_upstream": ratios(rows), "total_s": round(time.time() - t_start, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
