"""
Reinforcement learning on GSM8K as a plain function of a config: `rl(RLConfig(...), sink=None) -> dict`.

Behaviour follows upstream nanochat's scripts/chat_rl.py (NANOCHAT_SPEC §3.7, §10.4): a simplified GRPO that is
really REINFORCE with a group baseline -- no KL term, fully on-policy (no PPO ratio/clip), token-level (DAPO-style)
normalisation, advantage = reward - mean(reward of the question's samples), no std division. Per step every rank
takes its next `examples_per_step / world` training questions, samples `num_samples` completions of each with the
Engine (calculator tool on), scores them with the task's reward (1.0 = correct '#### N' answer), and accumulates the
policy gradient; then one optimizer step with a linear LR ramp-down to zero. pass@k on the test split every
`eval_every` steps; the model (no optimizer state) goes to `chatrl_checkpoints/<tag>/` every `save_every` steps and
at the last step. File step numbers are upstream's: checkpoint N holds the weights after the update of step N.

Launchers steer the loop through nanochat.train.TrainSink (Ray Train: ray_jobs/chat_rl.py). Differences from
upstream, none of which change the default run's numbers:
- pass@k is also evaluated once after the last step (upstream only before steps 0, 60, ...), so a run reports
  where it ended; `--eval-every <= 0` disables evaluation, `--save-every <= 0` saves only at the end;
- evaluation uses `--max-new-tokens` and `--top-k` (upstream hard-codes 256 and 50, the flags' defaults);
- the checkpoint meta also records step, user_config and the launcher (upstream: model_config only), and a sink
  may resume a killed run from the newest chatrl checkpoint (weights only: the optimizer restarts, as RL saves none);
- ours: `--task` (gsm8k | spellingbee | arithmetic: the offline generated task, no network), `--num-iterations` (override the derived horizon), `--seed` (added to
  every rollout seed; 0 = upstream's seeds).

Run single-process: python -m ray_jobs.chat_rl --num-workers 0
"""

import json
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from nanochat.common import (
    DummyWandb,
    NanochatError,
    autodetect_device_type,
    compute_cleanup,
    compute_init,
    get_base_dir,
    is_ddp_initialized,
    print0,
)
from nanochat.train import TrainSink, _f
from nanochat.train_config import check_checkpoint_flags

# -----------------------------------------------------------------------------
# Config: upstream chat_rl's flags and defaults, then a few of ours


@dataclass
class RLConfig:
    # Logging
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb logging)")
    # Runtime
    device_type: str = _f("", "cuda|cpu|mps (empty = autodetect)")
    # Model loading
    model_tag: str | None = _f(None, "model tag to load from (and to save under)")
    model_step: int | None = _f(None, "model step to load from")
    # Training horizon
    num_epochs: int = _f(1, "number of epochs over GSM8K")
    # Batch sizes / sampling
    device_batch_size: int = _f(8, "max batch size per forward pass")
    examples_per_step: int = _f(16, "total examples per optimization step across all ranks")
    num_samples: int = _f(16, "number of samples per example/question")
    # Generation
    max_new_tokens: int = _f(256, "max tokens to generate per sample")
    temperature: float = _f(1.0, "sampling temperature")
    top_k: int = _f(50, "top-k sampling (0 = disabled)")
    # Optimization
    embedding_lr: float = _f(0.2, "learning rate for embedding parameters (Adam)")
    unembedding_lr: float = _f(0.004, "learning rate for unembedding parameters (Adam)")
    matrix_lr: float = _f(0.02, "learning rate for matrix parameters (Muon)")
    weight_decay: float = _f(0.0, "weight decay for embedding/unembedding parameters (Adam)")
    init_lr_frac: float = _f(0.05, "initial LR as fraction of base LR")
    # Evaluation / checkpointing
    eval_every: int = _f(60, "evaluate pass@k every N steps (<= 0: never)")
    eval_examples: int = _f(400, "number of examples for pass@k evaluation")
    save_every: int = _f(60, "save checkpoint every N steps (<= 0: only at the end)")
    # --- ours (not upstream flags)
    task: str = _f("gsm8k", "RL task with a reward: gsm8k (upstream) | spellingbee | arithmetic (offline)")
    num_iterations: int = _f(-1, "number of optimization steps (-1 = epochs x train examples / examples-per-step)")
    seed: int = _f(0, "added to every rollout seed (0 = upstream's seeds)")
    save_every_minutes: float = _f(-1.0, "also save every M minutes, converted to steps from the measured step "
                                         "time (-1 = off)")
    keep_checkpoints: int = _f(2, "retention: keep this run's newest K checkpoints plus the final one (-1 = all)")
    background_save: int = _f(1, "1: copy the weights to host memory and write them in the background; 0: block")

    def __post_init__(self):
        if isinstance(self.model_step, str):  # argparse hands `int | None` fields over as strings
            try:
                self.model_step = int(self.model_step)
            except ValueError:
                raise NanochatError(f"--model-step must be an integer (got {self.model_step!r})") from None
        self.validate()

    def validate(self, world_size: int | None = None):
        """Reject bad flag values with a message that names the flag. world_size adds the divisibility check."""
        for name in ("num_epochs", "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise NanochatError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.num_samples % self.device_batch_size != 0:
            raise NanochatError(
                f"--num-samples ({self.num_samples}) must be a multiple of --device-batch-size "
                f"({self.device_batch_size}): samples are drawn and trained on in batches of --device-batch-size"
            )
        if self.temperature < 0:
            raise NanochatError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise NanochatError(f"--top-k must be >= 0 (0 = disabled; got {self.top_k})")
        if self.eval_examples < 1:
            raise NanochatError(f"--eval-examples must be >= 1 (got {self.eval_examples})")
        if self.device_type not in ("", "cuda", "cpu", "mps"):
            raise NanochatError(f"--device-type {self.device_type!r} is unknown: use cuda, cpu, mps or leave empty")
        if self.task not in RL_TASKS:
            raise NanochatError(f"--task {self.task!r} is unknown: use one of {', '.join(sorted(RL_TASKS))}")
        if self.model_step is not None and self.model_step < 0:
            raise NanochatError(f"--model-step must be >= 0 (got {self.model_step})")
        check_checkpoint_flags(self.save_every_minutes, self.keep_checkpoints)
        if world_size is not None and self.examples_per_step % world_size != 0:
            raise NanochatError(
                f"--examples-per-step ({self.examples_per_step}) must be divisible by the number of workers "
                f"({world_size}): change --examples-per-step or the number of workers"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RLConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NanochatError(f"unknown RLConfig keys {sorted(unknown)}")
        return cls(**d)


def _gsm8k_tasks():
    from nanochat.tasks.gsm8k import GSM8K

    return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")


def _spellingbee_tasks():
    from nanochat.tasks.spellingbee import SpellingBee

    return SpellingBee(size=80000, split="train"), SpellingBee(size=1000, split="test")


def _arithmetic_tasks():
    """The offline SFT mixture's generated arithmetic (calculator call, then '#### N'), sized like GSM8K's splits."""
    from nanochat.tasks.offline import Arithmetic

    return Arithmetic(size=7473, split="train"), Arithmetic(size=1319, split="test")


# task name -> () -> (train task, val task); each task has reward() (training) and evaluate() (pass@k)
RL_TASKS = {"gsm8k": _gsm8k_tasks, "spellingbee": _spellingbee_tasks, "arithmetic": _arithmetic_tasks}


def load_tasks(name: str):
    return RL_TASKS[name]()


def num_steps_for(cfg: RLConfig, num_train_examples: int) -> int:
    """Upstream's horizon: whole steps per epoch times epochs (7473 // 16 = 467 for GSM8K), unless overridden."""
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    steps = (num_train_examples // cfg.examples_per_step) * cfg.num_epochs
    if steps < 1:
        raise NanochatError(
            f"the {cfg.task} training set has {num_train_examples} examples, fewer than --examples-per-step "
            f"{cfg.examples_per_step}: lower --examples-per-step or set --num-iterations"
        )
    return steps


def lr_multiplier(step: int, num_steps: int) -> float:
    """Linear ramp from 1 at step 0 down toward 0 at num_steps."""
    return 1.0 - step / num_steps


def resolve_sft_checkpoint(model_tag: str | None, model_step: int | None) -> tuple[str, int]:
    """(checkpoint_dir, step) of the SFT model to start from; CheckpointNotFoundError names `ray_jobs.chat_sft`."""
    from nanochat import storage
    from nanochat.checkpoint_manager import (
        CheckpointNotFoundError,
        checkpoints_dir_for,
        find_largest_model,
        find_last_step,
    )

    root = checkpoints_dir_for("sft")
    tag = model_tag if model_tag is not None else find_largest_model(root)
    checkpoint_dir = storage.join(root, tag)
    if not storage.isdir(checkpoint_dir):
        raise CheckpointNotFoundError(
            f"No SFT model tag {tag!r} in {root} (found: {storage.listdir(root) or 'nothing'}); pass --model-tag "
            "with one of those or create it with `python -m ray_jobs.chat_sft`"
        )
    return checkpoint_dir, (model_step if model_step is not None else find_last_step(checkpoint_dir))


# -----------------------------------------------------------------------------
# The math: rollouts -> (inputs, targets, advantages) -> token-normalised policy-gradient loss


def rollout_seed(step: int, example_idx: int, sampling_step: int, seed: int = 0) -> int:
    """Seed of one generate_batch call: upstream's hash of (step, example, sampling step), positive int32.
    Tuples of ints hash the same in every process (no PYTHONHASHSEED salt), so ranks and reruns agree."""
    return (hash((step, example_idx, sampling_step)) + seed) & 0x7FFFFFFF


def advantages_from_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) rewards of one question's samples -> (N,) advantages r - mean(r) (no division by the std)."""
    return rewards - rewards.mean()


def build_rollout_batch(sequences, masks, rewards, pad_id: int, device):
    """Pad one question's samples into training tensors.

    sequences/masks: per sample the prompt + completion ids and the Engine's mask (0 = prompt or forced tool
    output, 1 = sampled). Returns inputs (N, T-1), targets (N, T-1) with -1 where the predicted token was not
    sampled (prompt, tool output, padding), rewards (N,) and advantages (N,). Padding uses pad_id (never trained).
    """
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1  # -1 = ignore_index: the loss is 0 there
    rewards_t = torch.tensor(rewards, dtype=torch.float, device=device)
    return inputs, targets, rewards_t, advantages_from_rewards(rewards_t)


def pg_loss(model, inputs, targets, advantages, num_passes: int, examples_per_rank: int) -> torch.Tensor:
    """Loss of one forward pass (B rows): -sum_t(logp_t * A_row) / (valid tokens * passes * examples per rank).

    Dividing by the pass's valid-token count is DAPO-style token-level normalisation; the other two factors make
    the gradients accumulated over a step's passes and examples an average. On-policy, so no ratio or clipping.
    """
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # (B, T); 0 where target == -1
    objective = (logp * advantages.unsqueeze(-1)).sum()
    num_valid = (targets >= 0).sum().clamp(min=1)
    return -objective / (num_valid * num_passes * examples_per_rank)


# -----------------------------------------------------------------------------
# Sampling and evaluation


@torch.no_grad()
def sample_rollouts(engine, tokenizer, task, conversation, cfg: RLConfig, step: int, example_idx: int):
    """num_samples completions of one question, in device_batch_size chunks. -> (sequences, masks, rewards)."""
    tokens = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for sampling_step in range(cfg.num_samples // cfg.device_batch_size):
        seqs, ms = engine.generate_batch(
            tokens, num_samples=cfg.device_batch_size, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, seed=rollout_seed(step, example_idx, sampling_step, cfg.seed),
        )  # fmt: skip
        sequences.extend(seqs)
        masks.extend(ms)
    rewards = [task.reward(conversation, tokenizer.decode(s[len(tokens):])) for s in sequences]
    return sequences, masks, rewards


def pass_at_k_counts(outcomes_per_example: list[list[bool]], max_k: int) -> list[int]:
    """For k = 1..max_k: how many examples have at least one correct sample among their first k."""
    return [sum(any(o[:k]) for o in outcomes_per_example) for k in range(1, max_k + 1)]


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, cfg: RLConfig, rank: int, world: int, device) -> list[float]:
    """pass@k, k = 1..device_batch_size, on the first eval_examples of task (this rank: every world-th one)."""
    k = cfg.device_batch_size
    n = min(cfg.eval_examples, len(task))
    outcomes = []
    for idx in range(rank, n, world):
        conversation = task[idx]
        tokens = tokenizer.render_for_completion(conversation)
        seqs, _ = engine.generate_batch(tokens, num_samples=k, max_tokens=cfg.max_new_tokens, temperature=1.0,
                                        top_k=cfg.top_k)  # upstream: the Engine's default seed for every example
        outcomes.append([bool(task.evaluate(conversation, tokenizer.decode(s[len(tokens):]))) for s in seqs])
    counts = torch.tensor(pass_at_k_counts(outcomes, k), dtype=torch.float, device=device)
    num = torch.tensor(len(outcomes), dtype=torch.float, device=device)
    if is_ddp_initialized() and world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(num, op=dist.ReduceOp.SUM)
    return (counts / num.clamp(min=1)).tolist()


def _mean_over_ranks(value: float, device, world: int) -> float:
    if not (is_ddp_initialized() and world > 1):
        return value
    t = torch.tensor(value, dtype=torch.float, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return t.item() / world


# -----------------------------------------------------------------------------
# The loop


def rl(cfg: RLConfig, sink: TrainSink | None = None) -> dict:
    """Run RL per cfg from the SFT checkpoint; returns per-step rewards, pass@k history and the checkpoint dir."""
    from nanochat import storage
    from nanochat.checkpoint_manager import build_model, load_checkpoint
    from nanochat.checkpoint_saver import Checkpointing
    from nanochat.engine import Engine

    sink = sink or TrainSink()
    device_type = cfg.device_type or autodetect_device_type()
    ddp, rank, _, world, device = compute_init(device_type)
    master = rank == 0
    cfg.validate(world)
    from nanochat.flash_attention import describe_backend

    print0(describe_backend())  # FA3 looked up at start, not inside the first generation
    examples_per_rank = cfg.examples_per_step // world

    sft_dir, sft_step = resolve_sft_checkpoint(cfg.model_tag, cfg.model_step)
    model, tokenizer, _ = build_model(sft_dir, sft_step, device, phase="eval")
    print0(f"Loaded SFT model from {sft_dir} step {sft_step}")
    engine = Engine(model, tokenizer)
    train_task, val_task = load_tasks(cfg.task)
    num_steps = num_steps_for(cfg, len(train_task))
    print0(f"Calculated number of steps: {num_steps}")

    tag = cfg.model_tag if cfg.model_tag else f"d{model.config.n_layer}"
    checkpoint_dir = storage.join(get_base_dir(), "chatrl_checkpoints", tag)
    start_step = 0
    resume = sink.resume_step(checkpoint_dir)  # a restarted worker group continues from its last save
    if resume is not None:
        model_data, _, _ = load_checkpoint(checkpoint_dir, resume, device)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_data.items()}, strict=True)
        start_step = resume + 1
        print0(f"Resuming RL after step {resume} from {checkpoint_dir} (fresh optimizer state)")

    wandb_run = DummyWandb()
    if cfg.run != "dummy" and master:
        import wandb

        wandb_run = wandb.init(project="nanochat-rl", name=cfg.run, config=cfg.to_dict())

    optimizer = model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                      matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * cfg.init_lr_frac
        group["initial_lr"] = group["lr"]
    print0(f"Total sequences per step: {cfg.examples_per_step * cfg.num_samples}")
    print0(f"Calculated examples per rank: {examples_per_rank}")

    # This rank's questions, cycled: rank, rank + W, ... Step s uses positions [s*E, (s+1)*E) of that list, so a
    # resumed run (and any world size dividing examples_per_step) sees the same questions as an unbroken one.
    rank_indices = list(range(rank, len(train_task), world))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    meta_base = {"model_config": asdict(model.config), "user_config": cfg.to_dict()}
    rewards_hist, lengths_hist, passk_hist = [], [], []

    def evaluate(step):
        model.eval()
        passk = evaluate_pass_at_k(engine, tokenizer, val_task, cfg, rank, world, device)
        print0(f"Step {step} | " + ", ".join(f"Pass@{k}: {p:.4f}" for k, p in enumerate(passk, 1)))
        metrics = {"step": step, **{f"pass@{k}": p for k, p in enumerate(passk, 1)}}
        wandb_run.log(metrics)
        sink.on_eval(step, metrics)
        passk_hist.append([step, passk])

    # Checkpointing counts updates done (`done` = step + 1); a checkpoint holds the weights after update `step` and
    # is named by it (upstream's numbering), so the cadence of --save-every is passed in as `force`.
    ckpt = Checkpointing(checkpoint_dir, rank, device, sink, start_step, resumed=resume is not None,
                         save_every_minutes=cfg.save_every_minutes, keep=cfg.keep_checkpoints,
                         background=bool(cfg.background_save), step_offset=-1)  # fmt: skip

    def make_save(file_step):
        def on_complete(_):  # every rank, once the checkpoint is complete on storage
            print0(f"✅ Saved model checkpoint to {checkpoint_dir}")
            sink.on_checkpoint(file_step, checkpoint_dir, {"step": file_step})

        meta = {**meta_base, "step": file_step, **sink.checkpoint_meta()}
        return lambda why: (model.state_dict(), None, meta, on_complete)

    for step in range(start_step, num_steps):
        if cfg.eval_every > 0 and step % cfg.eval_every == 0:
            evaluate(step)
        t0 = time.time()
        step_rewards, step_lengths = [], []
        for example_step in range(examples_per_rank):
            position = step * examples_per_rank + example_step
            example_idx = rank_indices[position % len(rank_indices)]
            conversation = train_task[example_idx]
            model.eval()
            sequences, masks, rewards = sample_rollouts(engine, tokenizer, train_task, conversation, cfg, step,
                                                        example_idx)
            inputs_all, targets_all, rewards_all, adv_all = build_rollout_batch(sequences, masks, rewards, pad_id,
                                                                                device)
            model.train()
            num_passes = inputs_all.size(0) // cfg.device_batch_size
            for pass_idx in range(num_passes):
                rows = slice(pass_idx * cfg.device_batch_size, (pass_idx + 1) * cfg.device_batch_size)
                loss = pg_loss(model, inputs_all[rows], targets_all[rows], adv_all[rows], num_passes,
                               examples_per_rank)
                loss.backward()
                print0(f"Step {step}/{num_steps} | Example step {example_step} | Pass {pass_idx} | "
                       f"loss: {loss.item():.6f} | Average reward: {rewards_all[rows].mean().item()}")
            step_rewards.append(rewards_all.mean().item())
            step_lengths.extend(len(s) for s in sequences)
        mean_reward = _mean_over_ranks(sum(step_rewards) / len(step_rewards), device, world)
        mean_length = _mean_over_ranks(sum(step_lengths) / len(step_lengths), device, world)
        print0(f"Step {step}/{num_steps} | Average reward: {mean_reward} | Average sequence length: {mean_length:.2f}")

        lrm = lr_multiplier(step, num_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()
        model.zero_grad(set_to_none=True)
        dt = time.time() - t0
        metrics = {"step": step, "reward": mean_reward, "sequence_length": mean_length, "lrm": lrm, "dt": dt}
        wandb_run.log(metrics)
        rewards_hist.append([step, mean_reward])
        lengths_hist.append([step, mean_length])
        sink.on_step(step + 1, {**metrics, "step": step + 1, "rl/reward": mean_reward})
        ckpt.after_step(step + 1)
        periodic = step > 0 and cfg.save_every > 0 and step % cfg.save_every == 0
        ckpt.before_step(step + 1, step == num_steps - 1, make_save(step), force="steps" if periodic else None)

    ckpt.close()
    if cfg.eval_every > 0 and (start_step < num_steps or not passk_hist):
        evaluate(num_steps)  # ours: where the run ended
    wandb_run.finish()
    result = {
        "step": num_steps - 1, "num_steps": num_steps, "start_step": start_step, "world_size": world,
        "checkpoint_dir": checkpoint_dir, "rewards": rewards_hist, "sequence_lengths": lengths_hist,
        "pass_at_k": passk_hist, "final_pass_at_k": passk_hist[-1][1] if passk_hist else None,
        "sft_checkpoint": f"{sft_dir} step {sft_step}", "save_stalls": ckpt.stalls,
    }  # fmt: skip
    print0(f"RL done: {json.dumps({k: result[k] for k in ('num_steps', 'final_pass_at_k', 'checkpoint_dir')})}")
    compute_cleanup()
    return result
