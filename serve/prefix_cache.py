"""
Prefix KV cache for serve.batching: the keys/values of prompt prefixes, in fixed-size token blocks, reused by later
requests that start with the same tokens (the next turn of a conversation, a shared system prompt).

    pc = PrefixCache(num_blocks=512, block_size=32, like=kv_cache)
    blocks = pc.lookup(prompt)             # the longest cached run of whole blocks from position 0
    pc.restore(blocks, cache, row)          # copy their k/v into rows 0..len(blocks)*32 of a cache row
    pc.insert(prompt[:n], cache, row)       # store the whole blocks of a prefilled prompt (n tokens in that row)

A block is identified by its tokens and by the block before it (a chain from position 0), so a hit is exact: the
same tokens at the same positions after the same prefix. Each stored block gets a fresh id; a child's key holds its
parent's id, so evicting a parent makes its descendants unreachable (they age out). Memory is bounded by num_blocks;
the least recently used block is evicted first, and a lookup refreshes a chain from its last block back to its
first, so leaves age out before the prefixes they hang from.

What is stored is exactly what a prefill wrote: k and v (the value embeddings are already mixed into v). The other
piece of per-row model state, the smear input (`prev_embedding`, the normalized embedding of the last token), is a
function of that one token, so the scheduler recomputes it on restore. Only blocks that a prefill computed are
stored (never tokens written by decode steps), which is what makes a reused prefix identical to a fresh prefill when
prefill chunks are cut at the same block boundaries (serve.batching, batch-invariant mode).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int, like):
        """like: a KVCache whose layers/heads/dtype/device the blocks share."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"prefix cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        L, _, _, H, D = like.k_cache.shape
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (L, num_blocks, block_size, H, D)
        self.k = torch.zeros(shape, dtype=like.k_cache.dtype, device=like.k_cache.device)
        self.v = torch.zeros_like(self.k)
        self._table: OrderedDict[tuple, int] = OrderedDict()  # (parent id, block tokens) -> slot; LRU first
        self._key_of: list[tuple | None] = [None] * num_blocks  # slot -> its key
        self._id_of = [0] * num_blocks  # slot -> id of the block stored there (0 = the root's id)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._next_id = 1
        self.evictions = 0

    def __len__(self):
        return len(self._table)

    def _blocks(self, tokens):
        bs = self.block_size
        return [tuple(tokens[i:i + bs]) for i in range(0, len(tokens) - bs + 1, bs)]

    def lookup(self, tokens: list[int]) -> list[int]:
        """Slots of the longest cached chain of whole blocks that tokens starts with (and refresh them)."""
        chain, parent = [], 0
        for block in self._blocks(tokens):
            slot = self._table.get((parent, block))
            if slot is None:
                break
            chain.append(slot)
            parent = self._id_of[slot]
        for slot in reversed(chain):  # the first block ends up most recent: leaves are evicted first
            self._table.move_to_end(self._key_of[slot])
        return chain

    def restore(self, chain: list[int], cache, row: int):
        """Write the chain's k/v into positions [0, len(chain) * block_size) of one cache row (lengths untouched)."""
        if not chain:
            return
        n = len(chain) * self.block_size
        idx = torch.tensor(chain, dtype=torch.long, device=self.k.device)
        L, H, D = self.k.size(0), self.k.size(3), self.k.size(4)
        cache.k_cache[:, row, :n] = self.k.index_select(1, idx).view(L, n, H, D)
        cache.v_cache[:, row, :n] = self.v.index_select(1, idx).view(L, n, H, D)

    def insert(self, tokens: list[int], cache, row: int) -> int:
        """Store the whole blocks of tokens (already in positions [0, len(tokens)) of the cache row) that are not
        cached yet. Returns how many blocks were added."""
        parent, added, chain = 0, 0, []
        for j, block in enumerate(self._blocks(tokens)):
            key = (parent, block)
            slot = self._table.get(key)
            if slot is None:
                slot = self._allocate(set(chain))
                if slot is None:  # everything left is this prompt's own chain: the cache is too small for it
                    break
                s = slice(j * self.block_size, (j + 1) * self.block_size)
                self.k[:, slot] = cache.k_cache[:, row, s]
                self.v[:, slot] = cache.v_cache[:, row, s]
                self._table[key] = slot
                self._key_of[slot], self._id_of[slot] = key, self._next_id
                self._next_id += 1
                added += 1
            chain.append(slot)
            parent = self._id_of[slot]
        for slot in reversed(chain):  # as in lookup: the chain's first block becomes the most recent
            self._table.move_to_end(self._key_of[slot])
        return added

    def _allocate(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key, slot in self._table.items():  # least recently used first
            if slot not in keep:
                del self._table[key]
                self._key_of[slot] = None
                self.evictions += 1
                return slot
        return None

    def clear(self):
        self._table.clear()
        self._key_of = [None] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))
