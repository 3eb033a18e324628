"""
What the pretraining loop reads and writes besides the model: the `TrainSink` hooks through which a launcher (Ray
Train) observes and steers the loop, the training / validation data streams (the library's loaders or a seeded
synthetic stream), and the checkpoint location with world-size-aware optimizer loading. nanochat/train.py uses them.
"""

import torch

from nanochat.common import get_base_dir, print0
from nanochat.train_config import BaseTrainConfig

# -----------------------------------------------------------------------------
# The sink: how a launcher observes and steers the loop without the library knowing about it


PENDING = {"pending": True}  # what a TrainSink's core_metric / chat_metric returns after an asynchronous launch


class TrainSink:
    """Hooks called by `train()`. The defaults do nothing, which is the single-process behaviour.

    Every hook is called on every rank at the same points of the loop, so an implementation may use collectives
    (ray.train.report is one: every rank must call it equally often).
    """

    def resume_step(self, checkpoint_dir: str) -> int | None:
        """Step to resume from (overrides --resume-from-step), or None to follow the config."""
        return None

    def train_loader(self, cfg, tokenizer, device, resume_state: dict | None):
        """An iterator of (inputs, targets, state_dict) to use instead of the library's loader, or None."""
        return None

    def on_step(self, step: int, metrics: dict) -> None:
        """After each optimizer step (`step` = number of steps done)."""

    def on_eval(self, step: int, metrics: dict) -> None:
        """After a validation / CORE evaluation."""

    def on_checkpoint(self, step: int, checkpoint_dir: str, metrics: dict) -> None:
        """After every rank finished writing the checkpoint of `step` (it is complete on storage)."""

    def core_metric(self, model, tokenizer, device, step: int, max_per_task: int) -> dict | None:
        """Compute or launch the CORE metric of the model at `step` (called on every rank).

        None: evaluate in-process with the library's evaluate_core (a collective over all ranks). A dict with
        "core_metric": the result. PENDING: launched asynchronously; the result arrives later via finished_evals."""
        return None

    def chat_metric(self, cfg, model, tokenizer, device, step: int, batch_size: int) -> dict | None:
        """SFT's in-loop chat evaluation: {task: accuracy}, None (in-process), or PENDING (see core_metric)."""
        return None

    def finished_evals(self, wait: bool = False) -> list[tuple[str, int, dict]]:
        """Asynchronous evaluations finished since the last call, as (kind "core" | "chat", step, results).

        Polled after every optimizer step, so it must never block unless `wait` (end of training: wait for all
        of them). Called on every rank; only the rank that launched them returns results, so the loop's
        reporting of those results (print, wandb, on_eval) runs on that rank only and uses no collectives."""
        return []

    def checkpoint_meta(self) -> dict:
        """Extra keys for the checkpoint meta (e.g. which launcher run wrote it)."""
        return {}

    def protected_steps(self) -> set:
        """Checkpoint steps retention must not delete (rank 0): e.g. the one the launcher would resume from."""
        return set()

    # Preemption: with checks_preemption, the loop calls preemption_notice() on every rank at agreed steps (about
    # every nanochat.checkpoint_saver.PREEMPTION_CHECK_S seconds); a notice makes it save a just-in-time checkpoint,
    # wait until that checkpoint is complete and announced (on_checkpoint), then call hold_for_preemption().
    checks_preemption = False

    def preemption_notice(self) -> dict | None:
        """None, or {"deadline_s": seconds left or None, "ranks": ranks about to go} when nodes are being drained."""
        return None

    def hold_for_preemption(self, step: int, notice: dict) -> None:
        """After the just-in-time checkpoint of `step`: return to keep training, or wait to be torn down."""

    def relaunch_eval(self, kind: str, step: int, checkpoint_dir: str, device, params: dict) -> bool:
        """After a restart: launch again the asynchronous `kind` evaluation of `step` that the previous worker group
        never reported, from that step's checkpoint. True if launched (its result arrives via finished_evals).
        params: core {"max_per_task"}; chat {"cfg", "batch_size"}."""
        return False


# -----------------------------------------------------------------------------
# Data: the library's loaders, and a seeded synthetic stream whose batches do not depend on the world size


def synthetic_loader(B: int, T: int, vocab_size: int, seed: int, rank: int, world: int, device, state=None,
                     per_step: int | None = None):
    """Yields (inputs, targets, state). Row g of the global stream is random tokens from generator seed+g.

    An optimizer step holds per_step micro-batches of B rows (default: one per rank), dealt round-robin: micro-batch
    j of the step is rank j % W's micro-step j // W. So the rows of a step are the same for (W workers, A
    accumulation steps), (W*A workers, 1 step), and any uneven deal. state = {"row": the first row of the next
    step}; a loader resumed from it continues there (any world size).
    """
    if state is not None and "ranks" in state:
        state = state["ranks"][0]  # the position is global: every rank's entry holds the same row
    row0 = 0 if state is None else int(state["row"])
    per_step = world if per_step is None else per_step
    gen = torch.Generator()
    step = 0
    while True:
        step_row = row0 + step * per_step * B
        state = {"row": step_row + per_step * B, "epoch": 1, "pq_idx": 0, "rg_idx": 0}
        for j in range(rank, per_step, world):
            rows = []
            for i in range(B):
                gen.manual_seed(seed * 1_000_003 + step_row + j * B + i)
                rows.append(torch.randint(0, vocab_size, (T + 1,), generator=gen))
            batch = torch.stack(rows).to(device)
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), state
        step += 1


def _make_loaders(cfg, tokenizer, vocab_size, device, rank, world, resume_state, sink, per_step=None):
    """(train iterator of (x, y, state), function building a fresh val iterator of (x, y)). per_step: micro-batches
    of an optimizer step over all ranks (the synthetic stream's layout)."""
    B, T = cfg.device_batch_size, cfg.max_seq_len
    if cfg.data == "synthetic":
        train = synthetic_loader(B, T, vocab_size, cfg.seed, rank, world, device, resume_state, per_step)
        val = lambda: ((x, y) for x, y, _ in synthetic_loader(B, T, vocab_size, cfg.seed + 1, rank, world, device))
    else:
        from nanochat.dataloader import (
            tokenizing_distributed_data_loader_bos_bestfit,
            tokenizing_distributed_data_loader_with_state_bos_bestfit,
        )

        train = None
        if sink is not None:
            train = sink.train_loader(cfg, tokenizer, device, resume_state)
        if train is None:
            train = tokenizing_distributed_data_loader_with_state_bos_bestfit(
                tokenizer, B, T, split="train", device=device, resume_state_dict=resume_state
            )
        val = lambda: tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, split="val", device=device)
    return train, val


def _load_tokenizer(cfg, device):
    """(tokenizer or None, token_bytes, vocab_size). Synthetic data may run without a trained tokenizer."""
    if cfg.data == "synthetic" and cfg.vocab_size > 0:
        return None, torch.ones(cfg.vocab_size, dtype=torch.int32, device=device), cfg.vocab_size
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    tokenizer = get_tokenizer()
    return tokenizer, get_token_bytes(device=device), tokenizer.get_vocab_size()


# -----------------------------------------------------------------------------
# Checkpoints: nanochat's layout, plus world-size-aware resume


def checkpoint_dir_for(cfg: BaseTrainConfig) -> str:
    from nanochat import storage

    return storage.join(get_base_dir(), "base_checkpoints", cfg.tag)


def _saved_world_size(checkpoint_dir: str, step: int, meta: dict) -> int:
    """World size that wrote a checkpoint: meta's record (ours), else the number of optimizer shards (upstream)."""
    if meta.get("world_size"):
        return int(meta["world_size"])
    from nanochat import storage

    prefix = f"optim_{step:06d}_rank"
    return max(1, sum(1 for n in storage.listdir(checkpoint_dir) if n.startswith(prefix)))


def load_optimizer_for_world(optimizer, checkpoint_dir: str, step: int, meta: dict, device, rank: int, world: int):
    """Load this rank's optimizer state; re-shard it when the checkpoint was written by a different world size."""
    from nanochat import checkpoint_manager as cm
    from nanochat.optim import load_resharded_state_dict

    saved = _saved_world_size(checkpoint_dir, step, meta)
    if saved == world:
        optimizer.load_state_dict(cm._load_torch(cm.optim_path(checkpoint_dir, step, rank), device))
        return
    print0(f"Re-sharding optimizer state from {saved} to {world} ranks")
    shards = [cm._load_torch(cm.optim_path(checkpoint_dir, step, r), device) for r in range(saved)]
    load_resharded_state_dict(optimizer, shards)
