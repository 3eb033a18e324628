"""
Checkpoint cost inside the training loop: how long each save blocks the loop, synchronous vs background (host copy,
write in a thread, meta last), and the step times around the saves, on the CPU preset's model shape by default.

    python -m bench.bench_checkpoint                         # cpu preset shape: depth 4, T 256, B 16, vocab 4096
    python -m bench.bench_checkpoint --steps 30 --save-every 5 --base-dir /tmp/ckbench
    python -m bench.bench_checkpoint --s3                    # writes to a local moto S3 server (tests/s3server.py)

Three in-process pretraining runs of the same seeded synthetic stream, one after the other: no saves (baseline),
--background-save 0, --background-save 1, each saving every --save-every steps (retention K=2 as in a run). Per
run: median blocking time per periodic save (the loop's own measurement: waiting for the previous save + host copy
[+ the write, when synchronous]), median step time of the steps right after a save vs all others (a background
write competes for the same cores), total wall time. The last columns extrapolate to the CPU preset: blocking time
x saves per run / run time, for --preset-minutes of pretraining saving every --preset-save-minutes.
Prints a table, then a JSON object as the last line.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def run(args, tag: str, save_every: int, background: int) -> dict:
    import torch

    from nanochat.train import BaseTrainConfig, train

    torch.set_num_threads(args.threads)
    cfg = BaseTrainConfig(depth=args.depth, aspect_ratio=64, head_dim=64, max_seq_len=args.seq, window_pattern="L",
                          num_iterations=args.steps, device_batch_size=args.batch, total_batch_size=args.total,
                          eval_every=-1, core_metric_every=-1, sample_every=-1, save_every=save_every,
                          warmup_steps=5, model_tag=tag, device_type="cpu", data="synthetic", vocab_size=args.vocab,
                          keep_checkpoints=2, background_save=background)  # fmt: skip
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        r = train(cfg)
    wall = time.time() - t0
    periodic = [t for s, t in r["save_stalls"] if s < args.steps]
    dts = r["step_times"][2:]  # index i = step i+2 (the first two steps warm up)
    after = {s for s, _ in r["save_stalls"]}
    near = [dt for i, dt in enumerate(dts, start=2) if i in after]  # the step right after each save started
    rest = [dt for i, dt in enumerate(dts, start=2) if i not in after]
    return {"wall_s": wall, "saves": len(periodic), "stall_s": statistics.median(periodic) if periodic else 0.0,
            "stall_max_s": max(periodic, default=0.0), "step_s": statistics.median(rest) if rest else 0.0,
            "step_after_save_s": statistics.median(near) if near else None}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--total", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base-dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--s3", action="store_true", help="write checkpoints to a local moto S3 server")
    p.add_argument("--preset-minutes", type=float, default=7.0, help="pretraining minutes of the preset")
    p.add_argument("--preset-save-minutes", type=float, default=1.0, help="its --save-every-minutes")
    args = p.parse_args(argv)

    with contextlib.ExitStack() as stack:
        base = args.base_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ckbench-"))
        os.environ["NANOCHAT_BASE_DIR"] = base
        where = base
        if args.s3:
            from tests.s3server import S3Server

            server = stack.enter_context(S3Server())
            os.environ.update(server.env)
            os.environ["NANOCHAT_BASE_DIR"] = where = server.uri("bench")
        rows = {"no_saves": run(args, "nosave", -1, 1), "synchronous": run(args, "sync", args.save_every, 0),
                "background": run(args, "bg", args.save_every, 1)}  # fmt: skip
    saves_per_run = args.preset_minutes / args.preset_save_minutes
    for r in rows.values():
        r["preset_overhead_pct"] = 100 * r["stall_s"] * saves_per_run / (args.preset_minutes * 60)
    print(f"checkpoints to {where}; depth {args.depth}, T {args.seq}, B {args.batch}, total {args.total}, "
          f"{args.steps} steps, a save every {args.save_every} steps")
    print(f"{'run':12s} {'saves':>5s} {'block/save':>11s} {'max':>7s} {'step':>7s} {'step after':>10s} "
          f"{'wall':>7s} {'cpu preset cost':>15s}")
    for name, r in rows.items():
        after = f"{r['step_after_save_s']:.3f}s" if r["step_after_save_s"] is not None else "-"
        print(f"{name:12s} {r['saves']:5d} {r['stall_s']:10.3f}s {r['stall_max_s']:6.3f}s {r['step_s']:6.3f}s "
              f"{after:>10s} {r['wall_s']:6.1f}s {r['preset_overhead_pct']:14.2f}%")
    sync, bg = rows["synchronous"], rows["background"]
    summary = {"stall_ratio_sync_over_background": sync["stall_s"] / max(bg["stall_s"], 1e-9), **{
        f"{n}_{k}": round(v, 4) if isinstance(v, float) else v for n, r in rows.items() for k, v in r.items()}}
    print(f"blocking time per save: synchronous {sync['stall_s']:.3f}s, background {bg['stall_s']:.3f}s "
          f"({summary['stall_ratio_sync_over_background']:.1f}x less)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
