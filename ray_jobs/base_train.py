"""
Pretrain a base model on Ray Train: upstream base_train's flags and defaults, plus Ray's.

    python -m ray_jobs.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20 --num-workers=2
    python -m ray_jobs.base_train --num-workers 0 ...     # same loop in this process, no Ray (also under torchrun)

Every flag combination is validated (and storage checked) before Ray starts. Resubmitting with the same --name
(default base_train-<model tag>) resumes from the newest checkpoint; --num-workers may differ from the run that
wrote it. Checkpoints: <base dir>/base_checkpoints/<tag>/ (local or s3://); Ray run state: --storage.
"""

import dataclasses
import functools
import sys

from nanochat.train import BaseTrainConfig, plan_for, train
from ray_jobs import train_common as tc


def parse_args(argv=None) -> tuple[BaseTrainConfig, tc.ClusterArgs]:
    return tc.parse_job_args(BaseTrainConfig, "Pretrain base model (on Ray Train)", argv)


def prepare(cfg: BaseTrainConfig, cluster: tc.ClusterArgs) -> tuple[BaseTrainConfig, bool, str]:
    """Validate everything that can be checked before Ray starts. Returns (cfg for the workers, use_gpu, run name)."""
    tc.validate_cluster(cluster)
    cfg.validate()
    use_gpu = tc.resolve_use_gpu(cluster, cfg.device_type) if cluster.num_workers > 0 else False
    tc.resolve_ray_data_actors(cluster, use_gpu, cfg.data)
    if cluster.num_workers > 0 and not use_gpu and not cfg.device_type:
        cfg.device_type = "cpu"  # workers must not autodetect a GPU that Ray did not assign to them
    if cfg.data == "synthetic" and cfg.vocab_size > 0:
        vocab_size = cfg.vocab_size
    else:
        from nanochat.tokenizer import get_tokenizer

        vocab_size = get_tokenizer().get_vocab_size()
    # batch divisibility for every world size the run may take. --uneven-batch -1: the full size by upstream's rule,
    # the smaller sizes of an elastic run dealt unevenly (so losing any node leaves a size the run can continue at)
    if cfg.uneven_batch == -1:
        plan_for(dataclasses.replace(cfg, uneven_batch=0), vocab_size, max(tc.world_sizes(cluster)))
        cfg.uneven_batch = int(len(tc.world_sizes(cluster)) > 1)
    tc.check_world_sizes(cluster, lambda world: plan_for(cfg, vocab_size, world))
    from nanochat.common import get_base_dir

    tc.check_storage(get_base_dir(), *([cluster.storage or tc.default_storage()] if cluster.num_workers else []))
    if cfg.resume_from_step != -1:  # a damaged file: one line here, not a traceback from every worker
        from nanochat.checkpoint_manager import check_checkpoint
        from nanochat.train import checkpoint_dir_for

        check_checkpoint(checkpoint_dir_for(cfg), cfg.resume_from_step, optimizer=True)
    return cfg, use_gpu, cluster.name or f"base_train-{cfg.tag}"


# Runs in every Ray Train worker: train(cfg, RaySink), then one final report. worker_fn(config, sink_cls=...)
worker_fn = functools.partial(tc.run_loop, train, BaseTrainConfig)


def summary(r: dict) -> str:
    return (f"Final: step {r.get('step')} | min val bpb {r.get('min_val_bpb')} | "
            f"checkpoints in {r.get('checkpoint_dir')}")


def main(argv=None) -> int:
    return tc.run_job(parse_args, prepare, train, worker_fn, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
