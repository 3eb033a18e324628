"""
Pretraining configuration and everything derived from it before the first step: `BaseTrainConfig` (upstream
base_train's flags and ours), the model shape from the depth dial, the scaling-law plan (horizon, batch size, LR and
weight-decay scaling, gradient accumulation) and the LR / momentum / weight-decay schedules. Pure functions of the
config; nanochat/train.py runs the loop. NANOCHAT_SPEC §6.4, §6.5, §10.1.
"""

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from nanochat.common import NanochatError, print0

B_REF = 2**19  # optimal total batch size (tokens) of the d12 reference model, measured upstream


def _f(default, help):
    """A config field with its CLI help text (ray_jobs builds argparse flags from these)."""
    return field(default=default, metadata={"help": help})


# -----------------------------------------------------------------------------
# Config: every upstream base_train flag with its default, plus a few of ours at the end


@dataclass
class BaseTrainConfig:
    # Logging
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb logging)")
    # Runtime
    device_type: str = _f("", "cuda|cpu|mps (empty = autodetect)")
    fp8: bool = _f(False, "enable FP8 training (CUDA with FP8 support only; ignored elsewhere with a warning)")
    fp8_recipe: str = _f("tensorwise", "FP8 scaling recipe (only 'tensorwise' is implemented)")
    # Model architecture
    depth: int = _f(20, "depth of the Transformer model: the single complexity dial")
    aspect_ratio: int = _f(64, "model_dim = depth * aspect_ratio (rounded up to a multiple of head_dim)")
    head_dim: int = _f(128, "target head dimension for attention")
    max_seq_len: int = _f(2048, "max context length")
    window_pattern: str = _f("SSSL", "sliding window pattern tiled across layers: L=full, S=quarter context")
    # Training horizon (first one > 0 wins, in this order)
    num_iterations: int = _f(-1, "explicit number of optimization steps (-1 = disable)")
    target_flops: float = _f(-1.0, "calculate num_iterations to reach target_flops (-1 = disable)")
    target_param_data_ratio: float = _f(12, "calculate num_iterations to keep this tokens:scaling-params ratio")
    # Optimization
    device_batch_size: int = _f(32, "per-device batch size (rows); reduce to 16, 8, ... if you run out of memory")
    total_batch_size: int = _f(-1, "total batch size in tokens (-1 = auto-compute optimal)")
    embedding_lr: float = _f(0.3, "learning rate for embedding parameters (Adam)")
    unembedding_lr: float = _f(0.008, "learning rate for unembedding parameters (Adam)")
    weight_decay: float = _f(0.28, "cautious weight decay for the Muon optimizer (at the d12 reference)")
    matrix_lr: float = _f(0.02, "learning rate for matrix parameters (Muon)")
    scalar_lr: float = _f(0.5, "learning rate for scalars (resid_lambdas, x0_lambdas)")
    warmup_steps: int = _f(40, "number of steps for LR warmup")
    warmdown_ratio: float = _f(0.65, "ratio of iterations for LR warmdown")
    final_lr_frac: float = _f(0.05, "final LR as fraction of initial LR")
    resume_from_step: int = _f(-1, "resume training from this step (-1 = disable)")
    # Evaluation
    eval_every: int = _f(250, "evaluate val bpb every N steps (-1 = disable)")
    eval_tokens: int = _f(80 * 524288, "number of tokens to evaluate val loss on")
    core_metric_every: int = _f(2000, "evaluate CORE metric every N steps (-1 = disable)")
    core_metric_max_per_task: int = _f(500, "examples per task for CORE metric")
    sample_every: int = _f(2000, "sample from model every N steps (-1 = disable)")
    save_every: int = _f(-1, "save checkpoints every N steps (-1 = only at end)")
    # Output
    model_tag: str | None = _f(None, "override model tag for checkpoint directory name (default d<depth>)")
    # --- ours (not upstream flags)
    compile: int = _f(-1, "torch.compile the model: 1/0, -1 = auto (CUDA; CPU runs long enough to pay it back)")
    data: str = _f("parquet", "training data: parquet (base_data shards) | synthetic (seeded tokens, for tests)")
    seed: int = _f(42, "seed of the synthetic data stream (weights always use upstream's seed 42)")
    vocab_size: int = _f(-1, "synthetic data without a tokenizer: vocab size (-1 = take it from the tokenizer)")
    save_every_minutes: float = _f(-1.0, "also save every M minutes, converted to steps from the measured step "
                                         "time (-1 = off)")
    keep_checkpoints: int = _f(2, "retention: keep this run's newest K checkpoints plus the final one (-1 = all)")
    background_save: int = _f(1, "1: copy the state to host memory and write it in the background; 0: block")
    uneven_batch: int = _f(-1, "a worker count the batch's micro-batches do not divide over: 1 deals them out "
                               "round-robin (some ranks run one more; same math), 0 is an error (upstream), -1 auto "
                               "(1 for the smaller sizes of an elastic Ray run, else 0)")

    def __post_init__(self):
        self.validate()

    def validate(self, world_size: int | None = None):
        """Reject bad flag values with a message that names the flag. world_size adds the divisibility check."""
        if self.depth < 1:
            raise NanochatError(f"--depth must be >= 1 (got {self.depth})")
        for name in ("aspect_ratio", "head_dim", "device_batch_size", "warmup_steps"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                raise NanochatError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.max_seq_len < 2:
            raise NanochatError(f"--max-seq-len must be >= 2 (got {self.max_seq_len})")
        if self.device_type not in ("", "cuda", "cpu", "mps"):
            raise NanochatError(f"--device-type {self.device_type!r} is unknown: use cuda, cpu, mps or leave empty")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise NanochatError(f"--window-pattern {self.window_pattern!r} may only contain S and L")
        if self.fp8_recipe != "tensorwise":
            raise NanochatError(f"--fp8-recipe {self.fp8_recipe!r} is not implemented: use --fp8-recipe tensorwise")
        if self.num_iterations <= 0 and self.target_flops <= 0 and self.target_param_data_ratio <= 0:
            raise NanochatError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
        if not 0 <= self.warmdown_ratio <= 1:
            raise NanochatError(f"--warmdown-ratio must be in [0, 1] (got {self.warmdown_ratio})")
        if self.total_batch_size != -1 and self.total_batch_size < 1:
            raise NanochatError(f"--total-batch-size must be positive or -1 for auto (got {self.total_batch_size})")
        check_checkpoint_flags(self.save_every_minutes, self.keep_checkpoints)
        if self.data not in ("parquet", "synthetic"):
            raise NanochatError(f"--data {self.data!r} is unknown: use parquet or synthetic")
        if self.uneven_batch not in (-1, 0, 1):
            raise NanochatError(f"--uneven-batch must be 1, 0 or -1 (got {self.uneven_batch})")
        if self.total_batch_size > 0 and world_size is not None:
            micro_batches(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size,
                          self.uneven_batch == 1)

    @property
    def tag(self) -> str:
        return self.model_tag if self.model_tag else f"d{self.depth}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BaseTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise NanochatError(f"unknown BaseTrainConfig keys {sorted(unknown)}")
        return cls(**d)


def check_checkpoint_flags(save_every_minutes: float, keep_checkpoints: int) -> None:
    """The checkpoint flags shared by pretraining, SFT and RL."""
    if save_every_minutes != -1 and not save_every_minutes > 0:
        raise NanochatError(f"--save-every-minutes must be > 0, or -1 to disable (got {save_every_minutes})")
    if keep_checkpoints != -1 and keep_checkpoints < 1:
        raise NanochatError(f"--keep-checkpoints must be >= 1, or -1 to keep all (got {keep_checkpoints})")


def check_batch_divisible(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> int:
    """Gradient accumulation steps, or a NanochatError naming the flags when the batch does not divide."""
    world_tokens = device_batch_size * max_seq_len * world_size
    if total_batch_size % world_tokens != 0:
        raise NanochatError(
            f"total_batch_size ({total_batch_size}) must be a multiple of {world_tokens} "
            f"(--device-batch-size {device_batch_size} x --max-seq-len {max_seq_len} x {world_size} workers): "
            f"change --total-batch-size, --device-batch-size or the number of workers"
        )
    return total_batch_size // world_tokens


def micro_batches(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int,
                  uneven: bool = False) -> int:
    """Micro-batches per optimizer step over all ranks; rank r runs rank_share(that, world_size, r) of them.

    Each rank scales its micro-step losses by world/M, and the optimizer averages gradients over ranks, so the step
    is the mean over all M micro-batches however they are dealt out. uneven=False keeps upstream's rule (every rank
    the same count, else an error naming the flags); uneven=True only needs whole micro-batches, at least one a rank.
    """
    if not uneven:
        return check_batch_divisible(total_batch_size, device_batch_size, max_seq_len, world_size) * world_size
    rows = device_batch_size * max_seq_len
    if total_batch_size % rows != 0 or total_batch_size // rows < world_size:
        raise NanochatError(
            f"total_batch_size ({total_batch_size}) must be a multiple of {rows} (--device-batch-size "
            f"{device_batch_size} x --max-seq-len {max_seq_len}) with at least one micro-batch for each of "
            f"{world_size} workers: change --total-batch-size, --device-batch-size or the number of workers"
        )
    return total_batch_size // rows


def rank_share(n: int, world: int, rank: int) -> int:
    """How many of n items, dealt round-robin over world ranks, rank gets (ranks below n % world get one more)."""
    return n // world + (rank < n % world)


# -----------------------------------------------------------------------------
# Model shape from depth, and the scaling-law derivations (horizon, batch, LR, weight decay)


def build_model_meta(cfg: BaseTrainConfig, vocab_size: int, depth: int | None = None):
    """GPT on the meta device (shapes only) for `depth` (default cfg.depth)."""
    from nanochat.gpt import GPT, GPTConfig

    depth = cfg.depth if depth is None else depth
    # width rounds up to a whole number of heads, so the head dim is exactly cfg.head_dim
    model_dim = -(-depth * cfg.aspect_ratio // cfg.head_dim) * cfg.head_dim
    n_head = model_dim // cfg.head_dim
    config = GPTConfig(
        sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
        n_embd=model_dim, window_pattern=cfg.window_pattern,
    )  # fmt: skip
    with torch.device("meta"):
        return GPT(config)


def scaling_params(model) -> int:
    """Parameters that define the horizon: transformer matrices + lm_head (upstream's cleanest scaling fit)."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


@dataclass
class Plan:
    """Everything derived from the config and the model before the first step."""

    num_scaling_params: int
    target_tokens: int
    d_ref: float
    total_batch_size: int
    auto_batch: bool
    batch_lr_scale: float
    weight_decay: float
    num_iterations: int
    horizon_source: str
    flops_per_token: float
    grad_accum_steps: int  # micro-steps of the busiest rank (all ranks alike unless the batch is dealt unevenly)
    micro_batches: int  # over all ranks, per optimizer step


def derive_plan(
    cfg: BaseTrainConfig, num_scaling_params: int, d12_scaling_params: int, flops_per_token: float, world_size: int
) -> Plan:
    """Upstream's scaling rules (spec §6.4, §10.1 step 11-12), as a pure function."""
    target_tokens = int(cfg.target_param_data_ratio * num_scaling_params)
    d_ref = cfg.target_param_data_ratio * d12_scaling_params
    total = cfg.total_batch_size
    auto = total == -1
    if auto:  # Power Lines: B_opt ∝ D^0.383, snapped to a power of two
        total = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    batch_lr_scale = (total / B_REF) ** 0.5  # η ∝ √(B/B_ref)
    # T_epoch rule: λ = λ_ref · √(B/B_ref) · (D_ref/D)
    weight_decay = cfg.weight_decay * math.sqrt(total / B_REF) * (d_ref / target_tokens)
    if cfg.num_iterations > 0:
        num_iterations, source = cfg.num_iterations, "user"
    elif cfg.target_flops > 0:
        num_iterations, source = round(cfg.target_flops / (flops_per_token * total)), "flops"
    else:
        num_iterations, source = target_tokens // total, "ratio"
    micro = micro_batches(total, cfg.device_batch_size, cfg.max_seq_len, world_size, cfg.uneven_batch == 1)
    return Plan(num_scaling_params, target_tokens, d_ref, total, auto, batch_lr_scale, weight_decay,
                num_iterations, source, flops_per_token, -(-micro // world_size), micro)  # fmt: skip


def plan_for(cfg: BaseTrainConfig, vocab_size: int, world_size: int, model=None) -> Plan:
    """derive_plan from meta-device models (cheap; used by the driver to validate before any worker starts)."""
    model = model if model is not None else build_model_meta(cfg, vocab_size)
    d12 = build_model_meta(cfg, vocab_size, depth=12)
    return derive_plan(cfg, scaling_params(model), scaling_params(d12), model.estimate_flops(), world_size)


def print_plan(cfg: BaseTrainConfig, plan: Plan, param_counts: dict) -> None:
    """The derivation lines upstream prints, in its order."""
    print0("Parameter counts:")
    for key, value in param_counts.items():
        print0(f"{key:24s}: {value:,}")
    print0(f"Estimated FLOPs per token: {plan.flops_per_token:e}")
    if plan.auto_batch:
        print0(f"Auto-computed optimal batch size: {plan.total_batch_size:,} tokens")
    if plan.total_batch_size != B_REF:
        print0(f"Scaling LRs by {plan.batch_lr_scale:.4f} for batch size {plan.total_batch_size:,} (reference: {B_REF:,})")
    if plan.weight_decay != cfg.weight_decay:
        print0(f"Scaling weight decay from {cfg.weight_decay:.6f} to {plan.weight_decay:.6f} for depth {cfg.depth}")
    how = {"user": "Using user-provided number of iterations", "flops": "Calculated number of iterations from "
           "target FLOPs", "ratio": "Calculated number of iterations from target data:param ratio"}[plan.horizon_source]
    print0(f"{how}: {plan.num_iterations:,}")
    total_tokens = plan.total_batch_size * plan.num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / plan.num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {plan.flops_per_token * total_tokens:e}")


# -----------------------------------------------------------------------------
# Schedules (spec §6.5): pure functions of the step


def lr_multiplier(it: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float):
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it: int, num_iterations: int, warmdown_ratio: float) -> float:
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if it < 400:  # 0.85 -> 0.97 over the first 400 steps
        return 0.85 + (0.97 - 0.85) * it / 400
    if it >= warmdown_start:  # 0.97 -> 0.90 during the LR warmdown
        return 0.97 + (0.90 - 0.97) * (it - warmdown_start) / warmdown
    return 0.97


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))  # cosine to 0
