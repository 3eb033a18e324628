"""
Evaluation fan-out on Ray: each (task, shard) is a Ray task that loads the model itself (from a checkpoint in
the base dir, local or s3://, or from weights put in the object store) and returns raw counts; the driver merges
them into exactly the numbers a single process would compute.

For the training loop (non-blocking CORE / ChatCORE; call from the driver or from rank 0 of a Ray Train worker):

    from ray_jobs.eval_fanout import ModelRef, launch_core_async, launch_chatcore_async
    pending = launch_core_async(ModelRef.from_model(orig_model), max_per_task=500)  # returns at once
    ...                                              # keep training; the eval runs on idle CPUs/GPUs
    if pending.done():                               # poll between steps (never blocks)
        core = pending.result()                      # {"results", "centered_results", "core_metric"}
    # after save_checkpoint you can also pass ModelRef(checkpoint_dir=..., step=...)
    # SFT: launch_chatcore_async(ModelRef.from_model(m), max_cat=-1, max_sample=24).result()
    #      -> {"results": {task: acc}, "chatcore": x, "chatcore_cat": y}
    # SFT --mixture offline: launch_offline_chat_async(ref, size, max_cat, max_sample) -> {"results": {task: acc}}
    # (ray_jobs/train_common.RaySink does all of this for base_train / chat_sft)
    # resources per eval task: gpus_per_worker=1 on a GPU cluster (default 0), cpus_per_worker=1.

Work units:
    core  one CORE task of the eval bundle, examples idx = shard, shard + num_shards, ...   -> per-example 0/1
    chat  one chat task; categorical batches (or generative problems) strided the same way -> (passed, total)
    bpb   bits per byte of one split                                                       -> bpb
    sample  base-model samples (upstream's seven prompts + 8 unconditioned)                -> strings
Workers report progress to a small actor; the driver draws one bar per task and an overall bar. A worker that
dies mid-evaluation is retried by Ray (`max_retries`); units are deterministic, so the merged result is unchanged.
Fault injection for tests: NANOCHAT_EVAL_CRASH_ONCE=<path> makes the first unit to start SIGKILL its own worker
after one example (and create <path>, so the retry runs through).
"""

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any

import ray
import torch

from nanochat.train import SAMPLE_PROMPTS  # base_eval samples the prompts that training samples

# Environment the workers need to see the same files and endpoints as the driver (Ray does not forward
# driver-side environment changes made after ray.init, so we pass them with every unit).
FORWARD_ENV_PREFIXES = ("NANOCHAT_", "AWS_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


# -----------------------------------------------------------------------------
# What to evaluate: a model reference every worker can load


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A checkpoint step (`checkpoint_dir` may be s3://) or in-memory weights in the object store."""

    checkpoint_dir: str | None = None
    step: int | None = None
    state_ref: Any = None  # ray.ObjectRef of a CPU state_dict
    model_config: dict | None = None  # GPTConfig kwargs, with state_ref

    @classmethod
    def from_source(cls, source: str, model_tag: str | None = None, step: int | None = None) -> "ModelRef":
        """Resolve base|sft|rl (+ tag, step) on the driver, so every worker loads the very same step.

        A missing checkpoint raises CheckpointNotFoundError naming the command that creates it."""
        from nanochat import storage
        from nanochat.checkpoint_manager import (
            check_checkpoint,
            checkpoints_dir_for,
            find_largest_model,
            find_last_step,
        )

        root = checkpoints_dir_for(source)
        checkpoint_dir = storage.join(root, model_tag or find_largest_model(root))
        step = find_last_step(checkpoint_dir) if step is None else step
        check_checkpoint(checkpoint_dir, step)  # a damaged file: one line here, before any worker loads it
        return cls(checkpoint_dir=checkpoint_dir, step=step)

    @classmethod
    def from_model(cls, model) -> "ModelRef":
        """Snapshot a live model's weights into the object store (no checkpoint write needed)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(state_ref=ray.put(state), model_config=dataclasses.asdict(model.config), step=None)

    def cache_key(self) -> str:
        return self.state_ref.hex() if self.state_ref is not None else f"{self.checkpoint_dir}@{self.step}"


_MODEL_CACHE: dict[str, tuple] = {}  # per worker process: reuse the model across units of one evaluation


def load_for_eval(ref: ModelRef, device: torch.device):
    """(model, tokenizer, meta) in eval mode; cached per process (keeps at most one model)."""
    key = f"{ref.cache_key()}|{device}"
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        if ref.state_ref is not None:
            from nanochat.gpt import GPT, GPTConfig
            from nanochat.tokenizer import get_tokenizer

            state = ref.state_ref if isinstance(ref.state_ref, dict) else ray.get(ref.state_ref)
            with torch.device("meta"):
                model = GPT(GPTConfig(**ref.model_config))
            model.to_empty(device=device)
            model.init_weights()  # rotary buffers; weights are replaced below
            model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
            model.eval()
            _MODEL_CACHE[key] = (model, get_tokenizer(), {"model_config": ref.model_config, "step": ref.step})
        else:
            from nanochat.checkpoint_manager import build_model

            _MODEL_CACHE[key] = build_model(ref.checkpoint_dir, ref.step, device, phase="eval")
    return _MODEL_CACHE[key]


# -----------------------------------------------------------------------------
# Work units and how one is run (identical in a Ray worker and in-process)


@dataclasses.dataclass(frozen=True)
class Unit:
    kind: str  # core | chat | bpb | sample
    name: str  # CORE label, chat task name, bpb split, or "sample"
    shard: int = 0
    num_shards: int = 1
    params: tuple = ()  # sorted (key, value) pairs, hashable

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}:{self.shard}/{self.num_shards}"

    def p(self) -> dict:
        return dict(self.params)


def make_unit(kind: str, name: str, shard: int = 0, num_shards: int = 1, **params) -> Unit:
    return Unit(kind, name, shard, num_shards, tuple(sorted(params.items())))


def _run_core(unit, model, tokenizer, device, progress):
    from nanochat.core_eval import ensure_eval_bundle, evaluate_examples, load_core_tasks, load_task_examples

    p = unit.p()
    bundle = ensure_eval_bundle()
    task = {t["label"]: t for t in load_core_tasks(bundle)}[unit.name]
    data, pool, meta = load_task_examples(bundle, task, p.get("max_per_task", -1))
    indices = list(range(unit.shard, len(data), unit.num_shards))
    progress.total(len(indices))
    values = evaluate_examples(model, tokenizer, data, device, meta, indices, pool=pool, progress=progress.tick)
    return {"indices": indices, "values": values, "n": len(data)}


def _run_chat(unit, model, tokenizer, device, progress):
    from nanochat.chat_eval import categorical_counts, generative_counts, make_task, num_problems, num_units

    p = unit.p()
    task = make_task(unit.name, p.get("task_size"))
    max_problems, batch_size = p.get("max_problems"), p.get("batch_size", 8)
    selected = range(unit.shard, num_units(task, batch_size, max_problems), unit.num_shards)
    if task.eval_type == "categorical":
        n = num_problems(task, max_problems)
        progress.total(sum(min(batch_size, n - b * batch_size) for b in selected))
        passed, total = categorical_counts(task, tokenizer, model, batch_size, max_problems, selected, progress.tick)
    else:
        from nanochat.engine import Engine

        progress.total(len(selected))
        passed, total = generative_counts(
            task, tokenizer, Engine(model, tokenizer), p.get("num_samples", 1), p.get("max_new_tokens", 512),
            p.get("temperature", 0.0), p.get("top_k", 50), max_problems, selected, progress.tick,
        )  # fmt: skip
    return {"passed": passed, "total": total}


def _run_bpb(unit, model, tokenizer, device, progress):
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    p = unit.p()
    progress.total(p["steps"])
    loader = tokenizing_distributed_data_loader_bos_bestfit(
        tokenizer, p["device_batch_size"], p["sequence_len"], unit.name, device=device
    )

    def counted(batches):
        for batch in batches:
            yield batch
            progress.tick(1)

    return {"bpb": evaluate_bpb(model, counted(loader), p["steps"], get_token_bytes(device=device))}


def _run_sample(unit, model, tokenizer, device, progress):
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    progress.total(len(SAMPLE_PROMPTS) + 1)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer(prompt, prepend="<|bos|>")
        out, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        samples.append(tokenizer.decode(out[0]))
        progress.tick(1)
    out, _ = engine.generate_batch(tokenizer("", prepend="<|bos|>"), num_samples=8, max_tokens=128, temperature=1.0)
    progress.tick(1)
    return {"samples": samples, "unconditioned": [tokenizer.decode(s) for s in out]}


RUNNERS = {"core": _run_core, "chat": _run_chat, "bpb": _run_bpb, "sample": _run_sample}


class _Progress:
    """Counts finished examples of one unit and reports (throttled) to the progress actor, if any."""

    def __init__(self, key, actor=None, crash_marker=None):
        self.key, self.actor, self.crash_marker = key, actor, crash_marker
        self.done, self.n, self.last = 0, 0, 0.0

    def total(self, n):
        self.n = n
        self._report(force=True)

    def tick(self, k=1):
        self.done += k
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-unit, Ray must retry
        self._report(force=self.done >= self.n)

    def _report(self, force=False):
        now = time.monotonic()
        if self.actor is not None and (force or now - self.last > 0.2):
            self.last = now
            ref = self.actor.update.remote(self.key, self.done, self.n, os.getpid())
            if force:  # the first and the final count are applied before the unit returns: no snapshot misses them
                ray.get(ref)


def run_unit(ref: ModelRef, unit: Unit, device=None, progress_actor=None) -> dict:
    """Evaluate one unit in this process."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_for_eval(ref, device)
    progress = _Progress(unit.key, progress_actor, os.environ.get("NANOCHAT_EVAL_CRASH_ONCE"))
    return RUNNERS[unit.kind](unit, model, tokenizer, device, progress)


@ray.remote(max_retries=3)
def _run_unit_remote(ref: ModelRef, unit: Unit, env: dict, progress_actor) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # workers are reused across evaluations: restore the environment afterwards
    try:
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        return run_unit(ref, unit, device, progress_actor)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@ray.remote(num_cpus=0)
class ProgressActor:
    """Latest (done, total) per unit key and every worker pid that ran it (a retry adds a pid)."""

    def __init__(self):
        self.state = {}

    def update(self, key, done, total, pid):
        pids = self.state.get(key, (0, 0, []))[2]
        self.state[key] = (done, total, pids if pid in pids else [*pids, pid])

    def snapshot(self):
        return dict(self.state)


# -----------------------------------------------------------------------------
# Driver side: submit, watch, merge


def _remote_options(cpus_per_worker: float, gpus_per_worker: float, max_retries: int) -> dict:
    return {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "max_retries": max_retries}


class _Bars:
    """One tqdm bar per task name plus an overall bar, fed from ProgressActor snapshots."""

    def __init__(self, units, enabled):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        names = list(dict.fromkeys(f"{u.kind}:{u.name}" for u in units))
        self.overall = tqdm(total=0, desc="overall", position=0, file=sys.stderr, mininterval=0.5)
        self.bars = {
            n: tqdm(total=0, desc=n, position=i + 1, file=sys.stderr, mininterval=0.5) for i, n in enumerate(names)
        }

    def update(self, snapshot):
        if not self.enabled:
            return
        per_task = {}
        for key, (done, total, _) in snapshot.items():
            name = key.rsplit(":", 1)[0]
            d, t = per_task.get(name, (0, 0))
            per_task[name] = (d + done, t + total)
        for name, (done, total) in per_task.items():
            bar = self.bars.get(name)
            if bar is not None:
                bar.total, bar.n = total, done
                bar.refresh()
        self.overall.total = sum(t for _, t in per_task.values())
        self.overall.n = sum(d for d, _ in per_task.values())
        self.overall.refresh()

    def close(self):
        if self.enabled:
            for bar in [*self.bars.values(), self.overall]:
                bar.close()


def run_units(
    ref: ModelRef, units: list[Unit], num_workers: int = 0, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
    max_retries: int = 3, show_progress: bool = True, on_progress=None,
) -> list[dict]:  # fmt: skip
    """Evaluate units as Ray tasks with at most num_workers in flight (0 = as many as resources allow).

    Returns results aligned with units. `on_progress(snapshot)` is called on every poll with
    {unit key: (done, total, [worker pids])}; a unit whose worker died and was retried shows two pids.
    """
    actor = ProgressActor.remote()
    env, opts = forwarded_env(), _remote_options(cpus_per_worker, gpus_per_worker, max_retries)
    limit = num_workers if num_workers > 0 else len(units)
    queue, pending, results = list(enumerate(units)), {}, [None] * len(units)
    bars = _Bars(units, show_progress)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                i, unit = queue.pop(0)
                pending[_run_unit_remote.options(**opts).remote(ref, unit, env, actor)] = i
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            for r in ready:
                results[pending.pop(r)] = _get_unwrapped(r)
            snapshot = ray.get(actor.snapshot.remote())
            bars.update(snapshot)
            if on_progress is not None:
                on_progress(snapshot)
    finally:
        for r in pending:
            ray.cancel(r, force=True)
        bars.close()
        ray.kill(actor)
    return results


def _get_unwrapped(ref):
    """ray.get, re-raising a user-facing NanochatError from a worker as itself (its message names the fix)."""
    from nanochat.common import NanochatError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NanochatError):
            raise e.cause from None
        raise


def run_units_local(ref_or_model, units: list[Unit], device=None) -> list[dict]:
    """The same units, sequentially in this process (no Ray): the reference the fan-out must equal."""
    return [run_unit(ref_or_model, u, device) for u in units]


class EvalHandle:
    """Futures of launched units plus the merge that turns their results into metrics."""

    def __init__(self, futures, merge, actor=None):
        self.futures, self.merge, self.actor = futures, merge, actor

    def done(self) -> bool:
        ready, _ = ray.wait(self.futures, num_returns=len(self.futures), timeout=0)
        return len(ready) == len(self.futures)

    def result(self, timeout: float | None = None):
        ray.wait(self.futures, num_returns=len(self.futures), timeout=timeout)
        return self.merge([_get_unwrapped(f) for f in self.futures])


def _launch(ref, units, merge, cpus_per_worker, gpus_per_worker, max_retries) -> EvalHandle:
    opts, env = _remote_options(cpus_per_worker, gpus_per_worker, max_retries), forwarded_env()
    return EvalHandle([_run_unit_remote.options(**opts).remote(ref, u, env, None) for u in units], merge)


# -----------------------------------------------------------------------------
# CORE and chat plans + merges


def core_units(max_per_task: int = -1, shards_per_task: int = 1, max_shard_examples: int = 0, labels=None) -> tuple:
    """(units, task metadata list). Big tasks get ceil(n / max_shard_examples) shards (0 = no size rule)."""
    from nanochat.core_eval import ensure_eval_bundle, load_core_tasks, select_tasks

    bundle = ensure_eval_bundle()  # on the driver too: it needs task sizes to plan shards
    tasks = select_tasks(load_core_tasks(bundle), labels)
    units = []
    for t in tasks:
        with open(os.path.join(bundle, "eval_data", t["dataset_uri"]), encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        n = min(n, max_per_task) if max_per_task > 0 else n
        shards = max(shards_per_task, math.ceil(n / max_shard_examples) if max_shard_examples > 0 else 1)
        shards = max(1, min(shards, n))
        units += [make_unit("core", t["label"], s, shards, max_per_task=max_per_task) for s in range(shards)]
    return units, tasks


def merge_core(units: list[Unit], results: list[dict], tasks: list[dict]) -> dict:
    """Per-example values of every shard -> upstream's float32 mean per task -> centred -> CORE."""
    from nanochat.core_eval import centered_result, core_summary, mean_accuracy

    values = {}
    for unit, res in zip(units, results):
        if unit.kind != "core":
            continue
        row = values.setdefault(unit.name, [None] * res["n"])
        for i, v in zip(res["indices"], res["values"]):
            row[i] = v
    acc, centered = {}, {}
    for t in tasks:
        row = values[t["label"]]
        assert None not in row, f"missing examples for {t['label']}"
        acc[t["label"]] = mean_accuracy(row)
        centered[t["label"]] = centered_result(acc[t["label"]], t["random_baseline"])
    return core_summary(acc, centered)


def chat_units(task_names, shards_per_task=1, max_problems=None, batch_size=8, num_samples=1,
               max_new_tokens=512, temperature=0.0, top_k=50, max_problems_by_task=None,
               max_shard_problems=0, task_size=None) -> list[Unit]:  # fmt: skip
    """Units of chat tasks. With max_shard_problems > 0 a task gets at least ceil(problems / max_shard_problems)
    shards (the driver then loads the task once to count its problems). task_size: for the offline tasks."""
    from nanochat.chat_eval import make_task, num_problems

    units = []
    for name in task_names:
        mp = (max_problems_by_task or {}).get(name, max_problems)
        shards = shards_per_task
        if max_shard_problems > 0:
            shards = max(shards, math.ceil(num_problems(make_task(name, task_size), mp) / max_shard_problems))
        params = dict(max_problems=mp, batch_size=batch_size, num_samples=num_samples, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k)  # fmt: skip
        if task_size is not None:
            params["task_size"] = task_size
        units += [make_unit("chat", name, s, shards, **params) for s in range(shards)]
    return units


def merge_chat(units: list[Unit], results: list[dict]) -> dict:
    """{task: accuracy} from summed (passed, total) of its shards, in first-seen task order."""
    counts = {}
    for unit, res in zip(units, results):
        if unit.kind == "chat":
            p, t = counts.get(unit.name, (0, 0))
            counts[unit.name] = (p + res["passed"], t + res["total"])
    return {name: (p / t if t else 0.0) for name, (p, t) in counts.items()}


def launch_core_async(
    ref: ModelRef, max_per_task: int = -1, shards_per_task: int = 1, cpus_per_worker: float = 1,
    gpus_per_worker: float = 0, max_retries: int = 3,
) -> EvalHandle:  # fmt: skip
    """Start CORE as Ray tasks and return immediately; `.result()` gives evaluate_core's dict."""
    units, tasks = core_units(max_per_task, shards_per_task)
    merge = lambda results: merge_core(units, results, tasks)
    return _launch(ref, units, merge, cpus_per_worker, gpus_per_worker, max_retries)


def launch_chatcore_async(
    ref: ModelRef, max_cat: int = -1, max_sample: int = 24, batch_size: int = 8, shards_per_task: int = 1,
    cpus_per_worker: float = 1, gpus_per_worker: float = 0, max_retries: int = 3, max_new_tokens: int = 512,
) -> EvalHandle:  # fmt: skip
    """SFT's in-loop ChatCORE (all five tasks; -1 = no limit) as Ray tasks; returns immediately."""
    from nanochat.chat_eval import ALL_TASKS, CATEGORICAL_TASKS, centered_mean

    limits = {t: (max_cat if t in CATEGORICAL_TASKS else max_sample) for t in ALL_TASKS}
    limits = {t: (None if v < 0 else v) for t, v in limits.items()}
    units = chat_units(
        ALL_TASKS, shards_per_task, batch_size=batch_size, max_new_tokens=max_new_tokens, max_problems_by_task=limits
    )

    def merge(results):
        acc = merge_chat(units, results)
        return {
            "results": acc,
            "chatcore": centered_mean(acc, ALL_TASKS),
            "chatcore_cat": centered_mean(acc, CATEGORICAL_TASKS),
        }

    return _launch(ref, units, merge, cpus_per_worker, gpus_per_worker, max_retries)


def launch_offline_chat_async(
    ref: ModelRef, size: int, max_cat: int = -1, max_sample: int = 24, batch_size: int = 8,
    cpus_per_worker: float = 1, gpus_per_worker: float = 0, max_retries: int = 3,
) -> EvalHandle:  # fmt: skip
    """SFT's in-loop eval for --mixture offline (held-out WordChoice + Arithmetic of `size` examples each, the
    settings of nanochat.sft.chat_eval) as Ray tasks; returns immediately. `.result()` -> {"results": {task: acc}}."""
    from nanochat.chat_eval import OFFLINE_TASKS

    limits = {"WordChoice": None if max_cat < 0 else max_cat, "Arithmetic": None if max_sample < 0 else max_sample}
    units = chat_units(OFFLINE_TASKS, batch_size=batch_size, max_new_tokens=64, max_problems_by_task=limits,
                       task_size=size)  # fmt: skip
    merge = lambda results: {"results": merge_chat(units, results)}
    return _launch(ref, units, merge, cpus_per_worker, gpus_per_worker, max_retries)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Shared CLI pieces for ray_jobs.base_eval / ray_jobs.chat_eval


def add_fanout_args(parser) -> None:
    g = parser.add_argument_group("Ray fan-out")
    g.add_argument("--num-workers", type=int, default=0, help="max eval tasks in flight (0 = as resources allow)")
    g.add_argument("--shards-per-task", type=int, default=1, help="split every task into this many Ray tasks")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved by each eval task")
    g.add_argument(
        "--gpus-per-worker", type=float, default=None, help="GPUs per eval task (default 1 if the cluster has GPUs)"
    )
    g.add_argument("--max-retries", type=int, default=3, help="retries of an eval task whose worker died")
    g.add_argument("--address", type=str, default=None, help="Ray cluster address (default: start a local one)")
    g.add_argument("--local", action="store_true", help="no Ray: evaluate sequentially in this process")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def init_ray(address: str | None) -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS names a cluster to join; otherwise "local" starts an embedded one (never a stray `ray start`)
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=True)


def gpus_per_worker(args) -> float:
    if args.device_type == "cpu":
        return 0
    if args.gpus_per_worker is not None:
        return args.gpus_per_worker
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def execute(args, ref: ModelRef, units: list[Unit]) -> list[dict]:
    """Run units through Ray (or in-process with --local) according to the shared CLI flags."""
    if args.local:
        device = torch.device(args.device_type) if args.device_type else None
        return run_units_local(ref, units, device)
    init_ray(args.address)
    return run_units(
        ref, units, num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=gpus_per_worker(args), max_retries=args.max_retries, show_progress=not args.no_progress,
    )  # fmt: skip


def user_errors_exit(main):
    """Entry-point wrapper: a NanochatError prints its message (which names the fix) and exits 2, no traceback."""

    def wrapped(argv=None):
        from nanochat.common import NanochatError

        try:
            return main(argv)
        except NanochatError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
