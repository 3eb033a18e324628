"""
Supervised fine-tuning as a plain function of a config: `sft(SFTConfig(...), sink=None) -> dict`.

Behaviour follows upstream nanochat's scripts/chat_sft.py (spec §3.6, §6.5, §7.3, §10.3): load the base model,
inherit batch and LR settings from its checkpoint meta (printing what was inherited or overridden), optionally
warm-start the optimizer, train on a task mixture packed best-fit with PADDING (no cropping), val bpb, ChatCORE,
and a checkpoint in `chatsft_checkpoints/<tag>/` at the end. Runs single-process or in Ray Train workers
(ray_jobs/chat_sft.py) through the same `TrainSink` hooks as pretraining.

Mixtures: `upstream` = SmolTalk + MMLU x3 + GSM8K x4 (HuggingFace parquet, needs network once);
`offline` = generated WordChoice + Arithmetic tasks (nanochat/tasks/offline.py), for machines without network.
`--custom-json a.jsonl,b.jsonl` adds conversation files (upstream's CustomJSON format) to either.
Ours beyond upstream: `--save-every` and resume (with the loader's exact position), for fault tolerance on Ray.
"""

import gc
import json
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from nanochat.common import (
    COMPUTE_DTYPE,
    COMPUTE_DTYPE_REASON,
    DummyWandb,
    NanochatError,
    PeakFlops,
    autodetect_device_type,
    compute_cleanup,
    compute_init,
    get_base_dir,
    is_ddp_initialized,
    print0,
)
from nanochat.flash_attention import describe_backend
from nanochat.staging import HostStaging
from nanochat.train import TrainSink, _f, check_batch_divisible
from nanochat.train_config import check_checkpoint_flags


@dataclass
class SFTConfig:
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb logging)")
    device_type: str = _f("", "cuda|cpu|mps (empty = autodetect)")
    model_tag: str | None = _f(None, "base model tag to load from (default: the largest)")
    model_step: int | None = _f(None, "base model step to load from (default: the last)")
    load_optimizer: int = _f(1, "warm-start optimizer from pretrained checkpoint (0=no, 1=yes)")
    num_iterations: int = _f(-1, "number of optimization steps (-1 = full epoch)")
    max_seq_len: int | None = _f(None, "max context length (default: inherit from pretrain)")
    device_batch_size: int | None = _f(None, "per-device batch size (default: inherit from pretrain)")
    total_batch_size: int | None = _f(None, "total batch size in tokens (default: inherit from pretrain)")
    embedding_lr: float | None = _f(None, "learning rate for embedding parameters (Adam) (default: inherit)")
    unembedding_lr: float | None = _f(None, "learning rate for unembedding parameters (Adam) (default: inherit)")
    matrix_lr: float | None = _f(None, "learning rate for matrix parameters (Muon) (default: inherit)")
    init_lr_frac: float = _f(0.8, "initial LR as fraction of base LR")
    warmup_ratio: float = _f(0.0, "ratio of iterations for LR warmup")
    warmdown_ratio: float = _f(0.5, "ratio of iterations for LR warmdown")
    final_lr_frac: float = _f(0.0, "final LR as fraction of initial LR")
    eval_every: int = _f(200, "evaluate val bpb every N steps (-1 = disable)")
    eval_tokens: int = _f(40 * 524288, "number of tokens to evaluate val loss on")
    chatcore_every: int = _f(200, "evaluate ChatCORE metric every N steps (-1 = disable)")
    chatcore_max_cat: int = _f(-1, "max problems per categorical task for ChatCORE")
    chatcore_max_sample: int = _f(24, "max problems per generative task for ChatCORE")
    mmlu_epochs: int = _f(3, "number of epochs of MMLU in training mixture (teaches Multiple Choice)")
    gsm8k_epochs: int = _f(4, "number of epochs of GSM8K in training mixture (teaches Math and Tool Use)")
    # --- ours
    mixture: str = _f("upstream", "upstream (SmolTalk+MMLU+GSM8K, network) | offline (generated tasks)")
    offline_size: int = _f(20000, "examples per generated task in the offline mixture (test split: 1/10)")
    custom_json: str = _f("", "comma-separated CustomJSON .jsonl files to add to the mixture")
    save_every: int = _f(-1, "also save every N steps (-1 = only at the end, as upstream)")
    save_every_minutes: float = _f(-1.0, "also save every M minutes, converted to steps from the measured step "
                                         "time (-1 = off)")
    keep_checkpoints: int = _f(2, "retention: keep this run's newest K checkpoints plus the final one (-1 = all)")
    background_save: int = _f(1, "1: copy the state to host memory and write it in the background; 0: block")
    resume_from_step: int = _f(-1, "resume SFT from this chatsft checkpoint step (-1 = disable)")
    compile: int = _f(-1, "torch.compile the model: 1/0, -1 = auto (on for CUDA)")

    def __post_init__(self):
        if self.device_type not in ("", "cuda", "cpu", "mps"):
            raise NanochatError(f"--device-type {self.device_type!r} is unknown: use cuda, cpu, mps or leave empty")
        if self.mixture not in ("upstream", "offline"):
            raise NanochatError(f"--mixture {self.mixture!r} is unknown: use upstream or offline")
        for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise NanochatError(f"--{name.replace('_', '-')} must be positive (got {v})")
        if not 0 <= self.warmup_ratio <= 1 or not 0 <= self.warmdown_ratio <= 1:
            raise NanochatError("--warmup-ratio and --warmdown-ratio must be in [0, 1]")
        check_checkpoint_flags(self.save_every_minutes, self.keep_checkpoints)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SFTConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NanochatError(f"unknown SFTConfig keys {sorted(unknown)}")
        return cls(**d)


# (name, fallback, where in the base meta) -- upstream's inheritance table; its unembedding fallback is 0.004
INHERITED = (("max_seq_len", 2048, "meta"), ("device_batch_size", 32, "meta"), ("total_batch_size", 524288, "meta"),
             ("embedding_lr", 0.3, "user"), ("unembedding_lr", 0.004, "user"), ("matrix_lr", 0.02, "user"))


def inherit_from_base(cfg: SFTConfig, meta: dict) -> SFTConfig:
    """Fill None fields from the base checkpoint's meta (None = inherit, a value = override), printing each."""
    sources = {"meta": meta, "user": meta.get("user_config", {})}
    for name, fallback, where in INHERITED:
        value, pretrained = getattr(cfg, name), sources[where].get(name)
        if value is None:
            resolved = pretrained if pretrained is not None else fallback
            setattr(cfg, name, resolved)
            print0(f"Inherited {name}={resolved} from pretrained checkpoint")
        elif pretrained is not None and value != pretrained:
            print0(f"NOTE: --{name.replace('_', '-')}={value} overrides pretrained value of {pretrained}")
        else:
            print0(f"Using {name}={value}")
    return cfg


# -----------------------------------------------------------------------------
# Data: task mixtures and the best-fit PADDED packer


def build_mixtures(cfg: SFTConfig):
    """(train TaskMixture, val TaskMixture) for cfg.mixture (+ --custom-json files in train)."""
    from nanochat.tasks.common import TaskMixture
    from nanochat.tasks.customjson import CustomJSON

    extra = [CustomJSON(p.strip()) for p in cfg.custom_json.split(",") if p.strip()]
    if cfg.mixture == "offline":
        from nanochat.tasks.offline import Arithmetic, WordChoice

        n, n_val = cfg.offline_size, max(1, cfg.offline_size // 10)
        train = [WordChoice(n, "train"), Arithmetic(n, "train"), *extra]
        val = [WordChoice(n_val, "test"), Arithmetic(n_val, "test")]
        print0(f"Training mixture: offline WordChoice + Arithmetic x {n:,} each, {len(extra)} CustomJSON file(s)")
        return TaskMixture(train), TaskMixture(val)
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.mmlu import MMLU
    from nanochat.tasks.smoltalk import SmolTalk

    train = [SmolTalk(split="train"), *[MMLU(subset="all", split="auxiliary_train") for _ in range(cfg.mmlu_epochs)],
             *[GSM8K(subset="main", split="train") for _ in range(cfg.gsm8k_epochs)], *extra]
    val = [SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200), GSM8K(subset="main", split="test",
                                                                                       stop=420)]
    mixture = TaskMixture(train)
    print0(f"Training mixture: {len(mixture):,} rows (MMLU x{cfg.mmlu_epochs}, GSM8K x{cfg.gsm8k_epochs})")
    return mixture, TaskMixture(val)


def sft_batches(dataset, tokenizer, B: int, T: int, rank: int, world: int, device, num_iterations=-1,
                is_train=True, buffer_size=100, state=None):
    """Yields (inputs int32 (B,T), targets int64 (B,T), state) with upstream's best-fit padded packing.

    Each row (capacity T+1) takes the largest buffered conversation that fits whole; when none fits, the rest is
    BOS padding with target -1. This rank reads conversations rank, rank+W, ... (wrapping, epoch + 1). state holds
    the position after this batch, incl. the buffered conversation indices (exact resume), plus `last_step`
    (one epoch consumed, or num_iterations batches) and `progress` in [0, 1] for the LR schedule.
    """
    size = len(dataset)
    if size == 0:
        raise NanochatError("the SFT mixture is empty: check --mixture and --custom-json")
    bos = tokenizer.get_bos_token_id()
    max_tokens = min(2048, T + 1)  # render_conversation's cap (upstream 2048), so every conversation can fit a row
    st = dict(cursor=rank, consumed=rank, epoch=1, it=0, buffer=[])
    if state is not None:
        st.update({k: state[k] for k in ("cursor", "consumed", "epoch", "it", "buffer")})
    buffer = [(i, *tokenizer.render_conversation(dataset[i], max_tokens=max_tokens)) for i in st["buffer"]]
    staging = HostStaging([((B, T), torch.int32), ((B, T), torch.long)], device)
    while True:
        rows, masks, lengths = [], [], []
        for _ in range(B):
            row, mask = [], []
            while True:
                while len(buffer) < buffer_size:  # top up, striding over the dataset
                    i = st["cursor"]
                    buffer.append((i, *tokenizer.render_conversation(dataset[i], max_tokens=max_tokens)))
                    st["cursor"] += world
                    if st["cursor"] >= size:
                        st["cursor"] %= size
                        st["epoch"] += 1
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for j, (_, ids, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best, best_len = j, len(ids)
                if best < 0:
                    break
                _, ids, m = buffer.pop(best)
                row += ids
                mask += m
                st["consumed"] += world
                if len(row) == T + 1:
                    break
            lengths.append(len(row))
            pad = T + 1 - len(row)
            rows.append(row + [bos] * pad)
            masks.append(mask + [0] * pad)
        st["it"] += 1
        batch = torch.tensor(rows, dtype=torch.long)
        targets = batch[:, 1:].clone()
        targets[torch.tensor(masks, dtype=torch.int8)[:, 1:] == 0] = -1  # only supervised tokens count
        for r, n in enumerate(lengths):
            if n < T + 1:
                targets[r, max(n - 1, 0):] = -1  # padding (and the last real token, whose target is padding)
        last = is_train and ((0 < num_iterations <= st["it"]) or st["consumed"] >= size)
        progress = st["it"] / num_iterations if num_iterations > 0 else st["consumed"] / size
        out = {**st, "buffer": [i for i, _, _ in buffer], "last_step": last, "progress": min(progress, 1.0)}
        # pinned, asynchronous copies on CUDA that never overwrite a buffer still being read (nanochat/staging.py)
        yield *staging.put_copies(batch[:, :-1], targets), out


# -----------------------------------------------------------------------------
# Schedules (progress-based LR, step-based Muon momentum; no weight decay)


def sft_lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def sft_muon_momentum(it: int) -> float:
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------
# Chat evaluation during SFT


def chat_eval(cfg: SFTConfig, model, tokenizer, batch_size: int) -> dict:
    """Accuracy per task: upstream's ChatCORE tasks, or the offline tasks' held-out splits."""
    from nanochat.chat_eval import run_categorical_eval, run_chat_eval, run_generative_eval
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    max_cat = None if cfg.chatcore_max_cat < 0 else cfg.chatcore_max_cat
    max_sample = None if cfg.chatcore_max_sample < 0 else cfg.chatcore_max_sample
    if cfg.mixture == "offline":
        from nanochat.tasks.offline import Arithmetic, WordChoice

        n = max(1, cfg.offline_size // 10)
        return {
            "WordChoice": run_categorical_eval(WordChoice(n, "test"), tokenizer, model, batch_size, max_cat),
            "Arithmetic": run_generative_eval(Arithmetic(n, "test"), tokenizer, model, engine, 1, 64, 0.0, 50,
                                              max_sample),
        }
    from nanochat.chat_eval import ALL_TASKS, CATEGORICAL_TASKS

    return {t: run_chat_eval(t, model, tokenizer, engine, batch_size=batch_size,
                             max_problems=max_cat if t in CATEGORICAL_TASKS else max_sample) for t in ALL_TASKS}


OFFLINE_BASELINES = {"WordChoice": 0.25, "Arithmetic": 0.0}


def centered(results: dict, categorical_only=False) -> float:
    from nanochat.chat_eval import BASELINE_ACCURACIES, CATEGORICAL_TASKS

    base = {**BASELINE_ACCURACIES, **OFFLINE_BASELINES}
    tasks = [t for t in results if not categorical_only or t in (*CATEGORICAL_TASKS, "WordChoice")]
    return sum((results[t] - base[t]) / (1 - base[t]) for t in tasks) / max(len(tasks), 1)


# -----------------------------------------------------------------------------
# The loop


def sft_checkpoint_dir(cfg: SFTConfig, depth: int) -> str:
    from nanochat import storage

    return storage.join(get_base_dir(), "chatsft_checkpoints", cfg.model_tag if cfg.model_tag else f"d{depth}")


def _load_base(cfg: SFTConfig, device, sink: TrainSink):
    """(model, tokenizer, base meta, resume (dir, step, meta) or None). A resume loads our own SFT checkpoint."""
    from nanochat.checkpoint_manager import build_model, load_model

    model, tokenizer, meta = load_model("base", device, phase="train", model_tag=cfg.model_tag, step=cfg.model_step)
    out_dir = sft_checkpoint_dir(cfg, model.config.n_layer)
    step = sink.resume_step(out_dir)
    step = cfg.resume_from_step if step is None else step
    if step is None or step < 0:
        return model, tokenizer, meta, None
    print0(f"Resuming SFT from {out_dir} step {step}")
    model, tokenizer, sft_meta = build_model(out_dir, step, device, phase="train")
    return model, tokenizer, meta, (out_dir, step, sft_meta)


def _setup_optimizer(cfg, model, resume, device, rank, world):
    from nanochat.checkpoint_manager import load_optimizer_state
    from nanochat.train import load_optimizer_for_world

    optimizer = model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                      matrix_lr=cfg.matrix_lr, weight_decay=0.0)
    fresh_lrs = [g["lr"] for g in optimizer.param_groups]
    if resume is not None:
        out_dir, step, meta = resume
        load_optimizer_for_world(optimizer, out_dir, step, meta, device, rank, world)
        for g, lr in zip(optimizer.param_groups, fresh_lrs):
            g["lr"], g["initial_lr"] = lr * cfg.init_lr_frac, lr * cfg.init_lr_frac
        return optimizer
    if cfg.load_optimizer:
        # momentum buffers from pretraining; load_state_dict also restores the (warmed-down) LRs, so reset them
        data = load_optimizer_state("base", device, rank=rank, model_tag=cfg.model_tag, step=cfg.model_step)
        if data is not None:
            try:
                optimizer.load_state_dict(data)
                print0("Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)")
            except NanochatError as e:  # written by a different world size
                print0(f"WARNING: not warm-starting the optimizer: {e}")
            for g, lr in zip(optimizer.param_groups, fresh_lrs):
                g["lr"] = lr
        else:
            print0("WARNING: optimizer checkpoint not found, starting with fresh optimizer (slightly worse)")
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * cfg.init_lr_frac
        g["initial_lr"] = g["lr"]
    return optimizer


def sft(cfg: SFTConfig, sink: TrainSink | None = None) -> dict:
    """Fine-tune the base model per cfg; returns final metrics (val bpb, chat eval, per-step losses)."""
    sink = sink or TrainSink()
    device_type = cfg.device_type or autodetect_device_type()
    ddp, rank, _, world, device = compute_init(device_type)
    master = rank == 0
    sync = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    peak = PeakFlops(device)
    if cfg.run == "dummy" or not master:
        wandb_run = DummyWandb()
    else:
        import wandb

        wandb_run = wandb.init(project="nanochat-sft", name=cfg.run, config=cfg.to_dict())
    model, tokenizer, base_meta, resume = _load_base(cfg, device, sink)
    cfg = inherit_from_base(SFTConfig(**cfg.to_dict()), base_meta)
    orig_model = model
    print0(describe_backend())  # look FA3 up before torch.compile (not inside dynamo tracing: a graph break)
    if cfg.compile == 1 or (cfg.compile == -1 and device_type == "cuda"):
        model = torch.compile(model, dynamic=False)
    depth = orig_model.config.n_layer
    flops_per_token = orig_model.estimate_flops()
    B, T = cfg.device_batch_size, cfg.max_seq_len
    grad_accum = check_batch_divisible(cfg.total_batch_size, B, T, world)
    print0(f"Tokens / micro-batch / rank: {B} x {T} = {B * T:,}")
    print0(f"Tokens / micro-batch: {B * T * world:,}")
    print0(f"Total batch size {cfg.total_batch_size:,} => gradient accumulation steps: {grad_accum}")
    from nanochat.tokenizer import get_token_bytes

    token_bytes = get_token_bytes(device=device)
    optimizer = _setup_optimizer(cfg, orig_model, resume, device, rank, world)
    scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None
    train_ds, val_ds = build_mixtures(cfg)
    out_dir = sft_checkpoint_dir(cfg, depth)

    step, min_val_bpb, val_bpb, smooth, total_time, progress, data_state = 0, float("inf"), None, 0.0, 0.0, 0.0, None
    if resume is not None:
        meta = resume[2]
        step, val_bpb = meta["step"], meta.get("val_bpb")
        loop = meta["loop_state"]
        min_val_bpb, smooth, total_time, progress = (loop["min_val_bpb"], loop["smooth_train_loss"],
                                                     loop["total_training_time"], loop["progress"])
        states = meta.get("dataloader_state_dicts") or []
        data_state = states[rank] if len(states) == world else None
        if data_state is None:
            print0("WARNING: SFT data position saved by another world size; restarting the epoch's stream")
    start_step = step
    chat_history = []  # (step, ChatCORE) of this run
    pending = set()  # ("chat", step) launched asynchronously and not reported yet: recorded in checkpoints
    from nanochat.checkpoint_saver import Checkpointing

    ckpt = Checkpointing(out_dir, rank, device, sink, start_step, resumed=resume is not None,
                         save_every=cfg.save_every, save_every_minutes=cfg.save_every_minutes,
                         keep=cfg.keep_checkpoints, background=bool(cfg.background_save),
                         protect=lambda: {s for _, s in pending})  # fmt: skip

    def make_save(why):
        loop_state = {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth, "total_training_time": total_time,
                      "progress": progress}
        return _save_parts(cfg, sink, out_dir, step, orig_model, optimizer, tokenizer, val_bpb, consumed_state, ddp,
                           world, loop_state, sorted(pending))

    def report_chat(at_step, res, now):
        """Print / log / hand to the sink the chat eval of the model at `at_step` (maybe known only at `now`)."""
        for task, acc in res.items():
            print0(f"  {task}: {100 * acc:.2f}%")
        core, core_cat = centered(res), centered(res, categorical_only=True)
        chat_history.append((at_step, core))
        pending.discard(("chat", at_step))
        late = f" (ready at step {now})" if at_step != now else ""
        print0(f"Step {at_step:05d} | ChatCORE: {core:.4f} | ChatCORE_cat: {core_cat:.4f}{late}")
        wandb_run.log({"step": at_step, "total_training_flops": flops_per_token * cfg.total_batch_size * at_step,
                       "chatcore_metric": core, "chatcore_cat": core_cat, **{f"chatcore/{t}": a for t, a in res.items()}})
        sink.on_eval(at_step, {"step": at_step, "chatcore_metric": core})

    def collect_evals(now, wait=False):
        """Report asynchronous chat evals that finished; returns the latest step's results, if any arrived."""
        latest = None
        for kind, at_step, res in sorted(sink.finished_evals(wait), key=lambda e: e[1]):
            if kind == "chat":
                report_chat(at_step, res, now)
                latest = res
        return latest

    train_loader = sft_batches(train_ds, tokenizer, B, T, rank, world, device, cfg.num_iterations, state=data_state)
    x, y, st = next(train_loader)
    consumed_state = data_state
    for kind, at_step in (resume[2].get("pending_evals", []) if resume is not None else []):
        # launched by the previous worker group and lost with it: again, from that step's checkpoint (the step we
        # resume from is evaluated again by the loop anyway)
        from nanochat.checkpoint_manager import complete_steps

        if kind == "chat" and at_step != step and at_step in complete_steps(out_dir) and sink.relaunch_eval(
                kind, at_step, out_dir, device, {"cfg": cfg, "batch_size": B}):
            pending.add((kind, at_step))
            print0(f"Step {at_step:05d} | chat evaluation relaunched after a restart")
    last_step, losses, results = st["last_step"], [], {}
    gc_was_enabled = gc.isenabled()
    try:
        while True:
            flops_so_far = flops_per_token * cfg.total_batch_size * step
            if ddp and is_ddp_initialized():  # every rank must stop at the same step
                flag = torch.tensor(int(last_step), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                last_step = bool(flag.item())
            if last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                from nanochat.loss_eval import evaluate_bpb

                model.eval()
                val = ((a, b) for a, b, _ in sft_batches(val_ds, tokenizer, B, T, rank, world, device, is_train=False))
                val_bpb = evaluate_bpb(model, val, cfg.eval_tokens // (B * T * world), token_bytes)
                print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
                min_val_bpb = min(min_val_bpb, val_bpb)
                wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_time,
                               "val/bpb": val_bpb})
                sink.on_eval(step, {"step": step, "val/bpb": val_bpb})
                model.train()
            if cfg.chatcore_every > 0 and (last_step or (step > 0 and step % cfg.chatcore_every == 0)):
                orig_model.eval()
                got = sink.chat_metric(cfg, orig_model, tokenizer, device, step, B)
                if got is None:
                    got = chat_eval(cfg, orig_model, tokenizer, B)
                if got.get("pending"):  # launched asynchronously: reported below when ready
                    pending.add(("chat", step))  # its weights must survive a restart: save this step
                else:
                    results = got
                    report_chat(step, results, step)
                orig_model.train()
            ckpt.before_step(step, last_step, make_save, force="eval" if ("chat", step) in pending else None)
            if last_step:
                break
            # ---- one optimizer step
            sync()
            t0 = time.time()
            loss_sum = torch.zeros((), device=device)
            for _ in range(grad_accum):
                loss = model(x, y)
                loss_sum += loss.detach()
                loss = loss / grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                consumed_state = st
                x, y, st = next(train_loader)
                progress, last_step = max(progress, st["progress"]), st["last_step"]
            lrm = sft_lr_multiplier(progress, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lrm
                if g["kind"] == "muon":
                    g["momentum"] = sft_muon_momentum(step)
            if scaler is not None:
                scaler.unscale_(optimizer)
                if is_ddp_initialized():
                    for v in scaler._found_inf_per_device(optimizer).values():
                        dist.all_reduce(v, op=dist.ReduceOp.MAX)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            model.zero_grad(set_to_none=True)
            step_loss = loss_sum / grad_accum
            if ddp and is_ddp_initialized():
                dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
                step_loss /= world
            loss_f = step_loss.item()
            sync()
            dt = time.time() - t0
            losses.append((step, loss_f))
            step += 1
            ckpt.after_step(step)  # completes a background save whose shards all landed (non-blocking)
            # ---- logging
            smooth = 0.9 * smooth + 0.1 * loss_f
            debiased = smooth / (1 - 0.9 ** (step + 1))
            tok_per_sec = int(cfg.total_batch_size / dt)
            mfu = 100 * flops_per_token * cfg.total_batch_size / dt / (peak.current() * world)
            if step > 10:
                total_time += dt
            print0(f"step {step:05d} ({100 * progress:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: "
                   f"{dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {st['epoch']} | "
                   f"total time: {total_time / 60:.2f}m")
            metrics = {"step": step, "total_training_flops": flops_so_far, "total_training_time": total_time,
                       "train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                       "train/mfu": mfu, "train/epoch": st["epoch"]}
            if step % 10 == 0:
                wandb_run.log(metrics)
            collect_evals(step)  # asynchronous chat evals that are ready (non-blocking poll)
            sink.on_step(step, {**metrics, "train/step_loss": loss_f})
            if step == start_step + 1:
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % 5000 == 0:
                gc.collect()
    finally:
        gc.unfreeze()
        if gc_was_enabled:
            gc.enable()
    ckpt.close()  # the final checkpoint is complete (and announced) before the run reports its result
    final = collect_evals(step, wait=True)  # the last step's chat eval is always reported
    if final is not None:
        results = final
    print0(f"Peak memory usage: {torch.cuda.max_memory_allocated() / 2**20 if device_type == 'cuda' else 0:.2f}MiB")
    print0(f"Total training time: {total_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.4f}")
    wandb_run.finish()
    compute_cleanup()
    return {"step": step, "start_step": start_step, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb,
            "chat_eval": results, "chatcore_metrics": sorted(chat_history), "losses": losses, "checkpoint_dir": out_dir, "world_size": world,
            "grad_accum_steps": grad_accum, "save_stalls": ckpt.stalls, "saved_steps": ckpt.saver.saved_steps}


def _save_parts(cfg, sink, out_dir, step, model, optimizer, tokenizer, val_bpb, data_state, ddp, world, loop_state,
                pending_evals):
    """(model state, optimizer state, meta, on_complete) of an SFT checkpoint (every rank; gathers data states)."""
    states = [data_state]
    if ddp and is_ddp_initialized():
        states = [None] * world
        dist.all_gather_object(states, data_state)
    c = model.config
    meta = {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": {"sequence_len": cfg.max_seq_len, "vocab_size": tokenizer.get_vocab_size(),
                         "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
                         "window_pattern": c.window_pattern},
        "user_config": cfg.to_dict(),
        # ours: resume support
        "loop_state": loop_state,
        "world_size": world,
        "dataloader_state_dicts": states,
        "pending_evals": pending_evals,
        **sink.checkpoint_meta(),
    }

    def on_complete(_):
        sink.on_checkpoint(step, out_dir, {"step": step, "val_bpb": val_bpb})

    return model.state_dict(), optimizer.state_dict(), json.loads(json.dumps(meta)), on_complete
