"""
Train the BPE tokenizer on the train split of the pretraining shards; write tokenizer.pkl and token_bytes.pt.

    python -m ray_jobs.tok_train                                   # upstream defaults: 2B chars, 10K doc cap, 32768
    python -m ray_jobs.tok_train --max-chars 2000000000 --doc-cap 10000 --vocab-size 32768
    python -m ray_jobs.tok_train --ray                             # as one Ray task (the default when RAY_ADDRESS is set)

Outputs go to <base>/tokenizer/ (NANOCHAT_BASE_DIR, a local dir or s3:// URI): tokenizer.pkl (pickled
tiktoken.Encoding, upstream's format) and token_bytes.pt (int32 bytes per token, 0 for specials, for bits per byte).

BPE training is one process (rustbpe counts pairs on all cores with threads), so on a cluster it is a single Ray
task. With a local base dir it is pinned (softly) to the driver's node, where `python -m nanochat.dataset` put the
shards; with an s3:// base dir any node will do. The task sends the trained encoding back and the driver writes the
files, so they land where the driver's base dir points either way.
"""

import argparse
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass

from nanochat.common import NanochatError, get_base_dir
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    RustBPETokenizer,
    compute_token_bytes,
    get_tokenizer_dir,
    save_token_bytes,
)

# Round-trip check after training: English, numbers, contractions, punctuation, CJK and an emoji.
SANITY_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""

# Environment variables a remote task needs to reach the same storage as the driver (forwarded only if set).
FORWARDED_ENV = (
    "NANOCHAT_BASE_DIR",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@dataclass
class TokTrainConfig:
    max_chars: int = 2_000_000_000  # stop reading the corpus after this many characters
    doc_cap: int = 10_000  # crop every document to this many characters
    vocab_size: int = 32768  # total vocabulary, the 9 special tokens included (2^15)
    use_ray: bool = False  # run the training as one Ray task (set by --ray or RAY_ADDRESS)
    num_cpus: float = 1  # CPUs the Ray task reserves (rustbpe itself uses every core of its node)

    def __post_init__(self):
        if self.max_chars <= 0:
            raise NanochatError(f"--max-chars must be positive, got {self.max_chars}")
        if self.doc_cap <= 0:
            raise NanochatError(f"--doc-cap must be positive, got {self.doc_cap}")
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < min_vocab:
            raise NanochatError(
                f"--vocab-size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} specials), "
                f"got {self.vocab_size}"
            )
        if self.num_cpus < 0:
            raise NanochatError(f"--num-cpus must be >= 0, got {self.num_cpus}")


# -----------------------------------------------------------------------------
# Training (runs in this process or inside the Ray task)


def text_iterator(max_chars: int, doc_cap: int, stats: dict):
    """Train-split documents, each cropped to doc_cap chars; stops after the one that crosses max_chars.

    Same stopping rule as upstream, so both train on exactly the same text. Counts go into stats.
    """
    from nanochat.dataset import parquets_iter_batched

    stats.update(docs=0, chars=0)
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            text = doc[:doc_cap]
            stats["docs"] += 1
            stats["chars"] += len(text)
            yield text
            if stats["chars"] > max_chars:
                return


def train(cfg: TokTrainConfig) -> tuple[RustBPETokenizer, dict]:
    stats: dict = {}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(cfg.max_chars, cfg.doc_cap, stats), cfg.vocab_size)
    stats["train_time_s"] = time.time() - t0
    if stats.get("chars", 0) == 0:
        raise NanochatError(
            f"No training text: the train split under {get_base_dir()} is empty (it is every shard but the last). "
            "Get at least 2 shards first: python -m nanochat.dataset -n 2"
        )
    return tokenizer, stats


def _train_task(cfg_dict: dict) -> tuple[bytes, dict]:
    """Body of the Ray task: train, then ship the encoding back as upstream's pickle bytes."""
    import socket

    tokenizer, stats = train(TokTrainConfig(**cfg_dict))
    stats["node"] = socket.gethostname()
    return pickle.dumps(tokenizer.enc), stats


def train_on_ray(cfg: TokTrainConfig) -> tuple[RustBPETokenizer, dict]:
    # [Ray] the only Ray-specific lines in this stage: one task, placed near the data, results back to the driver
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started_here = not ray.is_initialized()
    if started_here:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # connect to the cluster
        else:
            # a throwaway local cluster for one task needs no dashboard; "local": never join a stray `ray start`
            ray.init(address="local", include_dashboard=False)
    options: dict = {"num_cpus": cfg.num_cpus, "max_retries": 0}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["NANOCHAT_BASE_DIR"] = get_base_dir()  # the driver's resolved base dir, default included
    options["runtime_env"] = {"env_vars": env}
    if "://" not in env["NANOCHAT_BASE_DIR"]:
        # local shards live on the node that downloaded them, which is normally the driver's
        node_id = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
    task = ray.remote(_train_task).options(**options)
    try:
        enc_bytes, stats = ray.get(task.remote(asdict(cfg)))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NanochatError):
            raise e.cause from None  # a user error inside the task: show its message, not a remote traceback
        raise
    finally:
        if started_here:
            ray.shutdown()
    return RustBPETokenizer(pickle.loads(enc_bytes), "<|bos|>"), stats


# -----------------------------------------------------------------------------
# Outputs


def write_outputs(tokenizer: RustBPETokenizer, tokenizer_dir: str) -> dict:
    pkl_path = tokenizer.save(tokenizer_dir)
    ids = tokenizer.encode(SANITY_TEXT)
    assert tokenizer.decode(ids) == SANITY_TEXT, "tokenizer round trip failed"
    token_bytes = compute_token_bytes(tokenizer)
    token_bytes_path = save_token_bytes(token_bytes, tokenizer_dir)
    return {"tokenizer_path": pkl_path, "token_bytes_path": token_bytes_path, "sanity_tokens": len(ids)}


def main(cfg: TokTrainConfig) -> dict:
    """Train and save; returns a summary dict (vocab size, timing, corpus counts, output paths)."""
    print(f"max_chars: {cfg.max_chars:,}")
    print(f"doc_cap: {cfg.doc_cap:,}")
    print(f"vocab_size: {cfg.vocab_size:,}")
    tokenizer, stats = train_on_ray(cfg) if cfg.use_ray else train(cfg)
    where = f" on Ray node {stats['node']}" if "node" in stats else ""
    print(f"Training time: {stats['train_time_s']:.2f}s{where} ({stats['docs']:,} docs, {stats['chars']:,} chars)")
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size < cfg.vocab_size:
        print(
            f"WARNING: the corpus only supported {vocab_size:,} of the {cfg.vocab_size:,} requested tokens "
            "(too little distinct text); use more shards or a smaller --vocab-size"
        )
    outputs = write_outputs(tokenizer, get_tokenizer_dir())
    return {"vocab_size": vocab_size, **stats, **outputs}


def parse_args(argv=None) -> TokTrainConfig:
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) on the pretraining shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="maximum characters to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="maximum characters per document")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size incl. 9 special tokens")
    parser.add_argument("--ray", action="store_true", help="run as one Ray task (default when RAY_ADDRESS is set)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs the Ray task reserves")
    args = parser.parse_args(argv)
    use_ray = args.ray or bool(os.environ.get("RAY_ADDRESS"))
    return TokTrainConfig(args.max_chars, args.doc_cap, args.vocab_size, use_ray, args.num_cpus)


def cli(argv=None) -> int:
    try:
        main(parse_args(argv))
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
