"""
Minimal FP8 training for Linear layers: tensorwise dynamic scaling only (a small stand-in for torchao's Float8Linear).

    from nanochat.fp8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=lambda mod, fqn: min(mod.in_features, mod.out_features) >= 128)

Meant for Hopper-class GPUs (base_train --fp8); PyTorch's CPU `_scaled_mm` also runs it, which the tests use.
Each of a Linear's three matmuls quantizes both operands with one scale per tensor (scale = fp8_max / amax) and
calls torch._scaled_mm, which dequantizes via the inverse scales:
  forward   out    = x @ W.T        x, W in e4m3 (more mantissa), fast accumulation
  backward  grad_x = g @ W          g in e5m2 (more range for gradients), precise accumulation
            grad_W = g.T @ x
_scaled_mm wants its first operand row-major and its second column-major.
"""

import torch
import torch.nn as nn

from nanochat.common import COMPUTE_DTYPE

_AMAX_EPS = 1e-12  # an all-zero tensor still gets a finite scale


@torch.no_grad()
def _to_fp8(x, fp8_dtype):
    """(x quantized to fp8_dtype with one tensor-wide scale, inverse scale as a 0-d fp32 tensor)."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.float().abs().max()
    scale = (fp8_max / amax.double().clamp(min=_AMAX_EPS)).float()  # fp64 division: same result eager/compiled
    # Saturate before the cast: casting an out-of-range value to fp8 does not clamp.
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _col_major(x):
    """Same 2-D tensor, column-major memory (what _scaled_mm needs for its second operand)."""
    return x.t().contiguous().t()


@torch._dynamo.allow_in_graph  # one opaque node for torch.compile
class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight):
        x8, x_inv = _to_fp8(x2d, torch.float8_e4m3fn)
        w8, w_inv = _to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        # weight is (N, K) row-major, so w8.t() is already column-major: no copy
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x2d.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = _to_fp8(grad_out, torch.float8_e5m2)
        grad_x = torch._scaled_mm(g8, _col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_out.dtype,
                                  use_fast_accum=False)  # (B, N) @ (N, K)
        grad_w = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=grad_out.dtype, use_fast_accum=False)  # (N, B) @ (B, K)
        return grad_x, grad_w


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in fp8; the weight (and optional bias) keep their own precision."""

    def forward(self, x):
        x = x.to(COMPUTE_DTYPE)
        out = _Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)
        out = out.reshape(*x.shape[:-1], out.size(-1))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_float(cls, mod):
        """Wrap an existing nn.Linear, sharing its parameters (the shell is built on meta: no allocation)."""
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight, new.bias = mod.weight, mod.bias
        return new


class Float8LinearConfig:
    """torchao-compatible config object; only the 'tensorwise' recipe exists here."""

    recipe_name = "tensorwise"

    @staticmethod
    def from_recipe_name(recipe_name):
        if recipe_name != "tensorwise":
            raise ValueError(f"fp8 recipe {recipe_name!r} is not supported: use --fp8-recipe tensorwise "
                             f"(rowwise scaling needs the full torchao library)")
        return Float8LinearConfig()


def convert_to_float8_training(module, *, config=None, module_filter_fn=None):
    """Swap every nn.Linear in `module` (children first) that passes module_filter_fn(mod, fqn) for a Float8Linear."""

    def visit(parent, prefix):
        for name, child in parent.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            visit(child, fqn)
            if isinstance(child, nn.Linear) and not isinstance(child, Float8Linear):
                if module_filter_fn is None or module_filter_fn(child, fqn):
                    setattr(parent, name, Float8Linear.from_float(child))

    visit(module, "")
    return module
