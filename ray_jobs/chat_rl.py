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

import functools
import sys

from nanochat.rl import RLConfig, load_tasks, num_steps_for, resolve_sft_checkpoint, rl
from ray_jobs import train_common as tc


def parse_args(argv=None) -> tuple[RLConfig, tc.ClusterArgs]:
    return tc.parse_job_args(RLConfig, "Reinforcement learning on GSM8K (on Ray Train)", argv)


def prepare(cfg: RLConfig, cluster: tc.ClusterArgs) -> tuple[RLConfig, bool, str]:
    """Validate everything that can be checked before Ray starts. Returns (cfg for the workers, use_gpu, run name)."""
    tc.validate_cluster(cluster)
    tc.check_world_sizes(cluster, cfg.validate)
    use_gpu = tc.resolve_use_gpu(cluster, cfg.device_type) if cluster.num_workers > 0 else False
    cluster.ray_data_actors = 0  # RL samples from the task, not the pretraining shards: no tokenizer actors
    if cluster.num_workers > 0 and not use_gpu and not cfg.device_type:
        cfg.device_type = "cpu"  # workers must not autodetect a GPU that Ray did not assign to them
    sft_dir, sft_step = resolve_sft_checkpoint(cfg.model_tag, cfg.model_step)  # names chat_sft when missing
    from nanochat.checkpoint_manager import check_checkpoint

    check_checkpoint(sft_dir, sft_step)  # a damaged file: one line here, not a traceback from every worker
    print(f"SFT checkpoint: {sft_dir} step {sft_step}")
    train_task, _ = load_tasks(cfg.task)  # downloads (or finds offline) the task data once, here
    print(f"RL task {cfg.task}: {len(train_task)} training examples, {num_steps_for(cfg, len(train_task))} steps")
    from nanochat.common import get_base_dir

    tc.check_storage(get_base_dir(), *([cluster.storage or tc.default_storage()] if cluster.num_workers else []))
    tag = cfg.model_tag or sft_dir.rstrip("/").rsplit("/", 1)[-1]
    return cfg, use_gpu, cluster.name or f"chat_rl-{tag}"


# Runs in every Ray Train worker: rl(cfg, RaySink), then one final report. worker_fn(config, sink_cls=...)
worker_fn = functools.partial(tc.run_loop, rl, RLConfig)


def summary(r: dict) -> str:
    return (f"Final: {r.get('num_steps')} steps | pass@k {r.get('final_pass_at_k')} | "
            f"checkpoints in {r.get('checkpoint_dir')}")


def main(argv=None) -> int:
    return tc.run_job(parse_args, prepare, rl, worker_fn, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
