"""
Shared utilities: base directory, compute dtype, logging, device and process-group setup, peak-FLOPs tables.

Everything here is plain PyTorch. The process-group setup is idempotent, so the same code runs single-process,
under torchrun, and inside a Ray Train worker (where Ray has already created the group).
"""

import functools
import logging
import os
import time
import urllib.request

import torch
import torch.distributed as dist
from filelock import FileLock


class NanochatError(Exception):
    """A user-facing error. Its message says what went wrong and what to run or change to fix it."""


# -----------------------------------------------------------------------------
# Compute dtype: master weights stay fp32; matmuls and activations run in COMPUTE_DTYPE (no autocast).

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _detect_compute_dtype() -> tuple[torch.dtype, str]:
    forced = os.environ.get("NANOCHAT_DTYPE")
    if forced:
        if forced not in _DTYPES:
            raise NanochatError(f"NANOCHAT_DTYPE={forced!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[forced], f"set via NANOCHAT_DTYPE={forced}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"auto-detected: CUDA SM {major}{minor} (bf16 supported)"
        # fp16 needs a GradScaler everywhere; fp32 is the safe default on pre-Ampere GPUs.
        return torch.float32, f"auto-detected: CUDA SM {major}{minor} (pre-Ampere, using fp32)"
    return torch.float32, "auto-detected: no CUDA (CPU/MPS)"


COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _detect_compute_dtype()

# -----------------------------------------------------------------------------
# Logging

logger = logging.getLogger("nanochat")


def setup_default_logging(level: int = logging.INFO) -> None:
    """Plain INFO logging with upstream's format; called by entry points, never at import."""
    logging.basicConfig(level=level, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")


def print0(s: str = "", **kwargs) -> None:
    """print() on global rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(s, **kwargs)


def print_banner() -> None:
    print0(r"""
                             _           _
  _ __   __ _ _ __   ___   ___| |__   __ _| |_
 | '_ \ / _` | '_ \ / _ \ / __| '_ \ / _` | __|
 | | | | (_| | | | | (_) | (__| | | | (_| | |_
 |_| |_|\__,_|_| |_|\___/ \___|_| |_|\__,_|\__|   on Ray
""")


# -----------------------------------------------------------------------------
# Base directory: a local path (created on demand) or an s3:// URI (returned as-is).


def get_base_dir() -> str:
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    if "://" in base:
        return base.rstrip("/")
    os.makedirs(base, exist_ok=True)
    return base


def get_local_cache_dir() -> str:
    """A local directory for artifacts that must live on local disk (downloads, unzipped bundles).

    Equal to the base dir when that is local; under ~/.cache/nanochat-local/<bucket/prefix> when the base dir is remote.
    """
    base = get_base_dir()
    if "://" not in base:
        return base
    local = os.path.join(os.path.expanduser("~"), ".cache", "nanochat-local", base.split("://", 1)[1].split("?")[0])
    os.makedirs(local, exist_ok=True)
    return local


def download_file_with_lock(url: str, filename: str, postprocess_fn=None) -> str:
    """Download url to <local cache>/filename once; concurrent callers on one machine wait on a file lock."""
    path = os.path.join(get_local_cache_dir(), filename)
    if os.path.exists(path):
        return path
    with FileLock(path + ".lock"):
        if os.path.exists(path):  # another process finished while we waited
            return path
        print(f"Downloading {url}...")
        tmp = path + ".tmp"
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if postprocess_fn is not None:
            postprocess_fn(tmp)  # runs on the complete download, before it becomes visible
        os.replace(tmp, path)
        print(f"Downloaded to {path}")
    return path


# -----------------------------------------------------------------------------
# Process environment of GPU runs

ALLOC_CONF_DEFAULT = "expandable_segments:True"  # upstream's: less fragmentation, lower peak memory


def gpu_env_defaults(environ=None) -> dict:
    """Environment that GPU training processes get unless the user set their own: the CUDA caching allocator's
    expandable segments (PYTORCH_ALLOC_CONF; a value in the older PYTORCH_CUDA_ALLOC_CONF counts as the user's)."""
    environ = os.environ if environ is None else environ
    if "PYTORCH_ALLOC_CONF" in environ or "PYTORCH_CUDA_ALLOC_CONF" in environ:
        return {}
    return {"PYTORCH_ALLOC_CONF": ALLOC_CONF_DEFAULT}


def apply_gpu_env_defaults() -> dict:
    """Put gpu_env_defaults() into this process; entry points call it first, before anything touches CUDA.

    The environment is what child processes (torchrun ranks, Ray workers) inherit. torch may already be imported
    here, so the setting is also handed to the allocator directly (it takes effect for allocations after it).
    Returns what was set."""
    defaults = gpu_env_defaults()
    os.environ.update(defaults)
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if defaults and setter is not None and torch.cuda.is_available():
        setter(defaults["PYTORCH_ALLOC_CONF"])
    return defaults


# -----------------------------------------------------------------------------
# torch.compile or eager: the fastest choice for a run

CPU_EAGER_MFU = 0.3  # eager CPU training MFU against the measured matmul peak (d4, 2-core machine: 0.3-0.4)
CPU_COMPILE_MIN_EAGER_S = 600  # compile on CPU only for runs of >= 10 eager minutes (see compile_choice)


def have_cpp_compiler() -> bool:
    """Inductor needs a C++ compiler to compile for CPU (CXX, else g++/c++/clang++ on PATH)."""
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def compile_choice(setting: int, device_type: str, eager_seconds: float) -> tuple[bool, str]:
    """(compile?, why) for --compile `setting` (1, 0, -1 = auto) of a run estimated at `eager_seconds` eager.

    Auto: CUDA always (upstream's choice). CPU: when a C++ compiler exists and the run is long enough to pay the
    compile back: compiling costs about a minute of a 2-core CPU per few layers and speeds steps up ~1.15-1.2x
    (fused elementwise ops; matmuls dominate), so it wins only after ~6-7 eager minutes; below the threshold eager
    finishes first (and tests, smoke runs and the CPU speedrun's few-minute budgets stay eager). MPS: eager."""
    if setting in (0, 1):
        return bool(setting), f"--compile {setting}"
    if device_type == "cuda":
        return True, "auto: CUDA"
    if device_type != "cpu":
        return False, f"auto: {device_type}"
    if not have_cpp_compiler():
        return False, "auto: no C++ compiler for inductor on CPU"
    if eager_seconds < CPU_COMPILE_MIN_EAGER_S:
        return False, f"auto: ~{eager_seconds / 60:.1f} eager minutes, too short to pay back a CPU compile"
    return True, f"auto: ~{eager_seconds / 60:.0f} eager minutes on CPU pay back the compile"


# -----------------------------------------------------------------------------
# Devices and distributed setup


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type


def is_ddp_requested() -> bool:
    """True when a launcher (torchrun, Ray Train) exported the rank environment."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_dist_info() -> tuple[bool, int, int, int]:
    """(ddp, rank, local_rank, world_size) from the launcher's environment."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


_created_process_group = False


def compute_init(device_type: str = "cuda"):
    """Seed, set precision and join the process group. Returns (ddp, rank, local_rank, world_size, device).

    Idempotent: a group that torchrun-launched code or Ray Train already created is reused, never re-created.
    """
    global _created_process_group
    if device_type not in ("cuda", "mps", "cpu"):
        raise NanochatError(f"unknown device type {device_type!r}: use --device-type cuda, cpu or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device-type cuda was requested but this PyTorch has no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise NanochatError("--device-type mps was requested but MPS is not available")

    torch.manual_seed(42)  # only weight init uses the global RNG; everything else takes explicit generators
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank if ddp else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and world_size > 1 and not is_ddp_initialized():
        # torch.distributed.nn.functional stores group.WORLD as default arguments when first imported (torch
        # 2.13; torch.optim.Optimizer imports it via torch._dynamo). Imported after the group exists, it pins the
        # group past destroy_process_group, and gloo's threads then live into interpreter shutdown, where one can
        # abort the process (std::terminate). Imported now, its defaults are None.
        import torch.distributed.nn.functional as _pin_free  # noqa: F401

        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        _created_process_group = True
        dist.barrier()
    if rank == 0:
        logger.info(f"Distributed world size: {world_size}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    """Destroy the process group only if compute_init created it (Ray Train owns its own)."""
    global _created_process_group
    if _created_process_group and is_ddp_initialized():
        dist.destroy_process_group()
    _created_process_group = False


class DummyWandb:
    """Stand-in for a wandb run when --run=dummy: same methods, does nothing."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


# -----------------------------------------------------------------------------
# Peak throughput tables: denominators of MFU (dense BF16 FLOP/s) and MBU (bytes/s). First match wins.

_PEAK_FLOPS = (
    (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12), (("l4",), 121e12),
    (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi300a",), 980.6e12),
    (("mi250x",), 383e12), (("mi250",), 362.1e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
)  # fmt: skip

_PEAK_BANDWIDTH = (
    (("gb200",), 8.0e12), (("grace blackwell",), 8.0e12), (("b200",), 8.0e12), (("b100",), 8.0e12),
    (("h200",), 4.8e12), (("h100", "nvl"), 3.9e12), (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12),
    (("h800", "pcie"), 2.0e12), (("h800",), 3.35e12),
    (("a100",), 2.0e12), (("a800",), 2.0e12), (("a40",), 696e9), (("a30",), 933e9),
    (("l40s",), 864e9), (("l40-s",), 864e9), (("l40 s",), 864e9), (("l4",), 300e9),
    (("mi355",), 8e12), (("mi325",), 6e12), (("mi300x",), 5.3e12), (("mi300a",), 5.3e12),
    (("mi250x",), 3.28e12), (("mi250",), 3.28e12),
    (("5090",), 1.79e12), (("4090",), 1.01e12), (("3090",), 936e9),
)  # fmt: skip


def _lookup(table, device_name: str, what: str) -> float:
    name = device_name.lower()
    for patterns, value in table:
        if all(p in name for p in patterns):
            return value
    if what == "flops" and "data center gpu max 1550" in name:  # Intel PVC: scales with compute units
        return 512 * torch.xpu.get_device_properties("xpu").max_compute_units * 1300e6
    logger.warning(f"Peak {what} unknown for {device_name!r}; MFU/MBU will show as 0")
    return float("inf")


def get_peak_flops(device_name: str) -> float:
    """Dense BF16 peak FLOP/s of a GPU, by name; inf when unknown (so MFU reads 0 rather than a wrong guess)."""
    return _lookup(_PEAK_FLOPS, device_name, "flops")


def get_peak_bandwidth(device_name: str) -> float:
    """Peak memory bandwidth of a GPU in bytes/s, by name; inf when unknown."""
    return _lookup(_PEAK_BANDWIDTH, device_name, "bandwidth")


@functools.cache
def _matmul_operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # a private generator: the global RNG (weight init) is never touched
    return torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)


def _matmul_burst(n: int, seconds: float) -> float:
    """FLOP/s of back-to-back n x n fp32 matmuls on this process's threads over about `seconds` (at least one)."""
    a, b = _matmul_operands(n)
    calls, start = 0, time.perf_counter()
    while not calls or time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start)


@functools.cache
def cpu_peak_flops(n: int = 1024, bursts: int = 12, burst_s: float = 0.04, gap_s: float = 0.18) -> float:
    """Measured fp32 matmul FLOP/s of this process's CPU threads: the MFU denominator on CPU.

    A large square matmul is as close to peak as PyTorch gets on a CPU, so MFU against it reads as
    "fraction of achievable matmul throughput". The rate is the best of `bursts` short windows spread over
    about 2.5 s, because other processes may hold the cores for a while (see PeakFlops). Once per process.
    """
    _matmul_burst(n, 0.0)  # warm up the BLAS threads
    best = 0.0
    for i in range(bursts):
        if i:
            time.sleep(gap_s)
        best = max(best, _matmul_burst(n, burst_s))
    return best


def device_peak_flops(device: torch.device) -> float:
    """MFU denominator for a device: the GPU table on CUDA, a measurement on CPU."""
    if device.type == "cuda":
        return get_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak_flops()
    return float("inf")


class PeakFlops:
    """The MFU denominator of a training loop: `value` starts at device_peak_flops(device), and on CPU `refresh()`
    (one 40 ms matmul burst) raises it to the best rate seen so far. A Ray Train worker measures its peak while
    Ray's dashboard agent and Train controller are still starting on the same cores: on a 2-core machine that read
    1.03e11 FLOP/s against 2.2e11 measured quietly, and MFU showed 92%. Loops read `current()` once per step, which
    refreshes every 10th call (0.3% of a 1.3 s step), so a low start-up reading is corrected within a few refreshes."""

    def __init__(self, device: torch.device, refresh_every: int = 10):
        self.on_cpu = device.type == "cpu"
        self.value = device_peak_flops(device)
        self.refresh_every, self.calls = refresh_every, 0

    def current(self) -> float:
        """The denominator for this step: refreshed first on the 1st, 11th, 21st, ... call."""
        if self.calls % self.refresh_every == 0:
            self.refresh()
        self.calls += 1
        return self.value

    def refresh(self) -> float:
        if self.on_cpu:
            self.value = max(self.value, _matmul_burst(1024, 0.04))
        return self.value
