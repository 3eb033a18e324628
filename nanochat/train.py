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
- `uneven_batch=1` lets a world size the batch does not divide over deal out the micro-batches unevenly (the step
  is still their mean), which elastic Ray runs use after shrinking;
- `data="synthetic"` is a seeded token stream whose batches do not depend on the world size (tests, benchmarks).

Run single-process (CPU example, like upstream's docstring):
    python -m ray_jobs.base_train --num-workers 0 --depth=4 --max-seq-len=512 --device-batch-size=1 \
        --eval-tokens=512 --core-metric-every=-1 --total-batch-size=512 --num-iterations=20

Module layout: nanochat/train_config.py (config, plan, schedules), nanochat/train_io.py (sink, data, checkpoint
location), this file (the loop). Their public names stay importable from here.
"""

import gc
import json
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.common import (
    COMPUTE_DTYPE,
    COMPUTE_DTYPE_REASON,
    CPU_EAGER_MFU,
    DummyWandb,
    PeakFlops,
    autodetect_device_type,
    compile_choice,
    compute_cleanup,
    compute_init,
    is_ddp_initialized,
    print0,
)
from nanochat.train_config import (
    B_REF,
    BaseTrainConfig,
    Plan,
    _f,
    build_model_meta,
    check_batch_divisible,
    derive_plan,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    plan_for,
    print_plan,
    rank_share,
    scaling_params,
)
from nanochat.train_io import (
    PENDING,
    TrainSink,
    _load_tokenizer,
    _make_loaders,
    _saved_world_size,
    checkpoint_dir_for,
    load_optimizer_for_world,
    synthetic_loader,
)

__all__ = [  # re-exported: tests, sft/rl and ray_jobs import these from nanochat.train
    "B_REF", "PENDING", "SAMPLE_PROMPTS", "BaseTrainConfig", "Plan", "TrainSink", "_f", "_saved_world_size",
    "build_model_meta", "check_batch_divisible", "checkpoint_dir_for", "derive_plan", "load_optimizer_for_world",
    "lr_multiplier", "muon_momentum", "muon_weight_decay", "plan_for", "print_plan", "scaling_params",
    "synthetic_loader", "train", "train_model_state",
]

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


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
        from nanochat.checkpoint_saver import Checkpointing

        self.ckpt = Checkpointing(self.checkpoint_dir, self.rank, self.device, self.sink, self.step,
                                  resumed=self.meta is not None, save_every=cfg.save_every,
                                  save_every_minutes=cfg.save_every_minutes, keep=cfg.keep_checkpoints,
                                  background=bool(cfg.background_save),
                                  protect=lambda: {s for _, s in self.pending_evals})  # fmt: skip

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
        self.pending_evals = set()  # (kind, step) launched asynchronously and not reported yet
        self.lost_evals = []  # (kind, step) the previous worker group never reported: relaunched at the start
        self.smooth_loss, self.total_time = 0.0, 0.0
        if self.meta is not None:
            meta = self.meta
            load_optimizer_for_world(self.optimizer, self.checkpoint_dir, self.resume_step, meta, self.device,
                                     self.rank, self.world)
            self.step, self.val_bpb = meta["step"], meta.get("val_bpb")
            self.lost_evals = [tuple(e) for e in meta.get("pending_evals", [])]
            loop = meta["loop_state"]
            self.min_val_bpb = loop["min_val_bpb"]
            self.smooth_loss, self.total_time = loop["smooth_train_loss"], loop["total_training_time"]
            # every rank's position when we wrote it (exact resume); upstream checkpoints only have rank 0's
            states = meta.get("dataloader_state_dicts")
            data_state = {"ranks": states} if states else meta.get("dataloader_state_dict")
        self.train_loader, self.build_val_loader = _make_loaders(
            cfg, self.tokenizer, self.vocab_size, self.device, self.rank, self.world, data_state, self.sink,
            self.plan.micro_batches)
        self.x, self.y, self.data_state = next(self.train_loader)  # kick off the first batch
        # position after the last batch trained on: what a checkpoint records, so a resume continues right after it
        self.consumed_state = data_state
        B, T = cfg.device_batch_size, cfg.max_seq_len
        print0(f"Tokens / micro-batch / rank: {B} x {T} = {B * T:,}")
        print0(f"Tokens / micro-batch: {B * T * self.world:,}")
        print0(f"Total batch size {self.plan.total_batch_size:,} => gradient accumulation steps: "
               f"{self.plan.grad_accum_steps}")
        # this rank's micro-steps, and the divisor that makes the ranks' averaged gradients the mean over all of them
        m = self.plan.micro_batches
        self.micro_steps, self.loss_div = rank_share(m, self.world, self.rank), m / self.world
        if m % self.world:
            busy = "rank 0 runs" if m % self.world == 1 else f"ranks 0-{m % self.world - 1} run"
            print0(f"Uneven batch: {m} micro-batches over {self.world} workers: {busy} {m // self.world + 1} "
                   f"micro-steps, the others {m // self.world} (--uneven-batch)")

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
        if results.get("pending"):  # launched asynchronously: collect_evals reports it when ready
            self.pending_evals.add(("core", self.step))
            return True
        self.report_core(self.step, results)
        return False

    def relaunch_lost_evals(self):
        """Asynchronous evaluations the previous worker group launched and never reported (their tasks died with
        it): launch them again from their step's checkpoint (saved because of them, and kept by retention)."""
        from nanochat.checkpoint_manager import complete_steps

        for kind, step in self.lost_evals:
            if kind != "core" or step == self.step:
                continue  # an evaluation of the step we resume from runs again in the loop anyway
            if step in complete_steps(self.checkpoint_dir) and self.sink.relaunch_eval(
                    kind, step, self.checkpoint_dir, self.device, {"max_per_task": self.cfg.core_metric_max_per_task}):
                print0(f"Step {step:05d} | CORE evaluation relaunched after a restart")
                self.pending_evals.add((kind, step))
            else:
                print0(f"WARNING: the step-{step} CORE evaluation was lost in a restart and cannot be relaunched")
        self.lost_evals = []

    def report_core(self, step: int, results: dict):
        """Print / log / hand to the sink the CORE result of the model at `step` (maybe a later step's news)."""
        self.pending_evals.discard(("core", step))
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

    def make_save(self, why: str):
        """What Checkpointing saves now: (model state, optimizer state, meta, on_complete). Every rank."""
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
            "pending_evals": sorted(self.pending_evals),  # relaunched after a restart from this checkpoint
            **self.sink.checkpoint_meta(),
        }
        step, val_bpb = self.step, self.val_bpb

        def on_complete(_):  # every rank, once the step is complete on storage (maybe a few steps later)
            self.sink.on_checkpoint(step, self.checkpoint_dir, {"step": step, "val_bpb": val_bpb})

        return self.orig_model.state_dict(), self.optimizer.state_dict(), meta, on_complete

    def _flops_so_far(self, step: int | None = None):
        return self.plan.flops_per_token * self.plan.total_batch_size * (self.step if step is None else step)

    # ---- one optimizer step

    def train_step(self):
        """Forward/backward over the accumulation micro-steps, then the optimizer step. Returns (loss, lrm, dt)."""
        plan, cfg = self.plan, self.cfg
        self.sync()
        t0 = time.time()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.micro_steps):
            loss = self.model(self.x, self.y)
            loss_sum += loss.detach()
            loss = loss / self.loss_div  # each backward adds to .grad; the optimizer then averages over ranks
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
        step_loss = loss_sum / self.loss_div
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
    run.relaunch_lost_evals()
    losses, tok_rates, mfus, dts = [], [], [], []
    gc_was_enabled = gc.isenabled()
    try:
        while True:
            last = run.step == plan.num_iterations  # one extra pass so the last step evaluates and saves
            if cfg.eval_every > 0 and (last or run.step % cfg.eval_every == 0):
                run.evaluate_val()
            force = None
            if cfg.core_metric_every > 0 and (last or (run.step > 0 and run.step % cfg.core_metric_every == 0)):
                if run.evaluate_core():
                    force = "eval"  # its weights must survive a restart, to relaunch the evaluation
            if cfg.sample_every > 0 and run.master and (last or (run.step > 0 and run.step % cfg.sample_every == 0)):
                run.sample()
            run.ckpt.before_step(run.step, last, run.make_save, force=force)
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
            run.ckpt.after_step(run.step)  # completes a background save whose shards all landed (non-blocking)
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
    run.ckpt.close()  # the final checkpoint is complete (and announced) before the run reports its result
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
        "save_stalls": run.ckpt.stalls, "saved_steps": run.ckpt.saver.saved_steps,
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
