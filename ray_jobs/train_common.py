"""
Shared Ray Train wiring for the training entry points (base_train, chat_sft): cluster flags, storage checks,
`TorchTrainer` set-up, the job scaffolding shared by the entry points; `RaySink` (the library `TrainSink` on Ray
Train, run inside each worker) is in ray_jobs/ray_sink.py.

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
import logging
import os
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, fields

from nanochat.common import NanochatError, apply_gpu_env_defaults, get_base_dir, gpu_env_defaults
from ray_jobs.ray_sink import AUTO_RAY_DATA_ACTORS, EVAL_GAUGES, GAUGES, RaySink  # noqa: F401 (re-exported)

# Environment forwarded to the Ray job and its workers: storage credentials/endpoint, nanochat and wandb settings.
FORWARD_ENV_PREFIXES = ("AWS_", "NANOCHAT_", "WANDB_", "HF_", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                        "PYTORCH_")
# Ray 2.60's Train V2 patches print() in workers to log through the root logger, and also prints to sys.stdout
# when that is not sys.__stdout__ (always so in a Ray worker): every line reached the driver twice, from the
# worker's .out and .err. Workers print plainly; Ray's log monitor still forwards and stores every line once.
TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


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
# The driver side: start (or join) Ray and run a TorchTrainer


def ray_init(cluster: ClusterArgs):
    """Start or join a Ray cluster (ray_jobs.cluster_utils.connect: an embedded one unless an address is given),
    forwarding credentials and settings to every process of the job."""
    from ray_jobs.cluster_utils import connect

    connect(cluster.address, env_vars={**gpu_env_defaults(), **forwarded_env()})


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
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        user_error = _user_error_of(e)
        if user_error is None:
            raise
        raise user_error from None  # e.g. a corrupt checkpoint on S3, found only when a worker loads it


def _user_error_of(failure: BaseException):
    """The NanochatError (a user error: damaged checkpoint, bad flags) behind a failed run, if a worker raised one."""
    for err in getattr(failure, "worker_failures", {}).values():
        for _ in range(8):  # the worker's exception, possibly wrapped (RayTaskError.cause, raise ... from)
            if err is None or isinstance(err, NanochatError):
                break
            err = getattr(err, "cause", None) or err.__cause__
        if isinstance(err, NanochatError):
            return err
    return None


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
