"""
Shared Ray Train wiring for the training entry points (base_train, chat_sft): cluster flags, storage checks,
`TorchTrainer` set-up, and `RaySink`, the library `TrainSink` implemented with Ray Train.

Design (see README "Training on Ray"):
- The loop is the library's plain function (nanochat.train.train / nanochat.sft.sft). TorchTrainer starts N workers;
  Ray's torch backend creates the process group (gloo on CPU, NCCL on GPU) and nanochat's compute_init reuses it.
  The model is NOT wrapped in DDP: MuonAdamW does its own reduce-scatter / all-gather.
- Checkpoints are written in nanochat's layout under the base dir (local or s3://). After every complete save, each
  rank calls ray.train.report and rank 0 attaches a tiny pointer checkpoint ({"checkpoint_dir", "step"}), so Ray
  Train's registry knows the newest checkpoint. A restarted worker group (worker or node loss, or a resubmitted run
  with the same name) resumes from the newer of: the registered pointer, or the newest complete nanochat checkpoint
  that this run wrote (covers a crash between the save and Ray registering it).
- Metrics: ray.train.report every --report-every steps, Ray custom metrics (Gauges, visible in the dashboard's
  Prometheus export) on rank 0, and wandb (rank 0, inside the library) unless --run=dummy. Evaluation results
  (val bpb, CORE, ChatCORE) ride along with the next report as `<metric>` + `<metric>_step` (the step they
  belong to); report stays a barrier that every rank calls equally often.
- In-loop CORE (base_train --core-metric-every) and ChatCORE (chat_sft --chatcore-every) run as Ray tasks
  (ray_jobs/eval_fanout.py) without stalling training: rank 0 snapshots the weights into the object store (a CPU
  copy + put, cheaper than writing a checkpoint, and the step's checkpoint does not exist yet when CORE runs),
  launches the evaluation, and polls it after every step (never blocking); a result is logged with its own step
  when it is ready, and the last one is awaited before the run's final report. Eval tasks take an idle GPU on
  GPU clusters (without one, the evaluation runs in-process on the training GPUs, as upstream) and one CPU on
  CPU clusters (no CPU free: they share the workers' cores rather than wait for training to end).
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import typing
from dataclasses import MISSING, asdict, dataclass, fields

from nanochat.common import NanochatError, apply_gpu_env_defaults, get_base_dir, gpu_env_defaults
from nanochat.train import TrainSink

# Environment forwarded to the Ray job and its workers: storage credentials/endpoint, nanochat and wandb settings.
FORWARD_ENV_PREFIXES = ("AWS_", "NANOCHAT_", "WANDB_", "HF_", "OMP_NUM_THREADS", "PYTORCH_")
# Ray 2.60's Train V2 patches print() in workers to log through the root logger, and also prints to sys.stdout
# when that is not sys.__stdout__ (always so in a Ray worker): every line reached the driver twice, from the
# worker's .out and .err. Workers print plainly; Ray's log monitor still forwards and stores every line once.
TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
AUTO_RAY_DATA_ACTORS = 2  # --ray-data-actors auto on GPU: tokenizer actors (1 CPU each) per training worker
HOLD_MARGIN_S = 120.0  # after a just-in-time checkpoint, wait this long past the drain deadline for the restart


# -----------------------------------------------------------------------------
# Flags


@dataclass
class ClusterArgs:
    """How to run on Ray. num_workers=0 runs the loop in this process without Ray (also works under torchrun)."""

    num_workers: int = 1  # training workers (1 per GPU); 0 = in-process, no Ray
    min_workers: int = -1  # elastic: restart with as few as this many workers after losing nodes (-1 = fixed)
    use_gpu: str = "auto"  # auto | 1 | 0
    cpus_per_worker: float = -1  # -1 = auto (all CPUs split across workers on CPU; 4 per GPU worker)
    gpus_per_worker: float = 1
    max_failures: int = 3  # restarts after real failures (crashes, lost nodes) before giving up (-1 = infinite)
    max_preemption_failures: int = -1  # restarts after preemptions (drained nodes), counted apart (-1 = infinite)
    storage: str | None = None  # Ray Train run storage (default <base dir>/ray_runs); local path or s3://
    name: str | None = None  # Ray run name; resubmitting with the same name resumes (default base_train-<tag>)
    report_every: int = 10  # ray.train.report every N steps (a barrier across workers)
    address: str | None = None  # Ray address to connect to (default: RAY_ADDRESS, else a local cluster)
    ray_data_actors: int = -1  # >0: Ray Data tokenizer pool of this many actors per worker; 0: plain loader; -1: auto
    narrow_elastic: bool = False  # elastic sizes the batch does not divide over: raise min_workers (else: an error)


def _flag_type(annotation):
    """int / float / str for a field annotation, unwrapping `X | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return base if base in (int, float, str) else str


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip=()):
    """One --flag per dataclass field (help from the field's metadata), defaults from the dataclass."""
    for f in fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_text = f.metadata.get("help", "")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(f.type), default=default,
                                help=f"{help_text} (default: {default})")


def add_cluster_flags(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("Ray")
    g.add_argument("--num-workers", type=int, default=1, help="training workers, 1 per GPU (0 = in-process, no Ray)")
    g.add_argument("--min-workers", type=int, default=-1, help="elastic lower bound after node loss (-1 = fixed)")
    g.add_argument("--use-gpu", type=str, default="auto", choices=["auto", "1", "0"], help="train on GPUs")
    g.add_argument("--cpus-per-worker", type=float, default=-1, help="CPUs per worker (-1 = auto)")
    g.add_argument("--gpus-per-worker", type=float, default=1, help="GPUs per worker when --use-gpu")
    g.add_argument("--max-failures", type=int, default=3,
                   help="restarts after real failures (crashes, lost nodes) before giving up (-1 = infinite)")
    g.add_argument("--max-preemption-failures", type=int, default=-1,
                   help="restarts after preemptions (a drained node), counted apart from --max-failures (-1 = inf)")
    g.add_argument("--storage", type=str, default=None, help="Ray run storage, local or s3:// (default: base dir)")
    g.add_argument("--name", type=str, default=None, help="Ray run name; the same name resumes the run")
    g.add_argument("--report-every", type=int, default=10, help="ray.train.report every N steps")
    g.add_argument("--address", type=str, default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    g.add_argument("--ray-data-actors", type=int, default=-1,
                   help=f"tokenize on Ray Data with this many actors per worker; 0 = each worker reads parquet "
                        f"itself; -1 = auto: {AUTO_RAY_DATA_ACTORS} per worker when training on GPUs, 0 on CPU "
                        f"(there the actors' start-up, ~10 s on 2 cores, and their tokenizing compete with the "
                        f"training process for the same cores, while the in-worker loader costs little)")


def split_args(ns: argparse.Namespace, config_cls):
    """(config kwargs, ClusterArgs) from parsed args."""
    names = {f.name for f in fields(config_cls)}
    cfg = {k: v for k, v in vars(ns).items() if k in names}
    cluster = ClusterArgs(**{f.name: getattr(ns, f.name) for f in fields(ClusterArgs) if hasattr(ns, f.name)})
    return cfg, cluster


def validate_cluster(cluster: ClusterArgs):
    if cluster.num_workers < 0:
        raise NanochatError(f"--num-workers must be >= 0 (got {cluster.num_workers})")
    if cluster.min_workers != -1 and not 1 <= cluster.min_workers <= cluster.num_workers:
        raise NanochatError(f"--min-workers must be between 1 and --num-workers {cluster.num_workers}")
    if cluster.ray_data_actors < -1:
        raise NanochatError(f"--ray-data-actors must be >= 0, or -1 for auto (got {cluster.ray_data_actors})")
    if cluster.report_every < 1:
        raise NanochatError(f"--report-every must be >= 1 (got {cluster.report_every})")
    if cluster.max_failures < -1:
        raise NanochatError(f"--max-failures must be >= -1 (got {cluster.max_failures})")
    if cluster.max_preemption_failures < -1:
        raise NanochatError(f"--max-preemption-failures must be >= -1 (got {cluster.max_preemption_failures})")


def resolve_ray_data_actors(cluster: ClusterArgs, use_gpu: bool, data: str = "parquet") -> int:
    """Settle --ray-data-actors -1 (auto) in place: a small pool per worker on GPUs, the plain loader on CPU.

    GPU workers spend their time in the accelerator, so tokenizing in separate actors (on the node's spare CPUs)
    keeps the input pipeline off the critical path. On CPU the actors would tokenize on the cores that train."""
    if cluster.ray_data_actors == -1:
        cluster.ray_data_actors = AUTO_RAY_DATA_ACTORS if (use_gpu and data == "parquet") else 0
    return cluster.ray_data_actors


def world_sizes(cluster: ClusterArgs) -> list[int]:
    """Every world size the run may have (elastic runs may restart with fewer workers)."""
    if cluster.num_workers == 0:
        return [int(os.environ.get("WORLD_SIZE", 1))]
    lo = cluster.min_workers if cluster.min_workers > 0 else cluster.num_workers
    return list(range(lo, cluster.num_workers + 1))


def check_world_sizes(cluster: ClusterArgs, check) -> None:
    """check(world) (raises NanochatError) for every world size the run may take. With cluster.narrow_elastic (the
    speedrun's presets), sizes below num_workers that fail raise min_workers past them instead, with a log line."""
    bad = []
    for world in world_sizes(cluster):
        try:
            check(world)
        except NanochatError:
            if not cluster.narrow_elastic or world == cluster.num_workers:
                raise
            bad.append(world)
    if bad:
        lowest = max(bad) + 1
        print(f"[ray] elastic: the batch does not divide over {bad} worker(s), so the run may shrink to {lowest} "
              f"workers (not {cluster.min_workers}) of {cluster.num_workers}")
        cluster.min_workers = lowest if lowest < cluster.num_workers else -1


def resolve_use_gpu(cluster: ClusterArgs, device_type: str) -> bool:
    """GPU or CPU Train workers. Joining an existing cluster (--address, RAY_ADDRESS, or Ray already initialized),
    this connects first and asks the cluster (ray_jobs/cluster_gpus.py): a CPU-only head must not decide."""
    if device_type and device_type != "cuda":
        if cluster.use_gpu == "1":
            raise NanochatError(f"--use-gpu 1 contradicts --device-type {device_type}")
        return False
    if cluster.use_gpu == "0":
        return False
    from ray_jobs import cluster_gpus

    requested = "1" if (cluster.use_gpu == "1" or device_type == "cuda") else "auto"
    if joins_existing_cluster(cluster):
        ray_init(cluster)
        use_gpu, why = cluster_gpus.decide(requested, cluster_gpus.gpu_outlook())
    else:
        import torch

        use_gpu, why = cluster_gpus.decide_local(requested, torch.cuda.is_available())
    print(f"[ray] {why}")
    return use_gpu


def joins_existing_cluster(cluster: ClusterArgs) -> bool:
    """True when the run goes to a running cluster rather than an embedded one started on this machine."""
    import ray

    address = cluster.address or os.environ.get("RAY_ADDRESS")
    return ray.is_initialized() or (bool(address) and address != "local")


def check_storage(*locations: str):
    """Fail in seconds (not after an hour of training) when a storage location cannot be written."""
    from nanochat import storage

    for loc in locations:
        storage.check_writable(loc)


def forwarded_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


# -----------------------------------------------------------------------------
# The sink: Ray Train's side of the library loop (runs inside each worker)


def _hold_for_tests(step: int) -> None:
    """Test hook: NANOCHAT_TRAIN_HOLD_AT=<step>:<path> parks the loop after <step> (creating <path>) until the job is
    stopped, so that a test stops a run at a known step instead of racing it."""
    spec = os.environ.get("NANOCHAT_TRAIN_HOLD_AT")
    if spec and step == int(spec.split(":", 1)[0]):
        open(spec.split(":", 1)[1], "w").close()
        threading.Event().wait()


class RaySink(TrainSink):
    """nanochat.train.TrainSink on Ray Train: report metrics and checkpoint pointers, pick the resume step."""

    MARKER = "nanochat_checkpoint.json"

    def __init__(self, run_name: str, report_every: int, ray_data_actors: int = 0):
        """ray_data_actors: tokenizer actors per worker for the pretraining input (0 = plain loader, -1 = auto)."""
        import ray.train

        self.ray_train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name, self.report_every, self.ray_data_actors = run_name, report_every, ray_data_actors
        self.gauges = _make_gauges(run_name) if self.rank == 0 else None
        self.t_start = time.time()
        self.first_step_reported = False
        self.eval_metrics = {}  # evaluation results waiting for the next report
        self.pending_evals = []  # rank 0: (kind, step, eval_fanout.EvalHandle) launched and not yet reported
        self.resumed = None  # (step, meta["save_reason"]) of the checkpoint this worker group started from
        self.reported_steps = []  # checkpoint steps this worker group reported to Ray, in order
        self.steps_lost = 0  # optimizer steps lost to interruptions in this run (MetricsSink counts them)

    # ---- where to resume

    def resume_step(self, checkpoint_dir: str) -> int | None:
        """Newest of (Ray's registered pointer, newest complete checkpoint written by this run); same on all ranks."""
        step = None
        if self.rank == 0:
            step = self._pick_resume_step(checkpoint_dir)
        return _broadcast(step)

    def _pick_resume_step(self, checkpoint_dir: str) -> int | None:
        registered = None
        ck = self.ray_train.get_checkpoint()
        if ck is not None:
            with ck.as_directory() as d:
                pointer = json.load(open(os.path.join(d, self.MARKER)))
            if pointer["checkpoint_dir"] == checkpoint_dir:
                registered = int(pointer["step"])
        own = own_complete_steps(checkpoint_dir, self.run_name)
        newest_own = own[-1] if own else None
        step = None
        if registered is not None and (newest_own is None or registered >= newest_own):
            print(f"[ray] resuming from registered checkpoint step {registered}")
            step = registered
        elif newest_own is not None:
            print(f"[ray] resuming from step {newest_own}: newest complete checkpoint of run {self.run_name!r} "
                  f"(registered: {registered})")
            step = newest_own
        if step is not None:
            self.resumed = (step, _meta_of(checkpoint_dir, step).get("save_reason"))
        return step

    def protected_steps(self) -> set:
        """What a restart would resume from right now: Ray registers a reported checkpoint at the controller's next
        poll, so until the next one is reported, the one reported before the newest (or the step this worker
        group resumed from) may still be the registered one. Retention keeps it."""
        if len(self.reported_steps) >= 2:
            return {self.reported_steps[-2]}
        return {self.resumed[0]} if self.resumed else set()

    # ---- preemption (a drain notice for a node of this worker group)

    checks_preemption = True

    def preemption_notice(self) -> dict | None:
        info = self.ray_train.get_preemption_info()  # a barrier: the loop calls it on every rank at agreed steps
        if info is None:
            return None
        left = None if info.deadline_ms is None else round(info.deadline_ms / 1000 - time.time(), 1)
        return {"deadline_s": left, "ranks": info.preempted_ranks, "nodes": info.preempted_node_ids}

    def hold_for_preemption(self, step: int, notice: dict) -> None:
        """The just-in-time checkpoint of `step` is complete and reported: train no further (the restart resumes
        from it, so any later step would be lost) until Ray tears this worker group down at the drain deadline
        (or earlier, when every rank has gone). A drain that never comes: resume training after a while."""
        left = notice.get("deadline_s")
        limit = time.time() + (left if left is not None else 600) + HOLD_MARGIN_S
        print(f"[ray] rank {self.rank}: checkpoint of step {step} saved ahead of the preemption of ranks "
              f"{notice.get('ranks')} (deadline in {left}s); waiting for the restart")
        while time.time() < limit:
            time.sleep(0.5)
        print(f"[ray] rank {self.rank}: no restart {HOLD_MARGIN_S:.0f}s after the drain deadline; training on")

    def checkpoint_meta(self) -> dict:
        return {"launcher": {"kind": "ray", "ray_run_name": self.run_name}}

    def train_loader(self, cfg, tokenizer, device, resume_state):
        """Ray Data pipeline (same batches and resume states as the library loader), or None for the library's."""
        actors = self.ray_data_actors
        if actors == -1:  # auto, unresolved by the driver: same rule as resolve_ray_data_actors
            actors = AUTO_RAY_DATA_ACTORS if torch_device_type(device) == "cuda" else 0
        if actors <= 0:
            return None
        from ray_jobs.data_pipeline import make_batch_iterator

        return make_batch_iterator(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split="train", device=device,
                                   resume_state=resume_state, num_tokenizer_actors=actors)

    # ---- reporting

    def on_step(self, step: int, metrics: dict) -> None:
        if self.gauges is not None:
            _set_gauges(self.gauges, {**metrics, "train/steps_lost": self.steps_lost})
        if not self.first_step_reported:
            self.first_step_reported = True
            self.first_step_time = time.time()  # wall clock: the driver subtracts its own start time
            metrics = {**metrics, "time_to_first_step_s": self.first_step_time - self.t_start}
        if step % self.report_every == 0:
            self.ray_train.report(_plain(self._with_evals(metrics)))
        _hold_for_tests(step)

    def on_eval(self, step: int, metrics: dict) -> None:
        if self.gauges is not None:
            _set_gauges(self.gauges, metrics)  # val/bpb
        # ride along with the next step / checkpoint / final report (report is a barrier: no extra call here)
        for k, v in metrics.items():
            if k not in ("step", "total_training_flops", "total_training_time"):
                self.eval_metrics.update({k: v, f"{k}_step": step})

    def on_checkpoint(self, step: int, checkpoint_dir: str, metrics: dict) -> None:
        self._report_pointer(step, checkpoint_dir, metrics, f"step_{step:06d}")
        self.reported_steps.append(step)

    def report_final(self, result: dict) -> None:
        """The run's summary, attached to a pointer to its final checkpoint (Result.metrics = this report)."""
        metrics = {"final": True, **result, "first_step_unix_time": getattr(self, "first_step_time", None)}
        self._report_pointer(result["step"], result["checkpoint_dir"], metrics, f"final_{result['step']:06d}")

    def _with_evals(self, metrics: dict) -> dict:
        """metrics + the evaluation results that arrived since the last report (then forgotten)."""
        out = {**self.eval_metrics, **metrics}
        self.eval_metrics = {}
        return out

    def _report_pointer(self, step: int, checkpoint_dir: str, metrics: dict, name: str) -> None:
        from ray.train import Checkpoint

        metrics = self._with_evals(metrics)
        if self.rank != 0:  # every rank reports (a barrier); only rank 0 attaches the pointer
            self.ray_train.report(_plain(metrics), checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, self.MARKER), "w") as f:
                json.dump({"checkpoint_dir": checkpoint_dir, "step": step, "world_size": self.world}, f)
            self.ray_train.report(_plain(metrics), checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    # ---- asynchronous evaluation (Ray tasks launched by rank 0)

    def eval_resources(self, device) -> dict | None:
        """Resources of one eval task, or None when the cluster has nowhere to run it (evaluate in-process)."""
        import ray

        free = ray.available_resources()
        cpus = 1 if free.get("CPU", 0) >= 1 else 0  # 0: share the workers' cores rather than wait for them
        if device.type == "cuda":  # a CPU evaluation of a GPU-sized model would take hours: need an idle GPU
            return {"cpus_per_worker": cpus, "gpus_per_worker": 1} if free.get("GPU", 0) >= 1 else None
        return {"cpus_per_worker": cpus, "gpus_per_worker": 0}

    def core_metric(self, model, tokenizer, device, step: int, max_per_task: int):
        def launch(resources):
            from ray_jobs.eval_fanout import ModelRef, launch_core_async

            return launch_core_async(ModelRef.from_model(model), max_per_task=max_per_task, **resources)

        return self._launch("core", step, device, launch)

    def chat_metric(self, cfg, model, tokenizer, device, step: int, batch_size: int):
        def launch(resources):
            from ray_jobs.eval_fanout import ModelRef, launch_chatcore_async, launch_offline_chat_async

            ref = ModelRef.from_model(model)
            if cfg.mixture == "offline":
                return launch_offline_chat_async(ref, max(1, cfg.offline_size // 10), cfg.chatcore_max_cat,
                                                 cfg.chatcore_max_sample, batch_size, **resources)
            return launch_chatcore_async(ref, cfg.chatcore_max_cat, cfg.chatcore_max_sample, batch_size, **resources)

        return self._launch("chat", step, device, launch)

    def relaunch_eval(self, kind: str, step: int, checkpoint_dir: str, device, params: dict) -> bool:
        """An evaluation the previous worker group launched and never reported: again, from that step's checkpoint."""
        from ray_jobs.eval_fanout import ModelRef, launch_chatcore_async, launch_core_async, launch_offline_chat_async

        ref = ModelRef(checkpoint_dir=checkpoint_dir, step=step)

        def launch(resources):
            if kind == "core":
                return launch_core_async(ref, max_per_task=params["max_per_task"], **resources)
            cfg, batch_size = params["cfg"], params["batch_size"]
            if cfg.mixture == "offline":
                return launch_offline_chat_async(ref, max(1, cfg.offline_size // 10), cfg.chatcore_max_cat,
                                                 cfg.chatcore_max_sample, batch_size, **resources)
            return launch_chatcore_async(ref, cfg.chatcore_max_cat, cfg.chatcore_max_sample, batch_size, **resources)

        return self._launch(kind, step, device, launch) is not None

    def _launch(self, kind: str, step: int, device, launch):
        """Rank 0 launches; every rank learns whether it did (else all evaluate in-process, a collective)."""
        from nanochat.train import PENDING

        handle = None
        if self.rank == 0:
            resources = self.eval_resources(device)
            if resources is None:
                print(f"[ray] no idle GPU for the step-{step} {kind} evaluation: running it in-process")
            else:
                try:
                    handle = launch(resources)
                except Exception as e:  # e.g. the eval bundle download; in-process raises it properly if it persists
                    print(f"[ray] could not launch the step-{step} {kind} evaluation as Ray tasks ({e!r}): "
                          f"running it in-process")
        if not _broadcast(handle is not None):
            return None
        if handle is not None:
            self.pending_evals.append((kind, step, handle))
        return PENDING

    def finished_evals(self, wait: bool = False) -> list[tuple[str, int, dict]]:
        done, still = [], []
        for kind, step, handle in self.pending_evals:
            if not (wait or handle.done()):  # done() is a zero-timeout ray.wait
                still.append((kind, step, handle))
                continue
            if wait and not handle.done():
                print(f"[ray] waiting for the step-{step} {kind} evaluation to finish")
            try:
                result = handle.result()
            except Exception as e:  # a failed evaluation must not take the training run down with it
                print(f"[ray] WARNING: the step-{step} {kind} evaluation failed: {e!r}")
                continue
            done.append((kind, step, result["results"] if kind == "chat" else result))
        self.pending_evals = still
        return done


def torch_device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def own_complete_steps(checkpoint_dir: str, run_name: str) -> list[int]:
    """Complete checkpoint steps in checkpoint_dir whose meta says this Ray run wrote them."""
    from nanochat import storage
    from nanochat.checkpoint_manager import complete_steps, meta_path

    steps = []
    for s in complete_steps(checkpoint_dir):
        try:
            meta = json.loads(storage.read_bytes(meta_path(checkpoint_dir, s)))
        except (OSError, ValueError, NanochatError):
            continue
        launcher = meta.get("launcher")
        if isinstance(launcher, dict) and launcher.get("ray_run_name") == run_name:
            steps.append(s)
    return steps


def _meta_of(checkpoint_dir: str, step: int) -> dict:
    """A checkpoint's meta ({} when unreadable)."""
    from nanochat import storage
    from nanochat.checkpoint_manager import meta_path

    try:
        return json.loads(storage.read_bytes(meta_path(checkpoint_dir, step)))
    except (OSError, ValueError, NanochatError):
        return {}


def _broadcast(obj):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _plain(metrics: dict) -> dict:
    """Ray metrics must be plain Python values (no tensors)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and v == float("inf"):
            v = None
        out[k] = v
    return out


GAUGES = {  # Ray custom metric name -> (metric key in the loop's metrics, description)
    "nanochat_train_tokens_per_second": ("train/tok_per_sec", "training throughput, tokens/s over all workers"),
    "nanochat_train_mfu_percent": ("train/mfu", "model FLOPs utilization, % of peak (measured peak on CPU)"),
    "nanochat_train_loss": ("train/loss", "smoothed training loss"),
    "nanochat_train_step": ("step", "optimizer steps done"),
    "nanochat_train_step_seconds": ("train/dt", "wall time of the last optimizer step, seconds"),
    "nanochat_train_steps_lost": ("train/steps_lost", "optimizer steps lost to interruptions (restarts) so far"),
}
EVAL_GAUGES = {"nanochat_train_val_bpb": ("val/bpb", "validation bits per byte (set at each evaluation)")}


def _make_gauges(run_name: str):
    from ray.util.metrics import Gauge

    gauges = {}
    for name, (key, desc) in {**GAUGES, **EVAL_GAUGES}.items():
        g = Gauge(name, description=desc, tag_keys=("run",))
        g.set_default_tags({"run": run_name})
        gauges[key] = g
    return gauges


def _set_gauges(gauges: dict, metrics: dict):
    for key, g in gauges.items():
        if key in metrics and isinstance(metrics[key], (int, float)):
            g.set(float(metrics[key]))


# -----------------------------------------------------------------------------
# The driver side: start (or join) Ray and run a TorchTrainer


def ray_init(cluster: ClusterArgs):
    """Start or join a Ray cluster, forwarding credentials and settings to every process of the job."""
    import ray

    if ray.is_initialized():
        return
    # "local": a fresh embedded cluster, never a stray `ray start` cluster found via /tmp/ray/ray_current_cluster
    address = cluster.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env={"env_vars": {**gpu_env_defaults(), **forwarded_env()}}, log_to_driver=True)


def default_storage() -> str:
    from nanochat import storage

    return storage.join(get_base_dir(), "ray_runs")


def scaling_config(cluster: ClusterArgs, use_gpu: bool):
    """The trainer's ScalingConfig: 1 GPU (and 4 CPUs) per GPU worker, or the CPUs split across CPU workers."""
    import ray
    from ray.train import ScalingConfig

    cpus = cluster.cpus_per_worker
    if cpus <= 0:
        total = ray.cluster_resources().get("CPU", 1)
        free = total - cluster.num_workers * cluster.ray_data_actors  # Ray Data actors need CPUs of their own
        cpus = 4 if use_gpu else max(1, int(free // max(cluster.num_workers, 1)))
    resources = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    num_workers, elastic = cluster.num_workers, {}
    if cluster.min_workers > 0 and cluster.min_workers < num_workers:
        num_workers = (cluster.min_workers, cluster.num_workers)
        # how often a running elastic group checks whether it can grow back (Ray's default: 60 s)
        elastic = {"elastic_resize_monitor_interval_s": float(os.environ.get("NANOCHAT_ELASTIC_RESIZE_S", 60))}
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, **elastic)


def run_trainer(worker_fn, loop_config: dict, cluster: ClusterArgs, use_gpu: bool, run_name: str):
    """Run worker_fn(loop_config) on a TorchTrainer; returns the ray.train.Result (raises once retries run out)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from nanochat import storage

    ray_init(cluster)
    resolve_ray_data_actors(cluster, use_gpu)  # callers that skipped prepare(): reserve CPUs for auto's actors
    storage_uri = cluster.storage or default_storage()
    fs_kwargs = {"storage_path": storage_uri}
    if storage.is_remote(storage_uri):  # explicit filesystem: the endpoint and keys travel with it
        fs, path = storage.get_filesystem(storage_uri)
        fs_kwargs = {"storage_path": path, "storage_filesystem": fs}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cluster, use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(os.environ.get(
            "NANOCHAT_COLLECTIVE_TIMEOUT_S", 1800))),
        run_config=RunConfig(
            name=run_name,
            failure_config=FailureConfig(max_failures=cluster.max_failures,
                                         max_preemption_failures=cluster.max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
            worker_runtime_env={"env_vars": {**gpu_env_defaults(), **forwarded_env(), **TRAIN_WORKER_ENV}},
            **fs_kwargs,
        ),
    )
    return trainer.fit()


def cluster_dict(cluster: ClusterArgs) -> dict:
    return asdict(cluster)


# -----------------------------------------------------------------------------
# The entry points' shared shape: parse -> prepare (no Ray yet) -> run in-process or on a TorchTrainer


def parse_job_args(cfg_cls, description: str, argv=None):
    """The loop config's flags plus the cluster flags. Returns (cfg_cls instance, ClusterArgs)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_flags(parser, cfg_cls)
    add_cluster_flags(parser)
    cfg_kwargs, cluster = split_args(parser.parse_args(argv), cfg_cls)
    return cfg_cls(**cfg_kwargs), cluster


def _quiet_per_report_log() -> None:
    """Ray 2.60's Train worker context logs every ray.train.report() at INFO, metrics dict included (the final one
    carries per-step losses: ~13 kB on one line), through a logger named after its source file. That name is outside
    the `ray.train` hierarchy, so RunConfig's LoggingConfig level does not reach it and each report landed in the
    job's console log. Raise just that logger to WARNING; the reports still reach the controller and the dashboard."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_loop(loop, cfg_cls, config: dict, sink_cls=RaySink) -> None:
    """A Ray Train worker's body: the library loop with a RaySink, then one final report (all ranks).
    Entry points bind it as worker_fn = functools.partial(run_loop, loop, cfg_cls)."""
    _quiet_per_report_log()
    cfg = cfg_cls.from_dict(config["cfg"])
    sink = sink_cls(config["run_name"], config["report_every"], config.get("ray_data_actors", 0))
    sink.report_final(loop(cfg, sink))


def run_job(parse, prepare, loop, worker_fn, summary, argv=None) -> int:
    """main() of base_train / chat_sft / chat_rl. A NanochatError (bad flags, missing checkpoint, unreachable
    storage) prints one line and exits 2, before Ray starts when prepare() catches it."""
    from nanochat.common import print0, print_banner

    print_banner()
    apply_gpu_env_defaults()  # before anything touches CUDA (in-process and torchrun runs; workers: runtime_env)
    try:
        cfg, cluster = parse(argv)
        cfg, use_gpu, run_name = prepare(cfg, cluster)
        if cluster.num_workers == 0:
            result = loop(cfg)
        else:
            loop_config = {"cfg": cfg.to_dict(), "run_name": run_name, "report_every": cluster.report_every,
                           "ray_data_actors": cluster.ray_data_actors}
            result = run_trainer(worker_fn, loop_config, cluster, use_gpu, run_name).metrics
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print0(summary(result))
    return 0
