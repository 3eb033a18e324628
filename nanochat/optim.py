"""
MuonAdamW: one optimizer for one process or many ranks. AdamW for embeddings, lm_head and scalars; Muon for the
transformer matrices. When a torch.distributed process group with more than one rank is initialized, gradient
synchronization happens here (no DDP wrapper) and optimizer state is sharded across ranks (ZeRO-2 style).

Run its tests: python -m pytest tests/test_optim.py -q

Parameter groups (built by GPT.setup_optimizer; the caller also sets group["initial_lr"] = group["lr"]):
    dict(kind="adamw", params=[...], lr, betas=(b1, b2), eps, weight_decay)
    dict(kind="muon",  params=[...same shape, 2-D...], lr, momentum, ns_steps, beta2, weight_decay)

Update math (spec §6):
- AdamW: fp32 math copied back into the parameter's dtype; decoupled weight decay first (p *= 1 - lr*wd), then
  lerp moments and a bias-corrected step. Hyperparameters travel as 0-D fp32 CPU tensors so a compiled kernel is not
  recompiled whenever the schedule changes a value (the same tensors are used in eager mode, so the float rounding
  of both modes is the same).
- Muon on a (K, m, n) stack of same-shape matrices: Nesterov momentum -> optional bf16 cast (COMPUTE_DTYPE) ->
  MuonEq row equilibration -> Polar Express (5 fixed polynomials) -> Muon+ Frobenius rescale to sqrt(min(m, n)) ->
  NorMuon factored second moment -> cautious weight decay; the LR is multiplied by sqrt(max(1, m/n)).

torch.compile: off by default on CPU (it would run a C++ compiler for tens of seconds), on by default when the
parameters live on CUDA. Override with MuonAdamW(groups, compile=True/False) or NANOCHAT_OPTIM_COMPILE=0/1.
adamw_step_fused / muon_step_fused are the reference formulas (what gets compiled). Eager CPU steps run their
in-place twins instead, which give the same bits: adamw_step_chunked (cache-sized chunks, temporaries in one reused
scratch buffer; on 32768-row embedding tables about 6x faster than the allocating version) and muon_step_inplace
(overwrites temporaries it owns, preallocated polar-iteration buffers; also used for eager CUDA). Eager CUDA AdamW
runs the reference formula (the caching allocator makes its temporaries cheap there).

Distribution across ranks (sharded state, overlapped collectives) and checkpoint re-sharding live in
nanochat/optim_dist.py; this module re-exports its public functions.
"""

import math
import os

import torch
from torch import Tensor

from nanochat.common import COMPUTE_DTYPE, NanochatError

# The checkpoint functions are re-exported: callers import them from nanochat.optim.
from nanochat.optim_dist import (  # noqa: F401
    Comm,
    Pending,
    adamw_rows_per_rank,
    chain,
    check_state_dict_world,
    dist_rank_world,
    gather_full_optimizer_state,
    load_resharded_state_dict,
    muon_chunk,
    muon_second_shape,
    probe_native,
    shard_optimizer_state,
)

# Polar Express coefficients (Amsel et al. 2025, arXiv:2505.16932) for 5 iterations, safety 2e-2, cushion 2.
# Each tuple (a, b, c) defines one odd polynomial X -> a X + b (X X^T) X + c (X X^T)^2 X.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


# -----------------------------------------------------------------------------
# Kernels (plain functions; MuonAdamW optionally runs torch.compile'd copies of them)


def adamw_step_fused(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
                     beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW step on p in place. All hyperparameters are 0-D fp32 CPU tensors; step_t is the 1-based count."""
    # Work in fp32 whatever the storage dtype (bf16 embeddings): 1 - beta2 is not representable in bf16.
    p32, m32, v32, g32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr_t * wd_t)  # decoupled weight decay, before the update
    m32.lerp_(g32, 1 - beta1_t)
    v32.lerp_(g32.square(), 1 - beta2_t)
    bias_correction1 = 1 - beta1_t**step_t
    bias_correction2 = 1 - beta2_t**step_t
    denom = (v32 / bias_correction2).sqrt() + eps_t
    p32.add_(m32 / denom, alpha=-(lr_t / bias_correction1))
    # No-ops when everything is already fp32 (.float() returned the same tensors).
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


# torch's CPU sqrt is several times slower on exact zeros and ~30x slower on subnormal inputs (a special-value path in
# the vectorized math library), and AdamW's second moment is exactly 0 on embedding rows of tokens not seen yet (and
# decays into subnormals on rare ones). Raising sqrt's input to the smallest normal float moves sqrt(.) by at most
# sqrt(tiny) ~ 1.1e-19, which then vanishes in "+ eps" whenever eps + 1.1e-19 rounds to eps (eps >~ 4e-12).
_SQRT_FLOOR = torch.tensor(torch.finfo(torch.float32).tiny)
_SQRT_OF_FLOOR = _SQRT_FLOOR.sqrt()

# Elements per chunk of the eager CPU AdamW update (per torch thread): one chunk's five fp32 streams (param, grad,
# both moments, scratch) fit in a core's L2 cache, so the nine elementwise passes below cost about one trip to memory.
ADAMW_CHUNK = 1 << 17


def adamw_step_chunked(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
                       beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor, scratch: Tensor) -> None:
    """adamw_step_fused's exact ops in the same order, in place, one cache-sized chunk of elements at a time.

    Eager PyTorch runs each op as a separate pass over memory and allocates a full-size result per temporary (on CPU
    every fresh large allocation is page-faulted in again). Here the temporaries go to `scratch` (a 1-D fp32 buffer of
    at least min(numel, chunk) elements, reused across calls) and each chunk stays in cache across the nine ops.
    Elementwise ops do not mix elements (and the sqrt floor disappears in "+ eps"), so the result equals
    adamw_step_fused's bit for bit.
    """
    tensors = (p, grad, exp_avg, exp_avg_sq)
    if not all(t.is_contiguous() for t in tensors):  # no flat view: take the allocating path
        adamw_step_fused(*tensors, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t)
        return
    # The 0-D hyperparameter tensors of adamw_step_fused, computed once for all chunks.
    decay = 1 - lr_t * wd_t
    w1, w2 = 1 - beta1_t, 1 - beta2_t
    bias_correction1 = 1 - beta1_t**step_t
    bias_correction2 = 1 - beta2_t**step_t
    alpha = (-(lr_t / bias_correction1)).item()  # the Scalar that add_(alpha=<0-D tensor>) would convert to
    floor = _SQRT_FLOOR.item() if bool(eps_t.float() + _SQRT_OF_FLOOR == eps_t.float()) else None
    flat = [t.view(-1) for t in tensors]
    n = flat[0].numel()
    chunk = min(scratch.numel(), n)
    if n == 0:
        return
    assert chunk > 0, "scratch buffer is empty"
    cast = any(t.dtype != torch.float32 for t in tensors)
    for lo in range(0, n, chunk):
        pc, gc, mc, vc = (t[lo:lo + chunk] for t in flat)
        p32, m32, v32, g32 = (pc.float(), mc.float(), vc.float(), gc.float()) if cast else (pc, mc, vc, gc)
        buf = scratch[:p32.numel()]
        p32.mul_(decay)
        m32.lerp_(g32, w1)
        torch.square(g32, out=buf)
        v32.lerp_(buf, w2)
        torch.div(v32, bias_correction2, out=buf)  # buf = denom = sqrt(v / bc2) + eps
        if floor is not None:
            buf.clamp_min_(floor)  # same bits after "+ eps" (see _SQRT_FLOOR), no slow sqrt path
        buf.sqrt_()
        buf.add_(eps_t)
        torch.div(m32, buf, out=buf)
        p32.add_(buf, alpha=alpha)
        if cast:  # round once, back into the storage dtype
            pc.copy_(p32)
            mc.copy_(m32)
            vc.copy_(v32)


def _equilibrate_rows(x: Tensor) -> Tensor:
    """MuonEq: scale every row of each (m, n) matrix to the matrix's mean row norm ||X||_F / sqrt(m)."""
    xf = x.float()
    target = xf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(x.size(-2))  # (K, 1, 1)
    row_norm = xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (K, m, 1)
    return x * (target / row_norm).to(x.dtype)


def _polar_express(x: Tensor, ns_steps: int) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in the stack (K, m, n)."""
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # spectral norm now below 1
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # Build the Gram matrix on the small side: (n, n) for tall matrices, (m, m) for wide ones.
        gram = x.mT @ x if tall else x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + (x @ poly if tall else poly @ x)
    return x


def _normuon_scale(g: Tensor, second_momentum_buffer: Tensor, beta2_t: Tensor, red_dim: int) -> Tensor:
    """NorMuon: per-row (m >= n) or per-column second moment, rescaled so each matrix keeps its Frobenius norm."""
    beta2 = beta2_t.to(g.dtype)
    sq_mean = g.float().square().mean(dim=red_dim, keepdim=True)  # (K, m, 1) or (K, 1, n)
    reduced = g.size(red_dim)
    norm_before = (sq_mean.sum(dim=(-2, -1), keepdim=True) * reduced).sqrt()  # (K, 1, 1)
    second_momentum_buffer.lerp_(sq_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    norm_after = ((sq_mean * reduced) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(g.dtype)


def muon_step_fused(stacked_grads: Tensor, stacked_params: Tensor, momentum_buffer: Tensor,
                    second_momentum_buffer: Tensor, momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor,
                    ns_steps: int, red_dim: int) -> None:
    """One Muon step on a (K, m, n) stack in place. stacked_grads is overwritten (it holds the Nesterov blend)."""
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)  # Nesterov: look ahead along the momentum
    # bf16 when the run computes in bf16 (fast matmuls); fp16's exponent range is too small for this iteration.
    x = g.bfloat16() if COMPUTE_DTYPE == torch.bfloat16 else g
    x = _polar_express(_equilibrate_rows(x), ns_steps)
    g = x.to(stacked_params.dtype)
    # Muon+: a semi-orthogonal (m, n) matrix has Frobenius norm sqrt(min(m, n)); undo the under-convergence.
    frob = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * (math.sqrt(min(g.size(-2), g.size(-1))) / frob).to(g.dtype)
    g = _normuon_scale(g, second_momentum_buffer, beta2_t, red_dim)
    # Cautious weight decay: only decay coordinates where the update and the weight agree in sign.
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    agree = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * agree)


def muon_step_inplace(stacked_grads: Tensor, stacked_params: Tensor, momentum_buffer: Tensor,
                      second_momentum_buffer: Tensor, momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor,
                      ns_steps: int, red_dim: int) -> None:
    """muon_step_fused for eager mode: the same ops in the same order, bit for bit, with fewer full-size temporaries.

    Full-size results overwrite tensors that are already temporaries (stacked_grads, the polar iterate) and the
    polar iteration ping-pongs between two preallocated buffers. Where an op's operands are swapped (a*x + y computed
    as y += a*x) the result is unchanged: IEEE addition and multiplication are commutative.
    """
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)  # Nesterov blend; stacked_grads is ours to overwrite
    x = g.bfloat16() if COMPUTE_DTYPE == torch.bfloat16 else g
    # MuonEq (_equilibrate_rows), scaling x in place.
    xf = x.float()
    target = xf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(x.size(-2))
    row_norm = xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x.mul_((target / row_norm).to(x.dtype))
    del xf
    # Polar Express (_polar_express) with preallocated (K, s, s) Gram/polynomial buffers, s = min(m, n).
    x.div_(x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    side = min(x.size(-2), x.size(-1))
    gram = x.new_empty((x.size(0), side, side))
    poly = torch.empty_like(gram)
    spare = torch.empty_like(x)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        torch.bmm(x.mT, x, out=gram) if tall else torch.bmm(x, x.mT, out=gram)
        torch.bmm(gram, gram, out=poly)
        poly.mul_(c).add_(gram.mul_(b))  # b * gram + c * (gram @ gram)
        torch.bmm(x, poly, out=spare) if tall else torch.bmm(poly, x, out=spare)
        spare.add_(x.mul_(a))  # a * x + x @ poly
        x, spare = spare, x
    del gram, poly
    g = x.to(stacked_params.dtype)  # x itself when no cast: either way a temporary we own
    if g is not x:
        spare = torch.empty_like(g)
    # Muon+ Frobenius rescale.
    frob = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g.mul_((math.sqrt(min(g.size(-2), g.size(-1))) / frob).to(g.dtype))
    # NorMuon (_normuon_scale); only g is full size.
    beta2 = beta2_t.to(g.dtype)
    gf = g.float()
    sq_mean = torch.square(gf, out=spare if gf.dtype == spare.dtype else None).mean(dim=red_dim, keepdim=True)
    reduced = g.size(red_dim)
    norm_before = (sq_mean.sum(dim=(-2, -1), keepdim=True) * reduced).sqrt()
    second_momentum_buffer.lerp_(sq_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    norm_after = ((sq_mean * reduced) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g.mul_((scale * (norm_before / norm_after.clamp_min(1e-10))).to(g.dtype))
    # Cautious weight decay: params -= lr * g + (lr * wd) * params * agree.
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    agree = torch.mul(g, stacked_params, out=spare) >= 0
    decay = torch.mul(stacked_params, lr * wd, out=spare).mul_(agree)
    stacked_params.sub_(g.mul_(lr).add_(decay))


_COMPILED: dict = {}


def _kernel(fn, compiled: bool):
    """The eager kernel, or its torch.compile'd twin (built lazily, once per process)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


# -----------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """AdamW + Muon over upstream-format param groups; distributed when a multi-rank process group exists."""

    def __init__(self, param_groups: list[dict], *, compile: bool | None = None):
        param_groups = list(param_groups)
        for g in param_groups:
            _validate_group(g)
        super().__init__(param_groups, defaults={})
        self._compile_request = compile
        self._comm: Comm | None = None
        self._scratch: Tensor | None = None
        # 0-D CPU tensors: refilled each step; a compiled kernel treats them as inputs, not constants.
        names = ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum", "muon_lr", "muon_wd", "muon_beta2")
        self._hp = {n: torch.tensor(0.0, dtype=torch.float32, device="cpu") for n in names}

    # ----- configuration

    def _use_compile(self) -> bool:
        if self._compile_request is not None:
            return bool(self._compile_request)
        env = os.environ.get("NANOCHAT_OPTIM_COMPILE")
        if env is not None:
            return env not in ("0", "", "false", "False")
        first = next(p for g in self.param_groups for p in g["params"])
        return first.device.type == "cuda"

    def _adamw_scratch(self) -> Tensor:
        """The fp32 CPU buffer adamw_step_chunked keeps its temporaries in (not optimizer state: never saved)."""
        size = ADAMW_CHUNK * max(1, torch.get_num_threads())
        if self._scratch is None or self._scratch.numel() != size:
            self._scratch = torch.empty(size, dtype=torch.float32)
        return self._scratch

    def _get_comm(self, rank: int, world: int) -> Comm:
        if self._comm is None or (self._comm.rank, self._comm.world) != (rank, world):
            self._comm = Comm(rank, world, native=probe_native(rank, world))
        return self._comm

    # ----- AdamW

    def _launch_adamw(self, group: dict, comm: Comm | None) -> list[dict]:
        infos = []
        for p in group["params"]:
            if p.grad is None:
                raise NanochatError("MuonAdamW.step(): a parameter has no gradient; every parameter must take "
                                    "part in the loss (upstream has the same requirement)")
            rows = None if comm is None else adamw_rows_per_rank(p, comm.world)
            if comm is None:
                infos.append(dict(pending=None, grad=p.grad, rows=None))
            elif rows is None:
                infos.append(dict(pending=comm.all_reduce_avg(p.grad), grad=p.grad, rows=None))
            else:
                grad = p.grad
                if rows * comm.world != p.shape[0]:  # zero-pad dim 0 so it splits evenly
                    padded = grad.new_zeros((rows * comm.world, *grad.shape[1:]))
                    padded[:p.shape[0]].copy_(grad)
                    grad = padded
                grad_slice = grad.new_empty((rows, *grad.shape[1:]))
                infos.append(dict(pending=comm.reduce_scatter_avg(grad_slice, grad), grad=grad_slice, rows=rows))
        return infos

    def _update_adamw(self, group: dict, infos: list[dict], comm: Comm | None, gathers: list[Pending]) -> None:
        hp = self._hp
        compiled = self._use_compile()
        kernel = _kernel(adamw_step_fused, compiled)
        for p, info in zip(group["params"], infos):
            if info["pending"] is not None:
                info["pending"].wait()
            rows = info["rows"]
            if rows is None:
                p_slice = p
            else:
                lo, hi = comm.rank * rows, min((comm.rank + 1) * rows, p.shape[0])
                if rows * comm.world == p.shape[0]:
                    p_slice = p[lo:hi]  # a view: the update lands in p directly
                else:
                    p_slice = p.new_zeros((rows, *p.shape[1:]))
                    if hi > lo:
                        p_slice[:hi - lo].copy_(p[lo:hi])
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            hp["step"].fill_(state["step"])
            hp["lr"].fill_(group["lr"])
            hp["beta1"].fill_(group["betas"][0])
            hp["beta2"].fill_(group["betas"][1])
            hp["eps"].fill_(group["eps"])
            hp["wd"].fill_(group["weight_decay"])
            args = (p_slice, info["grad"], state["exp_avg"], state["exp_avg_sq"],
                    hp["step"], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["wd"])
            if compiled or p.device.type != "cpu":
                kernel(*args)  # one fused kernel, or CUDA eager (its caching allocator makes temporaries cheap)
            else:
                adamw_step_chunked(*args, scratch=self._adamw_scratch())
            if rows is None:
                continue
            if rows * comm.world == p.shape[0]:
                gathers.append(comm.all_gather(p, p_slice))
            else:
                full = p.new_empty((rows * comm.world, *p.shape[1:]))
                pending = comm.all_gather(full, p_slice)
                gathers.append(Pending(pending.work, chain(pending.finish, lambda p=p, full=full:
                                                             p.copy_(full[:p.shape[0]]))))

    # ----- Muon

    def _launch_muon(self, group: dict, comm: Comm | None) -> dict:
        params = group["params"]
        if any(p.grad is None for p in params):
            raise NanochatError("MuonAdamW.step(): a Muon parameter has no gradient; every parameter must take "
                                "part in the loss")
        if comm is None:
            return dict(pending=None, grad_chunk=torch.stack([p.grad for p in params]), chunk=len(params),
                        stacked=None)
        chunk = muon_chunk(len(params), comm.world)
        p0 = params[0]
        stacked = p0.new_empty((chunk * comm.world, *p0.shape))
        torch.stack([p.grad for p in params], out=stacked[:len(params)])
        stacked[len(params):].zero_()
        grad_chunk = p0.new_empty((chunk, *p0.shape))
        return dict(pending=comm.reduce_scatter_avg(grad_chunk, stacked), grad_chunk=grad_chunk, chunk=chunk,
                    stacked=stacked)

    def _update_muon(self, group: dict, info: dict, comm: Comm | None, gathers: list[Pending]) -> None:
        if info["pending"] is not None:
            info["pending"].wait()
        params, chunk = group["params"], info["chunk"]
        p0 = params[0]
        rank = 0 if comm is None else comm.rank
        first = rank * chunk
        owned = max(0, min(chunk, len(params) - first))  # the last ranks may own fewer (or no) matrices
        state = self.state[p0]  # the whole group's (sharded) state lives on its first parameter
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = p0.new_zeros((chunk, *p0.shape))
        if "second_momentum_buffer" not in state:
            state["second_momentum_buffer"] = p0.new_zeros(muon_second_shape(chunk, p0.shape))
        m, n = p0.shape[-2], p0.shape[-1]
        red_dim = -1 if m >= n else -2
        stacked_owned = None
        if owned > 0:
            stacked_owned = torch.stack(params[first:first + owned])
            hp = self._hp
            hp["momentum"].fill_(group["momentum"])
            hp["muon_beta2"].fill_(group["beta2"])
            hp["muon_lr"].fill_(group["lr"] * max(1.0, m / n) ** 0.5)  # tall matrices (c_fc) get a larger step
            hp["muon_wd"].fill_(group["weight_decay"])
            compiled = self._use_compile()
            kernel = _kernel(muon_step_fused, True) if compiled else muon_step_inplace
            kernel(info["grad_chunk"][:owned], stacked_owned, state["momentum_buffer"][:owned],
                   state["second_momentum_buffer"][:owned], hp["momentum"], hp["muon_lr"], hp["muon_wd"],
                   hp["muon_beta2"], group["ns_steps"], red_dim)
        if comm is None:
            gathers.append(Pending(None, lambda: torch._foreach_copy_(params, list(stacked_owned.unbind(0)))))
            return
        updated = p0.new_zeros((chunk, *p0.shape))
        if owned > 0:
            updated[:owned].copy_(stacked_owned)
        stacked = info["stacked"]  # the reduce_scatter input is free again: gather into it
        pending = comm.all_gather(stacked, updated)
        gathers.append(Pending(pending.work, chain(pending.finish, lambda: torch._foreach_copy_(
            params, list(stacked[:len(params)].unbind(0))))))

    # ----- step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step() takes no closure")
        rank, world = dist_rank_world()
        comm = self._get_comm(rank, world) if world > 1 else None
        # Phase 1: launch every reduction.
        launched = [self._launch_adamw(g, comm) if g["kind"] == "adamw" else self._launch_muon(g, comm)
                    for g in self.param_groups]
        # Phase 2: per group, wait for its reduction, update the owned shard, launch its gather.
        gathers: list[Pending] = []
        for group, info in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._update_adamw(group, info, comm, gathers)
            else:
                self._update_muon(group, info, comm, gathers)
        # Phase 3: wait for the gathers and copy back.
        for pending in gathers:
            pending.wait()

    # ----- checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking that the shard shapes fit this world size."""
        _, world = dist_rank_world()
        check_state_dict_world(state_dict, self, world)
        super().load_state_dict(state_dict)


def _validate_group(g: dict) -> None:
    kind = g.get("kind")
    required = {"adamw": ("lr", "betas", "eps", "weight_decay"),
                "muon": ("lr", "momentum", "ns_steps", "beta2", "weight_decay")}
    if kind not in required:
        raise ValueError(f"MuonAdamW: param group kind must be 'adamw' or 'muon', got {kind!r}")
    missing = [k for k in required[kind] if k not in g]
    if missing:
        raise ValueError(f"MuonAdamW: {kind} param group is missing {missing}")
    params = list(g["params"])
    if kind == "muon":
        shapes = {tuple(p.shape) for p in params}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"MuonAdamW: a muon group needs 2-D params of one shape, got shapes {sorted(shapes)}")
        if not 1 <= g["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"MuonAdamW: ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {g['ns_steps']}")
