"""Wall time of `python -m ray_jobs.speedrun` in two checkouts, side by side on this machine.

    python dev/speedrun_ab.py --before /path/to/old/checkout --after . --rounds 2 \\
        --preset cpu --set base_train.num_iterations=120 --set chat_sft.num_iterations=86

Runs ABBA-ordered rounds (before, after, after, before, ...), each in a fresh base dir, each checkout first on
PYTHONPATH (Ray workers inherit it). Fix the step counts with --set: the CPU presets otherwise size their runs to a
time budget, which hides a slowdown. Prints per-stage seconds (from the speedrun's stage markers), the whole wall
time, and after/before ratios; the last line is JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(tree: str, base: str, args) -> dict:
    sets = [x for s in args.set for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "NANOCHAT_BASE_DIR": base}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.speedrun", "--preset", args.preset, "--base-dir", base,
                           "--no-report", *sets], cwd=tree, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"error: the speedrun in {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    stages_dir = os.path.join(base, "speedrun", "stages")
    stages = {}
    for name in sorted(os.listdir(stages_dir)):
        with open(os.path.join(stages_dir, name)) as f:
            stages[name.removesuffix(".json")] = round(json.load(f).get("seconds", 0.0), 2)
    return {"wall_s": round(wall, 2), "stages": stages}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout to compare against")
    p.add_argument("--after", default=".", help="checkout under test")
    p.add_argument("--rounds", type=int, default=2, help="ABBA pairs")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", action="append", default=[], help="speedrun --set overrides, for both sides")
    args = p.parse_args(argv)
    runs = {"before": [], "after": []}
    order = [side for r in range(args.rounds) for side in (("before", "after") if r % 2 == 0 else ("after", "before"))]
    with tempfile.TemporaryDirectory(prefix="speedrun_ab_") as tmp:
        for i, side in enumerate(order):
            tree = args.before if side == "before" else args.after
            result = run_once(tree, os.path.join(tmp, f"{i}_{side}"), args)
            runs[side].append(result)
            print(f"run {i + 1}/{len(order)} {side}: {result['wall_s']:.1f} s {result['stages']}", flush=True)
    stage_names = sorted({s for rs in runs.values() for r in rs for s in r["stages"]})
    median = {side: {s: statistics.median(r["stages"].get(s, 0.0) for r in rs) for s in stage_names} |
              {"wall": statistics.median(r["wall_s"] for r in rs)} for side, rs in runs.items()}  # fmt: skip
    print(f"\n| {'stage':<12} | before s | after s | after/before |")
    print("|---|---|---|---|")
    ratios = {}
    for s in [*stage_names, "wall"]:
        b, a = median["before"][s], median["after"][s]
        ratios[s] = round(a / b, 4) if b > 0 else None
        print(f"| {s:<12} | {b:8.1f} | {a:7.1f} | {ratios[s] if ratios[s] is not None else '-'} |")
    print(json.dumps({"preset": args.preset, "set": args.set, "rounds": args.rounds, "median": median,
                      "ratio": ratios, "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
