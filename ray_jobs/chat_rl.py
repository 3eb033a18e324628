"""
RL on GSM8K on Ray Train: upstream chat_rl's flags and defaults (nanochat/rl.py), plus Ray's.

    python -m ray_jobs.chat_rl --num-workers=2                      # TorchTrainer, 2 workers
    python -m ray_jobs.chat_rl --num-workers 0                      # same loop in this process, no Ray
    python -m ray_jobs.chat_rl --num-workers 0 --device-batch-size=2 --examples-per-step=2 --num-samples=4 \
        --max-new-tokens=64 --num-iterations=10 --eval-every=5 --eval-examples=16      # a small CPU run

Starts from the newest SFT checkpoint (chatsft_checkpoints/, or --model-tag/--model-step) and writes the model only
to <base dir>/chatrl_checkpoints/<tag>/. Each worker takes every W-th training question, so the questions of a
step do not depend on the number of workers (--examples-per-step must divide by it). Flags, the SFT checkpoint and
the task data are checked before Ray starts. Resubmitting with the same --name (default chat_rl-<tag>) continues
after the newest checkpoint of that run (weights only; RL saves no optimizer state).
"""

import argparse
import sys

from nanochat.common import NanochatError, print_banner
from nanochat.rl import RLConfig, load_tasks, num_steps_for, resolve_sft_checkpoint, rl
from ray_jobs import train_common as tc


def parse_args(argv=None) -> tuple[RLConfig, tc.ClusterArgs]:
    parser = argparse.ArgumentParser(description="Reinforcement learning on GSM8K (on Ray Train)")
    tc.add_config_flags(parser, RLConfig)
    tc.add_cluster_flags(parser)
    args = parser.parse_args(argv)
    cfg_kwargs, cluster = tc.split_args(args, RLConfig)
    return RLConfig(**cfg_kwargs), cluster


def prepare(cfg: RLConfig, cluster: tc.ClusterArgs) -> tuple[RLConfig, bool, str]:
    """Validate everything that can be checked before Ray starts. Returns (cfg for the workers, use_gpu, run name)."""
    tc.validate_cluster(cluster)
    for world in tc.world_sizes(cluster):
        cfg.validate(world)
    use_gpu = tc.resolve_use_gpu(cluster, cfg.device_type) if cluster.num_workers > 0 else False
    if cluster.num_workers > 0 and not use_gpu and not cfg.device_type:
        cfg.device_type = "cpu"  # workers must not autodetect a GPU that Ray did not assign to them
    sft_dir, sft_step = resolve_sft_checkpoint(cfg.model_tag, cfg.model_step)  # names chat_sft when missing
    print(f"SFT checkpoint: {sft_dir} step {sft_step}")
    train_task, _ = load_tasks(cfg.task)  # downloads (or finds offline) the task data once, here
    print(f"RL task {cfg.task}: {len(train_task)} training examples, {num_steps_for(cfg, len(train_task))} steps")
    from nanochat.common import get_base_dir

    tc.check_storage(get_base_dir(), *([cluster.storage or tc.default_storage()] if cluster.num_workers else []))
    tag = cfg.model_tag or sft_dir.rstrip("/").rsplit("/", 1)[-1]
    return cfg, use_gpu, cluster.name or f"chat_rl-{tag}"


def worker_fn(config: dict, sink_cls=tc.RaySink) -> None:
    """Runs in every Ray Train worker: the library loop with a RaySink, then one final report (all ranks)."""
    cfg = RLConfig.from_dict(config["cfg"])
    sink = sink_cls(config["run_name"], config["report_every"])
    sink.report_final(rl(cfg, sink))


def main(argv=None) -> int:
    print_banner()
    try:
        cfg, cluster = parse_args(argv)
        cfg, use_gpu, run_name = prepare(cfg, cluster)
        if cluster.num_workers == 0:
            result = rl(cfg)
        else:
            loop_config = {"cfg": cfg.to_dict(), "run_name": run_name, "report_every": cluster.report_every}
            result = tc.run_trainer(worker_fn, loop_config, cluster, use_gpu, run_name).metrics
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Final: {result.get('num_steps')} steps | pass@k {result.get('final_pass_at_k')} | "
          f"checkpoints in {result.get('checkpoint_dir')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
