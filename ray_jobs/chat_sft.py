"""
Supervised fine-tuning on Ray Train: upstream chat_sft's flags and defaults, plus Ray's (see train_common).

    python -m ray_jobs.chat_sft --num-workers 2                       # upstream mixture (SmolTalk, MMLU, GSM8K)
    python -m ray_jobs.chat_sft --mixture offline --num-workers 2     # generated tasks, no network
    python -m ray_jobs.chat_sft --num-workers 0 ...                   # in this process, no Ray (or under torchrun)

Loads the base checkpoint (largest tag / last step unless --model-tag / --model-step), inherits batch sizes and
LRs from its meta, writes chatsft_checkpoints/<tag>/ under the base dir (local or s3://). With --save-every, a
restarted worker group or a resubmitted run (same --name) resumes from the newest SFT checkpoint.
"""

import functools
import sys

from nanochat.sft import SFTConfig, sft
from ray_jobs import train_common as tc


def parse_args(argv=None) -> tuple[SFTConfig, tc.ClusterArgs]:
    return tc.parse_job_args(SFTConfig, "Supervised fine-tuning (SFT) the model (on Ray Train)", argv)


def prepare(cfg: SFTConfig, cluster: tc.ClusterArgs) -> tuple[SFTConfig, bool, str]:
    """Checks before Ray starts: flags, the base checkpoint exists, batch divisibility, storage."""
    from nanochat.checkpoint_manager import _resolve, check_checkpoint, checkpoints_dir_for
    from nanochat.common import get_base_dir
    from nanochat.sft import INHERITED

    tc.validate_cluster(cluster)
    use_gpu = tc.resolve_use_gpu(cluster, cfg.device_type) if cluster.num_workers > 0 else False
    cluster.ray_data_actors = 0  # SFT reads task mixtures, not the pretraining shards: no tokenizer actors
    if cluster.num_workers > 0 and not use_gpu and not cfg.device_type:
        cfg.device_type = "cpu"
    checkpoint_dir, step = _resolve(checkpoints_dir_for("base"), cfg.model_tag, cfg.model_step)
    # a damaged file: one line here, not a traceback from every worker
    meta = check_checkpoint(checkpoint_dir, step, optimizer=bool(cfg.load_optimizer))
    resolved = {name: getattr(cfg, name) if getattr(cfg, name) is not None else meta.get(name, fallback)
                for name, fallback, where in INHERITED if where == "meta"}
    from nanochat.train import check_batch_divisible

    tc.check_world_sizes(cluster, lambda world: check_batch_divisible(
        resolved["total_batch_size"], resolved["device_batch_size"], resolved["max_seq_len"], world))
    tc.check_storage(get_base_dir(), *([cluster.storage or tc.default_storage()] if cluster.num_workers else []))
    tag = cfg.model_tag or checkpoint_dir.rstrip("/").split("/")[-1]
    return cfg, use_gpu, cluster.name or f"chat_sft-{tag}"


# Runs in every Ray Train worker: sft(cfg, RaySink), then one final report. worker_fn(config, sink_cls=...)
worker_fn = functools.partial(tc.run_loop, sft, SFTConfig)


def summary(r: dict) -> str:
    return (f"Final: step {r.get('step')} | val bpb {r.get('val_bpb')} | "
            f"chat eval {r.get('chat_eval')} | checkpoints in {r.get('checkpoint_dir')}")


def main(argv=None) -> int:
    return tc.run_job(parse_args, prepare, sft, worker_fn, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
