"""
MuonAdamW across ranks: the collectives, the sharding layout of the optimizer state, and re-sharding a
checkpoint to another number of ranks. nanochat/optim.py holds the optimizer and its update math.

Run its tests: python -m pytest tests/test_optim.py -q

Distribution (world > 1), three phases so communication overlaps compute:
  1. launch every reduction: AdamW params with < 1024 elements all_reduce(AVG) their grad (state replicated);
     larger AdamW params reduce_scatter(AVG) along dim 0 (each rank owns ceil(rows/W) rows); each Muon group stacks
     its K grads, zero-pads to ceil(K/W)*W and reduce_scatters, so each rank owns ceil(K/W) matrices.
  2. per group: wait, update the owned slice, launch the all_gather of the updated slice.
  3. wait for the gathers and copy the gathered values back into the parameters.
  NCCL (and gloo builds that support them) use reduce_scatter / all_gather natively. A gloo build without
  reduce_scatter or ReduceOp.AVG falls back to all_reduce(SUM) / W followed by slicing, and to a list all_gather;
  the choice is probed once per optimizer (NANOCHAT_OPTIM_COMM=native|fallback forces one). Upstream asserts that
  shape[0] % W == 0 for large AdamW params; here other sizes work too (rows are zero-padded to ceil(rows/W)*W,
  which leaves the divisible case, and therefore the file format, exactly as upstream).

Checkpoint format and re-sharding
---------------------------------
state_dict()/load_state_dict() are torch.optim.Optimizer's, so a rank's file (optim_{step:06d}_rank{r}.pt) has
upstream's layout and interchanges with upstream at the same world size W:
    state[i] for AdamW param i: {"step": int, "exp_avg", "exp_avg_sq"} -- the full tensor if W == 1 or
        numel < 1024, else rows [r*c, (r+1)*c) with c = ceil(rows/W) (zero rows past the end).
    state[j] for the FIRST param j of each Muon group (the group's state lives there):
        {"momentum_buffer": (c, m, n), "second_momentum_buffer": (c, m, 1) if m >= n else (c, 1, n)},
        c = ceil(K/W); rank r holds matrices [r*c, r*c + c) of the group, zero-padded.
    param_groups: the groups' hyperparameters (kind, lr, initial_lr, ...), identical on every rank.
The "full" state is simply the W == 1 layout. To resume with a different number of ranks, load ALL old rank files
(their count is the old W) and call
    full = gather_full_optimizer_state(rank_state_dicts, optimizer)      # W_old rank dicts -> W == 1 layout
    optimizer.load_state_dict(shard_optimizer_state(full, optimizer, rank, world_size))
or the shortcut load_resharded_state_dict(optimizer, rank_state_dicts). Loading a rank file whose shapes do not fit
the current world size raises NanochatError instead of silently mixing shards.
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import NanochatError

# AdamW params with fewer elements are all-reduced and updated whole on every rank (not worth sharding).
SMALL_PARAM_NUMEL = 1024


# -----------------------------------------------------------------------------
# Collectives: native reduce_scatter/all_gather, or an all_reduce-based fallback for limited gloo builds


def _native_fns():
    # torch >= 2.12 renamed the single-tensor collectives; the old names still work but warn.
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return reduce_scatter, all_gather


class Pending:
    """An in-flight collective plus the local work to run once it completes."""

    def __init__(self, work, finish=None):
        self.work, self.finish = work, finish

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        if self.finish is not None:
            self.finish()


class Comm:
    """Averaging collectives over the default process group, in native or fallback mode."""

    def __init__(self, rank: int, world: int, native: bool):
        self.rank, self.world, self.native = rank, world, native

    def all_reduce_avg(self, t: Tensor) -> Pending:
        if self.native:
            return Pending(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True))
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
        return Pending(work, lambda: t.div_(self.world))

    def reduce_scatter_avg(self, out: Tensor, inp: Tensor) -> Pending:
        """out (c, ...) = average over ranks of inp[rank*c:(rank+1)*c]; inp has W*c rows."""
        if self.native:
            reduce_scatter, _ = _native_fns()
            return Pending(reduce_scatter(out, inp, op=dist.ReduceOp.AVG, async_op=True))
        total = inp.clone()  # all_reduce works in place; never clobber the caller's grad
        work = dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True)
        rows = out.size(0)

        def finish():
            out.copy_(total[self.rank * rows:(self.rank + 1) * rows]).div_(self.world)

        return Pending(work, finish)

    def all_gather(self, out: Tensor, inp: Tensor) -> Pending:
        """out (W*c, ...) = concatenation of every rank's inp (c, ...)."""
        if self.native:
            _, all_gather = _native_fns()
            return Pending(all_gather(out, inp, async_op=True))
        # inp may be a view into out (in-place gather), so send a private copy.
        chunks = list(out.chunk(self.world))
        return Pending(dist.all_gather(chunks, inp.clone(), async_op=True))


def probe_native(rank: int, world: int) -> bool:
    """Whether this backend supports reduce_scatter(AVG) and single-tensor all_gather (probed collectively)."""
    forced = os.environ.get("NANOCHAT_OPTIM_COMM")
    if forced in ("native", "fallback"):
        return forced == "native"
    if forced:
        raise NanochatError(f"NANOCHAT_OPTIM_COMM={forced!r}: use 'native' or 'fallback' (or unset it)")
    if "nccl" in str(dist.get_backend()):  # also "cpu:gloo,cuda:nccl" groups
        return True
    reduce_scatter, all_gather = _native_fns()
    try:
        # Every rank runs the same build, so either all ranks raise here (before any traffic) or none does.
        out = torch.empty(1)
        reduce_scatter(out, torch.ones(world), op=dist.ReduceOp.AVG)
        all_gather(torch.empty(world), out)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chain(*fns):
    fns = [f for f in fns if f is not None]

    def run():
        for f in fns:
            f()

    return run


# -----------------------------------------------------------------------------
# Sharding layout (shared by step(), the state-shape check and the re-sharding functions)


def adamw_rows_per_rank(p: Tensor, world: int) -> int | None:
    """Rows of p each rank owns, or None when p is updated whole on every rank."""
    if world == 1 or p.numel() < SMALL_PARAM_NUMEL:
        return None
    return -(-p.shape[0] // world)


def muon_chunk(num_params: int, world: int) -> int:
    return -(-num_params // world)


def muon_second_shape(chunk: int, shape: torch.Size) -> tuple[int, int, int]:
    # Factored second moment: one value per row for tall/square matrices, one per column for wide ones.
    return (chunk, shape[-2], 1) if shape[-2] >= shape[-1] else (chunk, 1, shape[-1])


def _iter_layout(param_groups: list[dict], world: int):
    """Yield (state_index, kind, group, param, shard) in state_dict() index order.

    shard = rows per rank (AdamW, None = whole), or matrices per rank (Muon, reported on the group's first param;
    the other params of a Muon group are yielded with shard None and carry no state).
    """
    index = 0
    for group in param_groups:
        kind = group["kind"]
        for i, p in enumerate(group["params"]):
            if kind == "adamw":
                yield index, kind, group, p, adamw_rows_per_rank(p, world)
            else:
                yield index, kind, group, p, (muon_chunk(len(group["params"]), world) if i == 0 else None)
            index += 1


def _expected_state_shapes(param_groups: list[dict], world: int) -> dict[int, dict[str, tuple]]:
    shapes = {}
    for index, kind, _group, p, shard in _iter_layout(param_groups, world):
        if kind == "adamw":
            s = tuple(p.shape) if shard is None else (shard, *p.shape[1:])
            shapes[index] = {"exp_avg": s, "exp_avg_sq": s}
        elif shard is not None:
            shapes[index] = {"momentum_buffer": (shard, *p.shape),
                             "second_momentum_buffer": muon_second_shape(shard, p.shape)}
    return shapes


# -----------------------------------------------------------------------------
# Re-sharding: per-rank state dicts <-> the world-size-1 ("full") layout


def check_state_dict_world(state_dict: dict, optimizer: torch.optim.Optimizer, world: int) -> None:
    """Raise NanochatError if state_dict's shard shapes were saved at a world size other than `world`."""
    expected = _expected_state_shapes(optimizer.param_groups, world)
    for index, tensors in state_dict.get("state", {}).items():
        for key, want in expected.get(index, {}).items():
            if key in tensors and tuple(tensors[key].shape) != want:
                raise NanochatError(
                    f"optimizer state does not fit {world} rank(s): state[{index}][{key!r}] has shape "
                    f"{tuple(tensors[key].shape)}, expected {want}. The checkpoint was written by a different number "
                    "of ranks: load every optim_*_rank*.pt file and use nanochat.optim.load_resharded_state_dict(), "
                    "or resume with the original number of workers.")


def _concat_rows(parts: list[Tensor], total: int) -> Tensor:
    device = parts[0].device
    return torch.cat([t.to(device) for t in parts], dim=0)[:total].clone()


def _take_rows(full: Tensor, rank: int, per_rank: int) -> Tensor:
    """Rows [rank*per_rank, (rank+1)*per_rank) of full, zero-padded past its end."""
    out = full.new_zeros((per_rank, *full.shape[1:]))
    lo, hi = rank * per_rank, min((rank + 1) * per_rank, full.shape[0])
    if hi > lo:
        out[:hi - lo].copy_(full[lo:hi])
    return out


def gather_full_optimizer_state(rank_state_dicts: list[dict], optimizer: torch.optim.Optimizer) -> dict:
    """Merge the state dicts of all W old ranks (in rank order) into the world-size-1 layout.

    `optimizer` supplies the parameter shapes and group structure (same model and group layout as when saved).
    """
    world = len(rank_state_dicts)
    if world == 0:
        raise ValueError("gather_full_optimizer_state: need at least one rank state dict")
    for sd in rank_state_dicts:
        check_state_dict_world(sd, optimizer, world)  # also catches a missing or extra rank file
    states = [sd["state"] for sd in rank_state_dicts]
    full_state = {}
    for index, kind, group, p, shard in _iter_layout(optimizer.param_groups, world):
        if index not in states[0]:
            continue
        if kind == "adamw":
            src = states[0][index]
            entry = {"step": src["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = src[key].clone() if shard is None else _concat_rows([s[index][key] for s in states],
                                                                                    p.shape[0])
            full_state[index] = entry
        elif shard is not None:
            k = len(group["params"])
            full_state[index] = {key: _concat_rows([s[index][key] for s in states], k)
                                 for key in ("momentum_buffer", "second_momentum_buffer")}
    return {"state": full_state, "param_groups": [dict(g) for g in rank_state_dicts[0]["param_groups"]]}


def shard_optimizer_state(full_state_dict: dict, optimizer: torch.optim.Optimizer, rank: int, world: int) -> dict:
    """Cut a world-size-1 state dict into the state dict that rank `rank` of `world` ranks would hold."""
    if not 0 <= rank < world:
        raise ValueError(f"shard_optimizer_state: rank {rank} is outside 0..{world - 1}")
    check_state_dict_world(full_state_dict, optimizer, 1)
    full = full_state_dict["state"]
    out = {}
    for index, kind, _group, _p, shard in _iter_layout(optimizer.param_groups, world):
        if index not in full:
            continue
        if kind == "adamw":
            src = full[index]
            entry = {"step": src["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = src[key].clone() if shard is None else _take_rows(src[key], rank, shard)
            out[index] = entry
        elif shard is not None:
            out[index] = {key: _take_rows(full[index][key], rank, shard)
                          for key in ("momentum_buffer", "second_momentum_buffer")}
    return {"state": out, "param_groups": [dict(g) for g in full_state_dict["param_groups"]]}


def load_resharded_state_dict(optimizer: torch.optim.Optimizer, rank_state_dicts: list[dict]) -> None:
    """Load the state saved by len(rank_state_dicts) ranks into this rank of the current world (any size)."""
    rank, world = dist_rank_world()
    full = gather_full_optimizer_state(rank_state_dicts, optimizer)
    optimizer.load_state_dict(shard_optimizer_state(full, optimizer, rank, world))
