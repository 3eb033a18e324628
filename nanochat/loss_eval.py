"""
Bits per byte (bpb): the validation loss normalised by the UTF-8 bytes the target tokens stand for, so models
with different vocabularies are comparable.

    bpb = sum(nats over counted targets) / (ln 2 * sum(bytes of counted targets))

`token_bytes[v]` (from `nanochat.tokenizer.get_token_bytes`) is the byte length of token v, 0 for special
tokens; targets with 0 bytes (specials) and ignored targets (< 0, e.g. -1) count in neither sum. Sums are
all-reduced across ranks under torch.distributed. No counted bytes at all gives inf.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """bpb of `model` over the first `steps` (x, y) batches of the iterable `batches`."""
    device = model.get_device()
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        nats = model(x, y, loss_reduction="none").view(-1)  # (B*T,) per-target loss
        y = y.view(-1)
        valid = y.int() >= 0  # compare as int32: MPS has no int64 comparison kernel
        # never index token_bytes with a negative id: map ignored targets to id 0 and zero their bytes
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0).to(torch.int64)
        total_nats += (nats * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = total_nats.item(), total_bytes.item()
    return float("inf") if nbytes == 0 else nats / (math.log(2) * nbytes)
