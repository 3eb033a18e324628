"""
The whole nanochat pipeline as one Ray job: data -> tokenizer -> pretraining -> base eval -> SFT -> chat eval
(-> RL) -> report. Every stage calls the library / ray_jobs functions directly, on one Ray cluster.

    python -m ray_jobs.speedrun --preset cpu                   # embedded Ray, 2-core laptop, offline, <= 20 min
    python -m ray_jobs.speedrun --preset cpu-tiny              # CI-sized
    python -m ray_jobs.speedrun --preset speedrun --base-dir s3://bucket/nanochat      # d24 on every GPU
    ray job submit --working-dir . -- python ray_jobs/speedrun.py --preset d12         # on a cluster
    python -m ray_jobs.speedrun --preset cpu --set base_train.num_iterations=500 --depth 6 --stages base_train

Presets and overrides: ray_jobs/presets.py (`--set section.key=value`, repeatable; shorthands --depth,
--num-iterations, --num-workers, ...). `--list-presets` prints them; `--print-config` prints the resolved config.

Resume: each finished stage writes `<base>/speedrun/stages/<stage>.json` (its key numbers, timings and a hash of
its settings and of the stages it depends on). Re-running the same command skips finished stages; an interrupted
training stage resumes from its newest checkpoint (same Ray Train run name, see ray_jobs/train_common.py). A stage
whose settings changed runs again from step 0 (a new Ray Train run name), and so does everything downstream of it.
`--fresh` starts a new run id: every stage runs again from step 0 (old checkpoint files may be overwritten).

Outputs (nanochat's layout): base_data_climbmix/, tokenizer/, base_checkpoints/<tag>/, base_eval/,
chatsft_checkpoints/<tag>/, chat_eval/, chatrl_checkpoints/, and report.md + report/*.png (ray_jobs/report.py).

Module layout: ray_jobs/speedrun_state.py (stage graph, markers, run record), ray_jobs/speedrun_pipeline.py (the
stages), ray_jobs/speedrun_generated_eval.py (offline chat tasks), this file (CLI). Names stay importable from here.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python ray_jobs/speedrun.py` (ray job submit): make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import storage  # noqa: E402
from nanochat.common import NanochatError  # noqa: E402
from ray_jobs import presets as P  # noqa: E402
from ray_jobs.speedrun_generated_eval import eval_generated_tasks  # noqa: E402
from ray_jobs.speedrun_pipeline import BUDGET_KEYS, Pipeline, measure_step_seconds  # noqa: E402
from ray_jobs.speedrun_state import (  # noqa: E402
    DEPENDS,
    SECTION,
    STAGES,
    collect_environment,
    load_run,
    log,
    marker_path,
    read_json,
    speedrun_dir,
    write_json,
)

__all__ = [  # re-exported: tests and tools import these from ray_jobs.speedrun
    "BUDGET_KEYS", "DEPENDS", "SECTION", "STAGES", "Pipeline", "eval_generated_tasks", "marker_path",
    "measure_step_seconds", "read_json", "main", "parse_args", "resolve_config",
]


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="nanochat speedrun as one Ray job (see module docstring)")
    p.add_argument("--preset", default="cpu", help=f"one of: {', '.join(P.list_presets())} (default: cpu)")
    p.add_argument("--base-dir", default=None, help="NANOCHAT_BASE_DIR for this run: a local dir or s3://bucket/prefix")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset value (repeatable), e.g. --set base_train.depth=6")
    p.add_argument("--stages", default=None, help=f"comma-separated subset to run (of {', '.join(STAGES)})")
    p.add_argument("--skip", default="", help="comma-separated stages to skip")
    p.add_argument("--fresh", action="store_true", help="new run id: ignore finished stages and old checkpoints")
    p.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    for flag, target in P.SHORTHANDS.items():
        p.add_argument("--" + flag.replace("_", "-"), default=None, help=f"shorthand for --set {target}=VALUE")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    preset = P.get_preset(args.preset)
    explicit = {}
    overrides = [f"{target}={getattr(args, flag)}" for flag, target in P.SHORTHANDS.items()
                 if getattr(args, flag) is not None] + list(args.overrides)  # fmt: skip
    for spec in overrides:
        P.apply_override(preset, spec)
        explicit[spec.split("=", 1)[0].strip()] = True
    if explicit.get("ray.num_workers") and not explicit.get("ray.nodes"):
        preset["ray"]["nodes"] = 0  # an explicit worker count wins over the preset's node count
    preset["_explicit"] = explicit
    return preset


def _stage_set(spec: str | None) -> set | None:
    if spec is None:
        return None
    names = {s.strip() for s in spec.split(",") if s.strip()}
    bad = names - set(STAGES)
    if bad:
        raise NanochatError(f"unknown stage(s) {sorted(bad)}; valid: {', '.join(STAGES)}")
    return names


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.list_presets:
        for name in P.list_presets():
            doc = ((P.PRESETS[name].__doc__ or "").strip().splitlines() or [""])[0]
            print(f"{name:10s} {doc}")
        return 0
    info = None
    try:
        preset = resolve_config(args)
        only, skip = _stage_set(args.stages), _stage_set(args.skip) or set()
        if args.print_config:
            print(json.dumps({k: v for k, v in preset.items() if k != "_explicit"}, indent=2))
            return 0
        if args.base_dir:
            os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
        from nanochat.common import get_base_dir

        base_dir = get_base_dir()
        os.environ["NANOCHAT_BASE_DIR"] = base_dir  # resolved (default included): forwarded to every Ray worker
        storage.check_writable(base_dir)  # a bad path or bucket fails here, in seconds
        log(f"preset {preset['preset']} | base dir {base_dir}")
        from nanochat.common import apply_gpu_env_defaults
        from ray_jobs import cluster_utils
        from ray_jobs import train_common as tc

        apply_gpu_env_defaults()  # PYTORCH_ALLOC_CONF (unless set): forwarded to every Ray worker below
        r = preset["ray"]
        info = cluster_utils.connect(args.address, num_cpus=int(r["num_cpus"]) if int(r["num_cpus"]) > 0 else None,
                                     include_dashboard=bool(r["dashboard"]), env_vars=tc.forwarded_env())  # fmt: skip
        where = "embedded Ray" if info.embedded else f"Ray cluster {info.address}"
        log(f"{where}: {info.num_nodes} node(s), {info.resources} (ray.init {info.init_seconds:.1f}s)"
            + (f" | dashboard {info.dashboard_url}" if info.dashboard_url else ""))
        log(cluster_utils.dashboard_hint(info) or "no dashboard")
        run = load_run(base_dir, preset, args.fresh)
        env = collect_environment(info)
        write_json(storage.join(speedrun_dir(base_dir), "environment.json"), env)
        pipe = Pipeline(base_dir, preset, run, only, skip)
        pipe.run_all()
        total = time.time() - t_start
        write_json(storage.join(speedrun_dir(base_dir), "last_invocation.json"),
                   {"started": t_start, "finished": time.time(), "seconds": round(total, 2), "argv": argv or
                    sys.argv[1:], "run_id": run["run_id"]})  # fmt: skip
        if not args.no_report:
            from ray_jobs import report

            path = report.generate(base_dir)
            log(f"report: {path}")
        log(f"all stages finished; wall time {total / 60:.1f} min (this invocation, Ray start-up included)")
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from ray_jobs import cluster_utils

        cluster_utils.shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
