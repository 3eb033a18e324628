"""
Training throughput: the same config (a) in-process, (b) TorchTrainer with 1 worker, (c) TorchTrainer with 2
workers, plus Ray's start-up time to the first step, and optionally upstream nanochat's base_train on the same data.

    python -m bench.bench_train                                  # depth 2, T 128, 30 steps on the sample corpus
    python -m bench.bench_train --upstream /tmp/upstream         # also run upstream scripts.base_train (its checkout)
    python -m bench.bench_train --steps 30 --depth 4 --seq 256
    python -m bench.bench_train --upstream UP --compile -1 --depth 4 --seq 512   # our default path vs upstream's
    python -m bench.bench_train --upstream UP --paths --rounds 3 --depth 4 --seq 512 --batch 4   # see below

Every row uses the same --compile setting (default 1: torch.compile, as upstream's base_train always does, so
(a) and upstream run the same config); `in_process_eager` adds our CPU default (no compile) for reference.
Data: the offline sample corpus and a 2048-token tokenizer in --base-dir (prepared on first use). Throughput is
total batch / MEDIAN step time over the steps after the first two (warm-up; the median resists bursts of load from
other processes on a shared machine). CPU MFU is against the measured fp32 matmul peak of the
process (nanochat.common.cpu_peak_flops), so it is as noisy as the machine. Every run uses --threads torch threads
per process (default 1: on a shared machine OpenMP threads that spin-wait for busy cores are several times slower
than one thread), so (b) equals (a)'s resources and (c) uses twice the cores.

--paths compares the command lines a user runs, each a fresh process with default threads (no --threads): ours
`python -m ray_jobs.base_train` with default workers and --compile default (-1, auto), --compile 1 and --compile 0,
and upstream `python -m scripts.base_train`, same flags. The four rows run one after another, --rounds times, in a
rotated order each round (a load burst on a shared machine then hits every row alike), each compiled row with an
empty inductor cache (a first run's cost; --warm-cache keeps one cache per row across rounds). Per run: steady tok/s
(median step time of the steps from 5 on) and wall time from the process start to the line of its last step
(compilation, Ray start-up and data set-up included). Ratios vs upstream are taken within each round; the table
shows their median and range.
Prints a table, then a JSON object as the last line.
"""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_ENV = dict(os.environ)  # before importing ray_jobs (which sets our OpenMP default): upstream runs without it
STEP_LINE = re.compile(r"step (\d+)/(\d+) .*?dt: ([\d.]+)ms")


def prepare_base_dir(base_dir: str) -> None:
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    from nanochat import dataset
    from ray_jobs import tok_train

    if not os.path.exists(os.path.join(base_dir, "base_data_climbmix")):
        dataset.download(source="sample", progress=False)
    if not os.path.exists(os.path.join(base_dir, "tokenizer", "tokenizer.pkl")):
        tokenizer, _ = tok_train.train(tok_train.TokTrainConfig(max_chars=3_000_000, vocab_size=2048))
        tok_train.write_outputs(tokenizer, tok_train.get_tokenizer_dir())


def config(args, tag: str, compile: int = 0):
    from nanochat.train import BaseTrainConfig

    return BaseTrainConfig(depth=args.depth, aspect_ratio=64, head_dim=64, max_seq_len=args.seq, window_pattern="L",
                           num_iterations=args.steps, device_batch_size=args.batch, total_batch_size=args.total,
                           eval_every=-1, core_metric_every=-1, sample_every=-1, save_every=-1, warmup_steps=5,
                           model_tag=tag, device_type="cpu", compile=compile)


def run_in_process(args, compile: int = 0) -> dict:
    import torch

    from nanochat.train import train

    torch.set_num_threads(args.threads)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        r = train(config(args, "bench_inproc", compile))
    return {**rates(r, args.total), "wall_s": time.time() - t0}


def rates(r: dict, total_batch: int) -> dict:
    """tok/s from the median step time (steps after the first two); MFU is filled in by main()."""
    dt = statistics.median(r["step_times"][2:])
    return {"tok_per_sec": total_batch / dt, "flops_per_token": r["flops_per_token"], "world": r["world_size"]}


def run_ray(args, num_workers: int, t_start: float) -> dict:
    from ray_jobs import base_train
    from ray_jobs import train_common as tc

    cluster = tc.ClusterArgs(num_workers=num_workers, cpus_per_worker=args.threads, max_failures=0, report_every=10,
                             storage=os.path.join(os.environ["NANOCHAT_BASE_DIR"], "ray_runs"))
    name = f"bench-{num_workers}w-{int(time.time())}"
    cfg = config(args, f"bench_{num_workers}w", args.compile)
    t0 = time.time()
    result = tc.run_trainer(base_train.worker_fn, {"cfg": cfg.to_dict(), "run_name": name, "report_every": 10},
                            cluster, use_gpu=False, run_name=name)
    m = result.metrics
    return {**rates(m, args.total), "wall_s": time.time() - t0, "first_step_s": m["first_step_unix_time"] - t_start}


def run_upstream(args, upstream: str) -> dict:
    """Upstream scripts.base_train (torch.compile on, as upstream always does) on the same base dir and flags."""
    cmd = [sys.executable, "-m", "scripts.base_train", f"--depth={args.depth}", "--aspect-ratio=64", "--head-dim=64",
           f"--max-seq-len={args.seq}", "--window-pattern=L", f"--device-batch-size={args.batch}",
           f"--total-batch-size={args.total}", f"--num-iterations={args.steps}", "--eval-every=-1",
           "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--warmup-steps=5",
           "--model-tag=bench_upstream"]
    env = {**USER_ENV, "PYTHONPATH": upstream, "OMP_NUM_THREADS": str(args.threads), "NANOCHAT_BASE_DIR": args.base_dir,
           "NANOCHAT_DTYPE": os.environ["NANOCHAT_DTYPE"]}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=upstream, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    dts = [float(m.group(3)) / 1000 for m in STEP_LINE.finditer(proc.stdout) if int(m.group(1)) >= 2]
    if proc.returncode != 0 or not dts:
        return {"error": (proc.stderr or proc.stdout)[-500:]}
    return {"tok_per_sec": args.total / statistics.median(dts), "wall_s": wall}


# -----------------------------------------------------------------------------
# --paths: the command lines users run, side by side

PATHS = {  # row -> (upstream?, extra flags)
    "ours_default": (False, []),
    "ours_compiled": (False, ["--compile=1"]),
    "ours_eager": (False, ["--compile=0"]),
    "upstream_default": (True, []),
}


def path_flags(args) -> list[str]:
    """The flags both base_train scripts take (upstream's names), as in the issue's comparison."""
    return [f"--depth={args.depth}", "--aspect-ratio=64", "--head-dim=64", f"--max-seq-len={args.seq}",
            "--window-pattern=L", f"--device-batch-size={args.batch}", f"--total-batch-size={args.total}",
            f"--num-iterations={args.steps}", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
            "--warmup-steps=5"]


def run_path(args, row: str, tag: str, cache_dir: str) -> dict:
    """One fresh process of `row`; steady tok/s and the wall time from its start to its last step line."""
    upstream, extra = PATHS[row]
    module = "scripts.base_train" if upstream else "ray_jobs.base_train"
    cmd = [sys.executable, "-m", module, *path_flags(args), f"--model-tag={tag}", *extra]
    if not upstream:
        cmd.append(f"--name={tag}")  # a fresh Ray run (the same name would resume the previous round's run)
    env = {k: v for k, v in USER_ENV.items() if k != "OMP_NUM_THREADS"}  # default threads, as a user gets
    env.update(PYTHONPATH=args.upstream if upstream else REPO, PYTHONUNBUFFERED="1", NANOCHAT_BASE_DIR=args.base_dir,
               TORCHINDUCTOR_CACHE_DIR=cache_dir)  # a Ray worker inherits it from its local raylet
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=args.upstream if upstream else REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    steps, tail = [], []  # (step, dt seconds, seconds since start)
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        m = STEP_LINE.search(line)
        if m:
            steps.append((int(m.group(1)), float(m.group(3)) / 1000, time.time() - t0))
    proc.wait()
    wall = time.time() - t0
    for d in (os.path.join(args.base_dir, "base_checkpoints", tag), os.path.join(args.base_dir, "ray_runs", tag)):
        shutil.rmtree(d, ignore_errors=True)
    dts = [dt for step, dt, _ in steps if step >= 5]
    if proc.returncode != 0 or len(steps) != args.steps or not dts:
        return {"error": f"rc {proc.returncode}, {len(steps)} step lines: " + "".join(tail)[-1500:]}
    return {"tok_per_sec": args.total / statistics.median(dts), "wall_to_last_step_s": steps[-1][2],
            "first_step_s": steps[0][2], "process_wall_s": wall}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]" if values else "-"


def main_paths(args) -> None:
    if not args.upstream:
        raise SystemExit("--paths compares with upstream: pass --upstream PATH")
    rows = list(PATHS)
    runs = {row: [] for row in rows}
    caches = {row: tempfile.mkdtemp(prefix=f"inductor-{row}-") for row in rows}
    stamp = int(time.time())
    for r in range(args.rounds):
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            if not args.warm_cache:
                shutil.rmtree(caches[row], ignore_errors=True)
            res = run_path(args, row, f"bench_paths_{row}_{stamp}_{r}", caches[row])
            res["round"] = r
            runs[row].append(res)
            print(f"round {r} {row}: " + (res["error"][-300:] if "error" in res else
                  f"{res['tok_per_sec']:.0f} tok/s, last step at {res['wall_to_last_step_s']:.1f} s"), flush=True)
    for c in caches.values():
        shutil.rmtree(c, ignore_errors=True)
    up = {res["round"]: res for res in runs["upstream_default"] if "error" not in res}
    summary = {}
    print(f"config: depth {args.depth}, T {args.seq}, B {args.batch}, total batch {args.total} tokens, "
          f"{args.steps} steps, default threads, {os.cpu_count()} CPUs, {args.rounds} rounds, "
          f"{'warm' if args.warm_cache else 'cold'} inductor cache")
    print(f"{'run':<18}{'tok/s median [range]':>26}{'last step s':>22}{'tok/s vs upstream':>22}"
          f"{'wall: upstream/ours':>22}")
    for row in rows:
        ok = [res for res in runs[row] if "error" not in res]
        tps = [res["tok_per_sec"] for res in ok]
        walls = [res["wall_to_last_step_s"] for res in ok]
        r_tok = [res["tok_per_sec"] / up[res["round"]]["tok_per_sec"] for res in ok if res["round"] in up]
        r_wall = [up[res["round"]]["wall_to_last_step_s"] / res["wall_to_last_step_s"] for res in ok
                  if res["round"] in up]
        summary[row] = {"tok_per_sec": tps, "wall_to_last_step_s": walls, "tok_vs_upstream": r_tok,
                        "wall_upstream_over_ours": r_wall, "runs": runs[row]}
        tok_col = f"{statistics.median(tps):.0f} [{min(tps):.0f}-{max(tps):.0f}]" if tps else "error"
        wall_col = f"{statistics.median(walls):.1f} [{min(walls):.1f}-{max(walls):.1f}]" if walls else "-"
        print(f"{row:<18}{tok_col:>26}{wall_col:>22}{spread(r_tok):>22}{spread(r_wall):>22}")
    print(json.dumps({"config": vars(args), "rows": summary,
                      "default_tok_vs_upstream_median": statistics.median(summary["ours_default"]["tok_vs_upstream"])
                      if summary["ours_default"]["tok_vs_upstream"] else None,
                      "default_wall_upstream_over_ours_median":
                      statistics.median(summary["ours_default"]["wall_upstream_over_ours"])
                      if summary["ours_default"]["wall_upstream_over_ours"] else None}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--total", type=int, default=2048, help="total batch size in tokens (must divide by 2 workers)")
    p.add_argument("--base-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "nanochat-bench-train"))
    p.add_argument("--upstream", default=None, help="path to an upstream nanochat checkout to compare with")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (Ray: CPUs per worker)")
    p.add_argument("--compile", type=int, default=1, choices=[-1, 0, 1],
                   help="torch.compile the model in rows (a)-(c) (upstream: always); -1 = our default (auto), so "
                        "row (b) is `python -m ray_jobs.base_train` with default workers")
    p.add_argument("--paths", action="store_true", help="the user command lines side by side (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--paths: rounds of the four rows")
    p.add_argument("--warm-cache", action="store_true", help="--paths: keep each row's inductor cache across rounds")
    args = p.parse_args(argv)
    if args.steps < 3:  # the rate is the median step time after two warm-up steps
        p.error(f"--steps must be at least 3 (got {args.steps}): the first two steps are warm-up")
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    if args.paths:
        prepare_base_dir(args.base_dir)
        return main_paths(args)
    from nanochat.common import NanochatError
    from nanochat.train import check_batch_divisible

    try:  # row (c) runs 2 workers: fail now rather than after the first rows
        check_batch_divisible(args.total, args.batch, args.seq, 2)
    except NanochatError as e:
        p.error(str(e).replace("--device-batch-size", "--batch").replace("--max-seq-len", "--seq")
                .replace("--total-batch-size", "--total"))
    prepare_base_dir(args.base_dir)

    rows = {"in_process": run_in_process(args, args.compile)}
    if args.compile == 1:
        rows["in_process_eager"] = run_in_process(args, compile=0)
    t_start = time.time()  # Ray start-up (ray.init) counts towards (b)'s time to first step
    import ray

    from ray_jobs import train_common as tc

    # no dashboard: it would take the fixed port 8265 (other jobs may run Ray on this machine) and ~1.7 GB
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 2 * args.threads),
             runtime_env={"env_vars": tc.forwarded_env()})
    rows["trainer_1_worker"] = run_ray(args, 1, t_start)
    rows["trainer_2_workers"] = run_ray(args, 2, time.time())
    if args.upstream:
        rows["upstream_in_process"] = run_upstream(args, args.upstream)

    # One MFU denominator for every row: the peak measured once here with the same threads (a per-process
    # measurement swings several-fold with the load of other processes on a shared machine).
    import torch

    from nanochat.common import cpu_peak_flops

    torch.set_num_threads(args.threads)
    peak = cpu_peak_flops(bursts=20)
    for r in rows.values():
        if "tok_per_sec" in r:
            fpt = r.get("flops_per_token", rows["in_process"]["flops_per_token"])
            r["mfu"] = 100 * fpt * r["tok_per_sec"] / (peak * r.get("world", 1))
    base = rows["in_process"]["tok_per_sec"]
    print(f"config: depth {args.depth}, T {args.seq}, B {args.batch}, total batch {args.total} tokens, "
          f"{args.steps} steps, {args.threads} thread(s) per process, {os.cpu_count()} CPUs, compile {args.compile}")
    print(f"{'run':<22}{'tok/s':>10}{'vs (a)':>8}{'MFU %':>8}{'first step s':>14}{'wall s':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<22} error: {r['error'][-200:]}")
            continue
        mfu = f"{r['mfu']:.2f}" if r.get("mfu") is not None else "-"
        first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-"
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "-"
        print(f"{name:<22}{r['tok_per_sec']:>10.0f}{r['tok_per_sec'] / base:>8.2f}{mfu:>8}{first:>14}{wall:>8}")
    summary = {"config": vars(args), "results": rows, "peak_flops_per_process": peak,
               "trainer_1w_vs_in_process": rows["trainer_1_worker"]["tok_per_sec"] / base,
               "ray_start_to_first_step_s": rows["trainer_1_worker"]["first_step_s"]}
    up = rows.get("upstream_in_process", {})
    if "tok_per_sec" in up:
        summary["in_process_vs_upstream"] = base / up["tok_per_sec"]
        summary["trainer_1w_vs_upstream"] = rows["trainer_1_worker"]["tok_per_sec"] / up["tok_per_sec"]
        summary["trainer_1w_vs_upstream_wall"] = up["wall_s"] / rows["trainer_1_worker"]["wall_s"]  # >1: ours sooner
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
