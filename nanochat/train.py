"""
Base-model pretraining as a plain function of a config: `train(BaseTrainConfig(...), sink=None) -> dict`.

The same loop runs single-process, under torchrun, and inside Ray Train workers (ray_jobs/base_train.py calls it
from `TorchTrainer`). It never imports Ray: everything a launcher wants to see or steer goes through a `TrainSink`
(metrics, checkpoint registration, where to resume from, which data iterator to use).

Behaviour follows upstream nanochat's scripts/base_train.py (see NANOCHAT_SPEC §3.4, §6.4, §6.5, §10.1): the depth
dial, the derived horizon / batch size / LR and weight-decay scaling, the schedules, gradient accumulation from the
world size, the per-step log line, val bpb, samples, and checkpoints in `base_checkpoints/<tag>/`. Differences:
- the logged loss is the mean over all micro-steps and ranks (upstream logs rank 0's last micro-step);
- the checkpoint meta also records `world_size` and every rank's data position, so a resume may change the number
  of workers (the optimizer state is re-sharded) and knows when a checkpoint is complete;
- `data="synthetic"` is a seeded token stream whose batches do not depend on the world size (tests, benchmarks).

Run single-process (CPU example, like upstream's docstring):
    python -m ray_jobs.base_train --num-workers 0 --depth=4 --max-seq-len=512 --device-batch-size=1 \
        --eval-tokens=512 --core-metric-every=-1 --total-batch-size=512 --num-iterations=20
"""

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

from nanochat.common import (
    COMPUTE_DTYPE,
    COMPUTE_DTYPE_REASON,
    CPU_EAGER_MFU,
    DummyWandb,
    NanochatError,
    PeakFlops,
    autodetect_device_type,
    compile_choice,
    compute_cleanup,
    compute_init,
    get_base_dir,
    is_ddp_initialized,
    print0,
)

B_REF = 2**19  # optimal total batch size (tokens) of the d12 reference model, measured upstream
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


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
        if self.data not in ("parquet", "synthetic"):
            raise NanochatError(f"--data {self.data!r} is unknown: use parquet or synthetic")
        if self.total_batch_size > 0 and world_size is not None:
            check_batch_divisible(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size)

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
    grad_accum_steps: int


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
    grad_accum = check_batch_divisible(total, cfg.device_batch_size, cfg.max_seq_len, world_size)
    return Plan(num_scaling_params, target_tokens, d_ref, total, auto, batch_lr_scale, weight_decay,
                num_iterations, source, flops_per_token, grad_accum)  # fmt: skip


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


# -----------------------------------------------------------------------------
# Data: the library's loaders, and a seeded synthetic stream whose batches do not depend on the world size


def synthetic_loader(B: int, T: int, vocab_size: int, seed: int, rank: int, world: int, device, state=None):
    """Yields (inputs, targets, state). Row g of the global stream is random tokens from generator seed+g.

    Micro-step k of rank r holds global rows [row0 + (k*W + r)*B, ... + B), so the rows of one optimizer step are
    the same for (W workers, A accumulation steps) and (W*A workers, 1 step). state = {"row": the global row after
    this batch's micro-step group}; a loader resumed from it continues with the next batch (any world size).
    """
    if state is not None and "ranks" in state:
        state = state["ranks"][0]  # the position is global: every rank's entry holds the same row
    row0 = 0 if state is None else int(state["row"])
    gen = torch.Generator()
    k = 0
    while True:
        group_row = row0 + k * world * B
        rows = []
        for i in range(B):
            gen.manual_seed(seed * 1_000_003 + group_row + rank * B + i)
            rows.append(torch.randint(0, vocab_size, (T + 1,), generator=gen))
        batch = torch.stack(rows).to(device)
        state = {"row": group_row + world * B, "epoch": 1, "pq_idx": 0, "rg_idx": 0}
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), state
        k += 1


def _make_loaders(cfg, tokenizer, vocab_size, device, rank, world, resume_state, sink):
    """(train iterator of (x, y, state), function building a fresh val iterator of (x, y))."""
    B, T = cfg.device_batch_size, cfg.max_seq_len
    if cfg.data == "synthetic":
        train = synthetic_loader(B, T, vocab_size, cfg.seed, rank, world, device, resume_state)
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


# -----------------------------------------------------------------------------
# The loop


class _Run:
    """State of one training run on one rank; `train()` drives it. Split into methods only for readability."""

    def __init__(self, cfg: BaseTrainConfig, sink: TrainSink | None):
        self.cfg, self.sink = cfg, sink or TrainSink()
        device_type = cfg.device_type or autodetect_device_type()
        self.ddp, self.rank, _, self.world, self.device = compute_init(device_type)
        self.device_type = device_type
        self.master = self.rank == 0
        self.sync = torch.cuda.synchronize if device_type == "cuda" else lambda: None
        print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
        self.peak = PeakFlops(self.device)
        if device_type == "cuda":
            print0(f"GPU: {torch.cuda.get_device_name(self.device)} | Peak FLOPS (BF16): {self.peak.value:.2e}")
        elif device_type == "cpu":
            print0(f"CPU: {torch.get_num_threads()} threads | Peak FLOPS (measured fp32 matmul): {self.peak.value:.2e}")
        self.wandb = self._init_wandb()
        self._print_attention_backend()
        self.tokenizer, self.token_bytes, self.vocab_size = _load_tokenizer(cfg, self.device)
        print0(f"Vocab size: {self.vocab_size:,}")
        self._build_model()
        self._setup_optimizer_and_state()

    def _init_wandb(self):
        if self.cfg.run == "dummy" or not self.master:
            return DummyWandb()
        import wandb

        return wandb.init(project="nanochat", name=self.cfg.run, config=self.cfg.to_dict())

    def _print_attention_backend(self):
        from nanochat.flash_attention import describe_backend

        print0(describe_backend())  # looks FA3 up now, before torch.compile traces the model

    def _build_model(self):
        cfg = self.cfg
        model = build_model_meta(cfg, self.vocab_size)
        self.model_config = asdict(model.config)
        print0(f"Model config:\n{json.dumps(self.model_config, indent=2)}")
        model.to_empty(device=self.device)
        model.init_weights()
        self.checkpoint_dir = checkpoint_dir_for(cfg)
        # Where to resume from: the launcher's registry (Ray) wins over --resume-from-step.
        step = self.sink.resume_step(self.checkpoint_dir)
        self.resume_step = step if step is not None else cfg.resume_from_step
        self.meta = None
        if self.resume_step != -1:
            from nanochat.checkpoint_manager import load_checkpoint

            print0(f"Resuming optimization from step {self.resume_step}")
            model_data, _, self.meta = load_checkpoint(self.checkpoint_dir, self.resume_step, self.device)
            model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
            model.load_state_dict(model_data, strict=True, assign=True)
            del model_data
        if cfg.fp8:
            self._convert_fp8(model)
        self.orig_model = model  # uncompiled: saving, sampling, CORE
        plan = plan_for(cfg, self.vocab_size, self.world, model=model)  # eager-time estimate: compile or not
        eager_s = plan.flops_per_token * plan.total_batch_size * plan.num_iterations / self.world / (
            self.peak.value * CPU_EAGER_MFU)
        self.use_compile, why = compile_choice(cfg.compile, self.device_type, eager_s)
        print0(f"torch.compile: {'on' if self.use_compile else 'off'} ({why})")
        self.model = torch.compile(model, dynamic=False) if self.use_compile else model

    def _convert_fp8(self, model):
        if self.device_type != "cuda":
            print0("Warning: FP8 training requires CUDA, ignoring --fp8 flag")
            return
        from nanochat.fp8 import Float8LinearConfig, convert_to_float8_training

        def big_enough(mod, fqn):  # FP8 GEMMs need dims divisible by 16; tiny layers are not worth it
            return (isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                    and min(mod.in_features, mod.out_features) >= 128)

        n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=big_enough)
        n_fp8 = sum("Float8" in type(m).__name__ for m in model.modules())
        print0(f"✓ FP8 training enabled (tensorwise scaling) - converted {n_fp8}/{n_linear} linear layers, "
               f"skipped {n_linear - n_fp8} (too small)")

    def _setup_optimizer_and_state(self):
        cfg = self.cfg
        self.plan = plan_for(cfg, self.vocab_size, self.world, model=self.orig_model)
        print_plan(cfg, self.plan, self.orig_model.num_scaling_params())
        s = self.plan.batch_lr_scale
        self.optimizer = self.orig_model.setup_optimizer(
            unembedding_lr=cfg.unembedding_lr * s, embedding_lr=cfg.embedding_lr * s, scalar_lr=cfg.scalar_lr * s,
            matrix_lr=cfg.matrix_lr * s, weight_decay=self.plan.weight_decay, compile=self.use_compile or None,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None
        if self.scaler is not None:
            print0("GradScaler enabled for fp16 training")
        data_state = None
        self.step, self.val_bpb, self.min_val_bpb = 0, None, float("inf")
        self.core_history = []  # (step, CORE metric) of this run, in the order the results arrived
        self.smooth_loss, self.total_time = 0.0, 0.0
        if self.meta is not None:
            meta = self.meta
            load_optimizer_for_world(self.optimizer, self.checkpoint_dir, self.resume_step, meta, self.device,
                                     self.rank, self.world)
            self.step, self.val_bpb = meta["step"], meta.get("val_bpb")
            loop = meta["loop_state"]
            self.min_val_bpb = loop["min_val_bpb"]
            self.smooth_loss, self.total_time = loop["smooth_train_loss"], loop["total_training_time"]
            # every rank's position when we wrote it (exact resume); upstream checkpoints only have rank 0's
            states = meta.get("dataloader_state_dicts")
            data_state = {"ranks": states} if states else meta.get("dataloader_state_dict")
        self.train_loader, self.build_val_loader = _make_loaders(
            cfg, self.tokenizer, self.vocab_size, self.device, self.rank, self.world, data_state, self.sink)
        self.x, self.y, self.data_state = next(self.train_loader)  # kick off the first batch
        # position after the last batch trained on: what a checkpoint records, so a resume continues right after it
        self.consumed_state = data_state
        B, T = cfg.device_batch_size, cfg.max_seq_len
        print0(f"Tokens / micro-batch / rank: {B} x {T} = {B * T:,}")
        print0(f"Tokens / micro-batch: {B * T * self.world:,}")
        print0(f"Total batch size {self.plan.total_batch_size:,} => gradient accumulation steps: "
               f"{self.plan.grad_accum_steps}")

    # ---- periodic work

    def evaluate_val(self):
        from nanochat.loss_eval import evaluate_bpb

        cfg = self.cfg
        self.model.eval()
        steps = cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * self.world)
        with _disable_fp8(self.orig_model):
            self.val_bpb = evaluate_bpb(self.model, self.build_val_loader(), steps, self.token_bytes)
        print0(f"Step {self.step:05d} | Validation bpb: {self.val_bpb:.6f}")
        self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
        metrics = {"step": self.step, "total_training_flops": self._flops_so_far(),
                   "total_training_time": self.total_time, "val/bpb": self.val_bpb}
        self.wandb.log(metrics)
        self.sink.on_eval(self.step, metrics)
        self.model.train()

    def evaluate_core(self):
        cfg = self.cfg
        self.model.eval()
        with _disable_fp8(self.orig_model):
            results = self.sink.core_metric(self.orig_model, self.tokenizer, self.device, self.step,
                                            cfg.core_metric_max_per_task)
            if results is None:
                from nanochat.core_eval import evaluate_core

                results = evaluate_core(self.orig_model, self.tokenizer, self.device,
                                        max_per_task=cfg.core_metric_max_per_task)
        self.model.train()
        if not results.get("pending"):  # else launched asynchronously: collect_evals reports it when ready
            self.report_core(self.step, results)

    def report_core(self, step: int, results: dict):
        """Print / log / hand to the sink the CORE result of the model at `step` (maybe a later step's news)."""
        self.core_history.append((step, results["core_metric"]))
        late = f" (ready at step {self.step})" if step != self.step else ""
        print0(f"Step {step:05d} | CORE metric: {results['core_metric']:.4f}{late}")
        metrics = {"step": step, "total_training_flops": self._flops_so_far(step),
                   "core_metric": results["core_metric"], "centered_results": results.get("centered_results")}
        self.wandb.log(metrics)
        self.sink.on_eval(step, {"step": step, "core_metric": results["core_metric"]})

    def collect_evals(self, wait: bool = False):
        """Report asynchronous evaluations that finished (never blocks unless wait: the end of training)."""
        for kind, step, results in self.sink.finished_evals(wait):
            if kind == "core":
                self.report_core(step, results)

    def sample(self):
        if self.tokenizer is None:
            return
        from nanochat.engine import Engine

        self.model.eval()
        engine = Engine(self.orig_model, self.tokenizer)
        for prompt in SAMPLE_PROMPTS:
            tokens = self.tokenizer.encode(prompt, prepend="<|bos|>")
            with _disable_fp8(self.orig_model):
                sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
            print0(self.tokenizer.decode(sample[0]))
        self.model.train()

    def save(self):
        from nanochat.checkpoint_manager import save_checkpoint

        # every rank's data position, so a resume with the same world size continues each rank's own stream
        states = [self.consumed_state]
        if self.ddp and is_ddp_initialized():
            states = [None] * self.world
            dist.all_gather_object(states, self.consumed_state)
        meta = {
            "step": self.step,
            "val_bpb": self.val_bpb,
            "model_config": self.model_config,
            "user_config": self.cfg.to_dict(),
            "device_batch_size": self.cfg.device_batch_size,
            "max_seq_len": self.cfg.max_seq_len,
            "total_batch_size": self.plan.total_batch_size,
            "dataloader_state_dict": self.consumed_state,
            "loop_state": {"min_val_bpb": self.min_val_bpb, "smooth_train_loss": self.smooth_loss,
                           "total_training_time": self.total_time},
            "world_size": self.world,
            "dataloader_state_dicts": states,
            **self.sink.checkpoint_meta(),
        }
        save_checkpoint(self.checkpoint_dir, self.step, self.orig_model.state_dict(), self.optimizer.state_dict(),
                        meta, rank=self.rank)
        if self.ddp and is_ddp_initialized():
            dist.barrier()  # the step is complete on storage for everyone before anyone announces it
        self.sink.on_checkpoint(self.step, self.checkpoint_dir, {"step": self.step, "val_bpb": self.val_bpb})

    def _flops_so_far(self, step: int | None = None):
        return self.plan.flops_per_token * self.plan.total_batch_size * (self.step if step is None else step)

    # ---- one optimizer step

    def train_step(self):
        """Forward/backward over the accumulation micro-steps, then the optimizer step. Returns (loss, lrm, dt)."""
        plan, cfg = self.plan, self.cfg
        self.sync()
        t0 = time.time()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(plan.grad_accum_steps):
            loss = self.model(self.x, self.y)
            loss_sum += loss.detach()
            loss = loss / plan.grad_accum_steps  # each backward adds to .grad, so average here
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self.consumed_state = self.data_state
            self.x, self.y, self.data_state = next(self.train_loader)  # prefetch while the device works
        lrm = lr_multiplier(self.step, plan.num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        momentum = muon_momentum(self.step, plan.num_iterations, cfg.warmdown_ratio)
        wd = muon_weight_decay(self.step, plan.num_iterations, plan.weight_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, wd
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            if is_ddp_initialized():  # all ranks must agree on skipping the step
                for v in self.scaler._found_inf_per_device(self.optimizer).values():
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        step_loss = loss_sum / plan.grad_accum_steps
        if self.ddp and is_ddp_initialized():
            dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)  # mean over ranks (gloo has no AVG)
            step_loss /= self.world
        loss_f = step_loss.item()  # a device sync point
        self.sync()
        return loss_f, lrm, time.time() - t0

    def log_step(self, loss_f, lrm, dt):
        plan = self.plan
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss_f
        debiased = self.smooth_loss / (1 - 0.9 ** (self.step + 1))
        pct = 100 * self.step / plan.num_iterations
        tok_per_sec = int(plan.total_batch_size / dt)
        mfu = 100 * plan.flops_per_token * plan.total_batch_size / dt / (self.peak.current() * self.world)
        if self.step > 10:
            self.total_time += dt  # the first steps include compilation and warm-up
        eta = ""
        if self.step - 10 > 0:
            eta = f" | eta: {(plan.num_iterations - self.step) * self.total_time / (self.step - 10) / 60:.1f}m"
        d = self.data_state
        epoch = f"{d.get('epoch', 1)} pq: {d.get('pq_idx', 0)} rg: {d.get('rg_idx', 0)}"
        print0(f"step {self.step:05d}/{plan.num_iterations:05d} ({pct:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} "
               f"| dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | bf16_mfu: {mfu:.2f} | epoch: {epoch} "
               f"| total time: {self.total_time / 60:.2f}m{eta}")
        metrics = {"step": self.step, "total_training_flops": self._flops_so_far(),
                   "total_training_time": self.total_time, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, "train/mfu": mfu, "train/epoch": epoch}
        if self.step % 100 == 0:
            self.wandb.log(metrics)
        return {**metrics, "train/step_loss": loss_f}


class _disable_fp8:
    """Swap Float8Linear modules back to plain gpt.Linear for evaluation (no-op without FP8 layers)."""

    def __init__(self, model):
        self.model, self.swapped = model, []

    def __enter__(self):
        for name, mod in list(self.model.named_modules()):
            if "Float8" not in type(mod).__name__:
                continue
            from nanochat.gpt import Linear

            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            plain = Linear(mod.in_features, mod.out_features, bias=False, device="meta", dtype=mod.weight.dtype)
            plain.weight = mod.weight  # shared, not copied
            setattr(parent, attr, plain)
            self.swapped.append((parent, attr, mod))

    def __exit__(self, *exc):
        for parent, attr, mod in self.swapped:
            setattr(parent, attr, mod)
        self.swapped = []


def train(cfg: BaseTrainConfig, sink: TrainSink | None = None) -> dict:
    """Pretrain a base model per cfg; returns final metrics (and this run's per-step losses)."""
    cfg.validate()
    run = _Run(cfg, sink)
    plan, start_step = run.plan, run.step
    losses, tok_rates, mfus, dts = [], [], [], []
    gc_was_enabled = gc.isenabled()
    try:
        while True:
            last = run.step == plan.num_iterations  # one extra pass so the last step evaluates and saves
            if cfg.eval_every > 0 and (last or run.step % cfg.eval_every == 0):
                run.evaluate_val()
            if cfg.core_metric_every > 0 and (last or (run.step > 0 and run.step % cfg.core_metric_every == 0)):
                run.evaluate_core()
            if cfg.sample_every > 0 and run.master and (last or (run.step > 0 and run.step % cfg.sample_every == 0)):
                run.sample()
            periodic = cfg.save_every > 0 and run.step % cfg.save_every == 0
            resumed_at_end = last and run.step == start_step and run.meta is not None  # already saved
            if (last and not resumed_at_end) or (run.step > 0 and run.step != start_step and periodic):
                run.save()
            if last:
                break
            loss_f, lrm, dt = run.train_step()
            metrics = run.log_step(loss_f, lrm, dt)
            losses.append((run.step, loss_f))
            tok_rates.append(metrics["train/tok_per_sec"])
            mfus.append(metrics["train/mfu"])
            dts.append(dt)
            first_step_of_run = run.step == start_step
            run.step += 1
            run.collect_evals()  # asynchronous CORE results that are ready (non-blocking poll)
            run.sink.on_step(run.step, metrics)
            # The cyclic GC pauses for long scans of setup garbage; upstream freezes it after the first step.
            if first_step_of_run:
                gc.collect()
                gc.freeze()
                gc.disable()
            elif run.step % 5000 == 0:
                gc.collect()
    finally:
        gc.unfreeze()
        if gc_was_enabled:
            gc.enable()
    run.collect_evals(wait=True)  # the final CORE (launched at the last step) is always reported
    if run.device_type == "cuda":
        print0(f"Peak memory usage: {torch.cuda.max_memory_allocated() / 1024 / 1024:.2f}MiB")
    else:
        print0("Peak memory usage: 0.00MiB")
    print0(f"Total training time: {run.total_time / 60:.2f}m")
    if run.val_bpb is not None:
        print0(f"Minimum validation bpb: {run.min_val_bpb:.6f}")
    run.wandb.finish()
    steady = slice(min(len(tok_rates) - 1, 2), None) if tok_rates else slice(None)  # skip warm-up steps
    result = {
        "step": run.step, "num_iterations": plan.num_iterations, "start_step": start_step,
        "val_bpb": run.val_bpb, "min_val_bpb": run.min_val_bpb if run.val_bpb is not None else None,
        "total_batch_size": plan.total_batch_size, "grad_accum_steps": plan.grad_accum_steps,
        "world_size": run.world, "checkpoint_dir": run.checkpoint_dir, "losses": losses,
        "tok_per_sec": _mean(tok_rates[steady]), "mfu": _mean(mfus[steady]), "total_training_time": run.total_time,
        "step_times": dts, "flops_per_token": plan.flops_per_token, "peak_flops": run.peak.value,
        "core_metrics": sorted(run.core_history),
        "core_metric": max(run.core_history)[1] if run.core_history else None,  # the latest step's
    }  # fmt: skip
    compute_cleanup()
    return result


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def train_model_state(result: dict, device="cpu") -> dict:
    """The final model state dict of a finished run (loaded from its last checkpoint); handy for comparisons."""
    from nanochat.checkpoint_manager import load_checkpoint

    model_data, _, _ = load_checkpoint(result["checkpoint_dir"], result["step"], device)
    return model_data
