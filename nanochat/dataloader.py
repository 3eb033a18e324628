"""
Pretraining data loader: parquet shards -> tokenized documents -> BOS-aligned best-fit packed (B, T) batches.

Semantics are upstream nanochat's (spec §7.2), so losses stay comparable with its leaderboard:
  - every document is tokenized with BOS prepended; every row of T+1 tokens starts at a document start;
  - a row is filled by repeatedly taking the LARGEST buffered document that fits entirely; when none fits, the
    SHORTEST buffered document is cropped to fill the row exactly (no padding, ~35% of tokens cropped at T=2048);
  - the buffer is topped up to >= buffer_size documents before each pick, in chunks of tokenizer_batch_size
    documents of one row group;
  - DDP shards by row group: rank r reads row groups r, r+W, r+2W, ... of every train file; val = the last file;
  - it never ends: after the last file it starts again with epoch + 1.

Resume. Each batch comes with a state dict. Its keys pq_idx / rg_idx / epoch mean what they mean upstream (the row
group of the most recent read). It also records where reading stopped inside that row group (doc_idx) and which
documents were still buffered (buffer), so a loader started from it yields exactly the batches the uninterrupted
run would have (exact resume). A state with only the three upstream keys, or one saved by a different rank or world
size, gets upstream's approximate resume: skip to the next row group of this rank. For exact resume under DDP,
save every rank's state (e.g. `{"ranks": [state_0, state_1, ...]}` from all_gather_object) and pass that dict
back: each rank picks its own entry.

The packing loop here is shared with the Ray Data pipeline (ray_jobs/data_pipeline.py), which only replaces where
tokenized chunks come from; both produce identical batches for the same rank.
"""

import bisect
import math

import numpy as np
import torch

from nanochat.common import NanochatError, get_dist_info
from nanochat.dataset import open_parquet, read_texts, require_parquet_files
from nanochat.staging import HostStaging

# -----------------------------------------------------------------------------
# Best-fit packing


class BestFitPacker:
    """A buffer of tokenized documents with upstream's best-fit row filling.

    Upstream scans the whole buffer for every pick; here the buffer is kept sorted by (length, arrival) so a pick
    is two bisects. Ties break exactly as upstream's scan does: among equally long documents the earliest
    buffered one wins, both for the best fit and for the shortest-to-crop.
    """

    def __init__(self, buffer_size=1000):
        self.buffer_size = buffer_size
        self._keys = []  # sorted [(length, seq)]
        self._docs = {}  # seq -> (tokens, ref)
        self._seq = 0

    def __len__(self):
        return len(self._keys)

    def add(self, tokens, ref=None):
        if len(tokens) == 0:
            return  # cannot happen with BOS prepended; an empty doc would never be picked upstream either
        bisect.insort(self._keys, (len(tokens), self._seq))
        self._docs[self._seq] = (tokens, ref)
        self._seq += 1

    def buffered_refs(self):
        """Refs of the buffered documents in arrival order (what a resumed loader must re-buffer)."""
        return [ref for _, ref in self._docs.values()]  # dicts keep insertion (= arrival) order

    def _pop(self, index):
        _, seq = self._keys.pop(index)
        return self._docs.pop(seq)[0]

    def fill_row(self, row, refill):
        """Fill the 1-D int64 array row completely. refill() must add at least one document when called."""
        capacity, pos = len(row), 0
        while pos < capacity:
            while len(self._keys) < self.buffer_size:
                refill()
            remaining = capacity - pos
            i = bisect.bisect_right(self._keys, (remaining, math.inf)) - 1
            if i >= 0:
                # largest length <= remaining; move to the first (earliest) document of that length
                i = bisect.bisect_left(self._keys, (self._keys[i][0], -1))
                doc = self._pop(i)
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
            else:
                doc = self._pop(0)  # nothing fits: crop the shortest (earliest among equals)
                row[pos:] = doc[:remaining]
                pos = capacity


# -----------------------------------------------------------------------------
# Which row groups a rank reads, in order


def resume_state_for_rank(resume_state, rank, world_size):
    """This rank's state from a single state or a {"ranks": [...]} dict (None if there is nothing to resume)."""
    if resume_state is None:
        return None
    if "ranks" in resume_state:
        states = resume_state["ranks"]
        if len(states) == world_size:
            return states[rank]
        return states[0]  # world size changed: rank 0's position, approximate resume for everyone
    return resume_state


def is_exact_state(state, rank, world_size):
    return (state is not None and "doc_idx" in state and "buffer" in state
            and state.get("rank") == rank and state.get("world_size") == world_size)


def row_group_plan(num_row_groups, rank, world_size, state=None):
    """Infinite iterator of (pq_idx, rg_idx, doc_start, epoch): the row groups this rank reads, in order.

    num_row_groups: row-group count of each file of the split. state: this rank's resume state (or None).
    """
    if not any(rank < n for n in num_row_groups):
        raise NanochatError(
            f"rank {rank} of {world_size} gets no data: the split has only {sum(num_row_groups)} row groups and no "
            f"file has more than {max(num_row_groups, default=0)}. Use fewer workers or more shards "
            "(python -m nanochat.dataset -n N)."
        )
    pq_idx, epoch, first = 0, 1, None
    if state is not None:
        pq_idx, epoch = state["pq_idx"], state.get("epoch", 1)
        if is_exact_state(state, rank, world_size):
            first = (state["rg_idx"], state["doc_idx"])
        else:
            # upstream's approximate resume: skip ahead to this rank's row group after the recorded one
            first = ((state["rg_idx"] // world_size + 1) * world_size + rank, 0)
    while True:
        while pq_idx < len(num_row_groups):
            rg_idx, doc_start = first if first is not None else (rank, 0)
            first = None
            while rg_idx < num_row_groups[pq_idx]:
                yield pq_idx, rg_idx, doc_start, epoch
                rg_idx, doc_start = rg_idx + world_size, 0
            pq_idx += 1
        pq_idx, epoch = 0, epoch + 1


def split_paths(split, data_dir=None, warn_on_legacy=False):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = require_parquet_files(data_dir, warn_on_legacy=warn_on_legacy)
    return paths[:-1] if split == "train" else paths[-1:]


def count_row_groups(paths):
    return [open_parquet(p).num_row_groups for p in paths]


# -----------------------------------------------------------------------------
# Tokenized chunks (the unit of buffer refills) and the packing loop shared with the Ray pipeline


def _encode(tokenizer, texts, threads):
    return tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=threads)


def _local_chunks(paths, plan, tokenizer, tokenizer_batch_size, tokenizer_threads):
    """Yield (token_lists, refs, position) per chunk of <= tokenizer_batch_size docs of one row group.

    refs[i] = (pq_idx, rg_idx, doc_idx) of each document; position = (pq_idx, rg_idx, next doc_idx, epoch).
    """
    open_pq, pf = None, None
    for pq_idx, rg_idx, doc_start, epoch in plan:
        if pq_idx != open_pq:
            pf, open_pq = open_parquet(paths[pq_idx]), pq_idx
        texts = read_texts(pf, rg_idx, paths[pq_idx])
        for i in range(doc_start, len(texts), tokenizer_batch_size):
            chunk = texts[i:i + tokenizer_batch_size]
            refs = [(pq_idx, rg_idx, i + j) for j in range(len(chunk))]
            yield _encode(tokenizer, chunk, tokenizer_threads), refs, (pq_idx, rg_idx, i + len(chunk), epoch)


def _compact_refs(refs):
    """[(pq, rg, doc), ...] -> [[pq, rg, [doc, ...]], ...] (runs of one row group), JSON-friendly and short."""
    out, last = [], None
    for pq_idx, rg_idx, doc in refs:
        if (pq_idx, rg_idx) != last:
            last = (pq_idx, rg_idx)
            docs = []
            out.append([pq_idx, rg_idx, docs])
        docs.append(doc)
    return out


def restore_buffer(state, paths, tokenizer, tokenizer_threads=4):
    """Re-read and re-tokenize the documents a state says were buffered: [(tokens, ref)] in arrival order."""
    out = []
    open_pq, pf = None, None
    for pq_idx, rg_idx, docs in state.get("buffer", []):
        if pq_idx != open_pq:
            pf, open_pq = open_parquet(paths[pq_idx]), pq_idx
        texts = read_texts(pf, rg_idx, paths[pq_idx])
        tokens = _encode(tokenizer, [texts[d] for d in docs], tokenizer_threads)
        out += [(t, (pq_idx, rg_idx, d)) for t, d in zip(tokens, docs)]
    return out


def pack_batches(chunks, B, T, device="cpu", buffer_size=1000, restored=(), position=(0, 0, 0, 1), rank=0,
                 world_size=1, staging=None):
    """Best-fit pack an iterator of (token_lists, refs, position) chunks into (inputs, targets, state) batches.

    inputs/targets: (B, T) int64 on device, this batch's own tensors (a later batch never overwrites them). On CUDA
    the host-to-device copy is asynchronous from pinned memory, through nanochat.staging.HostStaging (a ring of
    pinned buffers, each refilled only after its previous copy completed). staging: a HostStaging for (2, B, T)
    int64 batches to use instead (tests inject a lagging device this way).
    """
    packer = BestFitPacker(buffer_size)
    for tokens, ref in restored:
        packer.add(tokens, ref)
    pos = list(position)  # (pq_idx, rg_idx, next doc_idx, epoch) of the most recent refill

    def refill():
        token_lists, refs, new_pos = next(chunks)
        for tokens, ref in zip(token_lists, refs):
            packer.add(tokens, ref)
        pos[:] = new_pos

    staging = staging or HostStaging([((2, B, T), torch.long)], device)
    rows = np.empty((B, T + 1), dtype=np.int64)
    rows_t = torch.from_numpy(rows)

    def fill(both):  # (2, B, T) = [inputs, targets]: one copy per batch
        both[0].copy_(rows_t[:, :-1])
        both[1].copy_(rows_t[:, 1:])

    while True:
        for r in range(B):
            packer.fill_row(rows[r], refill)
        state = {"pq_idx": pos[0], "rg_idx": pos[1], "epoch": pos[3], "doc_idx": pos[2], "rank": rank,
                 "world_size": world_size, "buffer": _compact_refs(packer.buffered_refs())}
        (both,) = staging.put(fill)
        yield both[0], both[1], state


def start_position(state, rank, world_size):
    """The position a packer starts from (what its first state reports if no refill happens before it)."""
    if is_exact_state(state, rank, world_size):
        return (state["pq_idx"], state["rg_idx"], state["doc_idx"], state.get("epoch", 1))
    return (0, 0, 0, 1)


# -----------------------------------------------------------------------------
# Public loaders (upstream's names and arguments)


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cuda", resume_state_dict=None,
    buffer_size=1000, data_dir=None,
):
    """Infinite iterator of (inputs, targets, state_dict) for this process's DDP rank. See the module docstring."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _, rank, _, world_size = get_dist_info()
    paths = split_paths(split, data_dir, warn_on_legacy=(rank == 0 and split == "train"))
    state = resume_state_for_rank(resume_state_dict, rank, world_size)
    plan = row_group_plan(count_row_groups(paths), rank, world_size, state)
    restored = restore_buffer(state, paths, tokenizer, tokenizer_threads) if is_exact_state(
        state, rank, world_size) else []
    chunks = _local_chunks(paths, plan, tokenizer, tokenizer_batch_size, tokenizer_threads)
    yield from pack_batches(chunks, B, T, device, buffer_size, restored, start_position(state, rank, world_size),
                            rank, world_size)


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same batches without the state dict (val-bpb, base_eval). A fresh loader repeats the same val batches."""
    for inputs, targets, _state in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
