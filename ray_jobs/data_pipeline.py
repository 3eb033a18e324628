"""
Pretraining input on Ray Data: parquet row groups -> tokenizer actor pool -> best-fit packing, one stream per rank.

INTERFACE (for the training loop; call it inside each Ray Train worker, or in any process attached to a cluster)

    from ray_jobs.data_pipeline import make_batch_iterator

    it = make_batch_iterator(tokenizer, B, T, split="train", device=device, resume_state=this_ranks_state,
                             num_tokenizer_actors=2, actor_num_cpus=1)
    inputs, targets, state = next(it)   # (B, T) int64 on device + a JSON-able dict to put in the checkpoint

It yields exactly what `nanochat.dataloader.tokenizing_distributed_data_loader_with_state_bos_bestfit` yields for
the same rank (same batches, same state dicts: a state from one can resume the other). Rank and world size come
from the environment Ray Train sets (RANK / WORLD_SIZE) unless passed. `resume_state` is this rank's last state, or
`{"ranks": [state_0, ..., state_{W-1}]}`; with the same world size the resumed stream continues with exactly the
batches the interrupted run would have produced (no document repeated or skipped); otherwise it falls back to
upstream's approximate resume (skip to the rank's next row group). Like the plain loader it never ends: after the
last row group it starts epoch + 1. For val batches use the plain loader (the val shard is small, and a fresh plain
loader yields identical batches every time without starting actors).

The driver needs no `datasets=` argument for TorchTrainer: each worker builds its own pipeline. Leave CPUs free
for the actors: every worker starts `num_tokenizer_actors` actors of `actor_num_cpus` CPUs each, outside the Train
workers' reservation; if the cluster has none free, Ray Data waits forever ("Cluster resources are not enough"),
see RAY_NOTES §3.1. E.g. 8 GPU workers x {"GPU": 1, "CPU": 8} on a 128-CPU node leaves 64 CPUs = 8 actors per
worker; in CPU tests `ray.init(num_cpus=4)` with 2 workers x 1 CPU and 1 actor each.

DESIGN (why not `read_parquet` in the driver + `streaming_split`)
  - Which documents a rank sees must not depend on timing. Each rank reads row groups rank, rank+W, ... of every
    file (upstream's DDP sharding), so ranks are disjoint by construction and the stream is reproducible.
    `streaming_split` hands blocks to whichever consumer has the fewest rows, so a resumed run would reshuffle
    which rank gets which documents.
  - Resume must survive Ray Train's in-run retries (FailureConfig): the controller restarts workers but reuses
    datasets built in the driver, and Ray 2.60 does not checkpoint iterator positions. A pipeline built in the
    worker starts from the state in the checkpoint the worker just loaded.
  - Stages: `from_items(row groups of this rank, one pass)` -> `map_batches(RowGroupTokenizer,
    ActorPoolStrategy(size=num_tokenizer_actors))`: each actor reads one row group with pyarrow (local path or
    s3://) and batch-encodes it in chunks of `tokenizer_batch_size` with BOS prepended, emitting compact int32 token
    lists plus where each document came from. `preserve_order=True` keeps row-group order, so packing in the worker
    (`nanochat.dataloader.pack_batches`, upstream's best-fit with cropping, cheap next to tokenizing) sees the
    same document sequence as the plain loader. Reading + tokenizing, the expensive part, runs in parallel in the
    actors and is prefetched while the model trains.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data

from nanochat.common import get_dist_info
from nanochat.dataloader import (
    count_row_groups,
    is_exact_state,
    pack_batches,
    restore_buffer,
    resume_state_for_rank,
    row_group_plan,
    split_paths,
    start_position,
)
from nanochat.dataset import open_parquet, read_texts

# -----------------------------------------------------------------------------
# The actor: one row group in, its tokenized documents out


class RowGroupTokenizer:
    """Ray Data actor UDF: {path, pq_idx, rg_idx, doc_start, epoch} rows -> one row per document.

    Output columns: tokens (list<int32>, BOS first), pq_idx, rg_idx, doc_idx, epoch, chunk_end (index after the
    last document of the tokenizer chunk the document belongs to; chunks are what the packer refills with).
    """

    def __init__(self, tokenizer, tokenizer_batch_size: int = 128, threads: int = 1):
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size = tokenizer_batch_size
        self.threads = threads
        self._open = (None, None)  # (path, ParquetFile): consecutive row groups usually share a file

    def _parquet(self, path):
        if self._open[0] != path:
            self._open = (path, open_parquet(path))
        return self._open[1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        lists, cols = [], {k: [] for k in ("pq_idx", "rg_idx", "doc_idx", "epoch", "chunk_end")}
        for item in batch.to_pylist():
            texts = read_texts(self._parquet(item["path"]), item["rg_idx"], item["path"])
            for start in range(item["doc_start"], len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                lists += self.tokenizer.encode(chunk, prepend=self.bos, num_threads=self.threads)
                end = start + len(chunk)
                cols["pq_idx"] += [item["pq_idx"]] * len(chunk)
                cols["rg_idx"] += [item["rg_idx"]] * len(chunk)
                cols["doc_idx"] += range(start, end)
                cols["epoch"] += [item["epoch"]] * len(chunk)
                cols["chunk_end"] += [end] * len(chunk)
        lengths = np.fromiter((len(t) for t in lists), dtype=np.int32, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((i for t in lists for i in t), dtype=np.int32, count=int(offsets[-1]))
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        return pa.table({"tokens": tokens, **{k: pa.array(v, type=pa.int64()) for k, v in cols.items()}})


# -----------------------------------------------------------------------------
# Building one pass (epoch) of a rank's pipeline


def build_dataset(
    items: list[dict],
    tokenizer,
    num_tokenizer_actors: int = 1,
    actor_num_cpus: float = 1.0,
    tokenizer_batch_size: int = 128,
) -> ray.data.Dataset:
    """The Ray Dataset of tokenized documents for a list of row-group items (see row_group_items)."""
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one block per row group
    ds.context.execution_options.preserve_order = True  # packing must see the plain loader's document order
    ds.context.enable_progress_bars = False  # one pipeline per worker: keep the logs readable
    return ds.map_batches(
        RowGroupTokenizer,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "tokenizer_batch_size": tokenizer_batch_size,
            "threads": max(1, int(actor_num_cpus)),
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_tokenizer_actors),
        num_cpus=actor_num_cpus,
    )


def row_group_items(paths: list[str], plan: Iterator) -> Iterator[list[dict]]:
    """Group the infinite row-group plan into passes: a list of item dicts per epoch."""
    pending = next(plan)
    while True:
        epoch, items = pending[3], []
        while pending[3] == epoch:
            pq_idx, rg_idx, doc_start, ep = pending
            items.append(
                {"path": paths[pq_idx], "pq_idx": pq_idx, "rg_idx": rg_idx, "doc_start": doc_start, "epoch": ep}
            )
            pending = next(plan)
        yield items


def _chunks_from_blocks(blocks: Iterator[pa.Table]):
    """Regroup a stream of tokenized-document tables into the plain loader's chunks:
    (token arrays, refs, (pq_idx, rg_idx, chunk_end, epoch))."""
    docs, refs, key = [], [], None
    for table in blocks:
        if table.num_rows == 0:
            continue
        col = table.column("tokens").combine_chunks()
        values = col.flatten().to_numpy()
        bounds = np.cumsum(col.value_lengths().to_numpy())
        pieces = np.split(values, bounds[:-1])
        meta = {k: table.column(k).to_numpy() for k in ("pq_idx", "rg_idx", "doc_idx", "epoch", "chunk_end")}
        for i, tokens in enumerate(pieces):
            k = (int(meta["pq_idx"][i]), int(meta["rg_idx"][i]), int(meta["chunk_end"][i]), int(meta["epoch"][i]))
            if key is not None and k != key:
                yield docs, refs, key
                docs, refs = [], []
            key = k
            docs.append(tokens)
            refs.append((k[0], k[1], int(meta["doc_idx"][i])))
    if docs:
        yield docs, refs, key


def _ray_chunks(paths, plan, tokenizer, num_tokenizer_actors, actor_num_cpus, tokenizer_batch_size, prefetch_batches):
    for items in row_group_items(paths, plan):
        ds = build_dataset(items, tokenizer, num_tokenizer_actors, actor_num_cpus, tokenizer_batch_size)
        blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
        yield from _chunks_from_blocks(blocks)


# -----------------------------------------------------------------------------
# The interface


def make_batch_iterator(
    tokenizer,
    B: int,
    T: int,
    split: str = "train",
    device="cpu",
    resume_state: dict | None = None,
    *,
    num_tokenizer_actors: int = 1,
    actor_num_cpus: float = 1.0,
    tokenizer_batch_size: int = 128,
    buffer_size: int = 1000,
    prefetch_batches: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
    data_dir: str | None = None,
) -> Iterator[tuple]:
    """Infinite iterator of (inputs, targets, state) for this rank, fed by a Ray Data tokenizer actor pool.

    See the module docstring. Requires ray.init() (Ray Train workers are already connected).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if num_tokenizer_actors < 1:
        raise ValueError(f"num_tokenizer_actors must be >= 1, got {num_tokenizer_actors}")
    if rank is None or world_size is None:
        _, env_rank, _, env_world = get_dist_info()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    paths = split_paths(split, data_dir, warn_on_legacy=(rank == 0 and split == "train"))
    state = resume_state_for_rank(resume_state, rank, world_size)
    plan = row_group_plan(count_row_groups(paths), rank, world_size, state)
    restored = restore_buffer(state, paths, tokenizer) if is_exact_state(state, rank, world_size) else []
    chunks = _ray_chunks(
        paths, plan, tokenizer, num_tokenizer_actors, actor_num_cpus, tokenizer_batch_size, prefetch_batches
    )
    yield from pack_batches(
        chunks, B, T, device, buffer_size, restored, start_position(state, rank, world_size), rank, world_size
    )
