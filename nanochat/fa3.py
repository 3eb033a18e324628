"""
Finding the Flash Attention 3 kernel: which GPUs get it, where it comes from, and why it is not used.

    from nanochat import fa3
    module, reason = fa3.lookup()      # (flash_attn_interface module or None, one-line reason)
    python -m nanochat.fa3 --prefetch  # put the kernels into the HF cache (cluster image builds; needs network)

Decision (upstream's facts): bf16 compute on a CUDA GPU of compute capability 8.x (sm80/86/89: the
`kernels-community/flash-attn3` build) or 9.x (Hopper: `varunneal/flash-attention-3`); anything else runs SDPA.
A locally installed `flash_attn_interface` (an FA3 source build) wins over the Hub. The Hub kernel is loaded from
the local HF cache first (no network needed: what a pre-fetched cluster image relies on); only when it is not
cached is the Hub asked, after a probe of the endpoint bounded to PROBE_S seconds, and the download itself is
bounded to NANOCHAT_FA3_TIMEOUT_S (default 180 s). So a machine without network falls back to SDPA in seconds
instead of hanging on DNS or TCP timeouts. `kernels` (pip install -e ".[gpu]") is optional; without it: SDPA.
"""

import contextlib
import inspect
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

HOPPER_REPO = "varunneal/flash-attention-3"  # sm90 build (upstream's choice for H100/H200)
AMPERE_ADA_REPO = "kernels-community/flash-attn3"  # sm80/86/89 build
REVISION = "main"  # what kernels < 0.12 fetched by default; newer versions want it explicit
PROBE_S = 3.0  # longest wait for "is the Hub reachable" (DNS + connect + first byte)


def plan(cuda: bool, capability: tuple[int, int] | None, dtype: torch.dtype) -> tuple[str | None, str]:
    """(Hub repo to try, "") or (None, why FA3 is not tried) from the decision inputs."""
    if not cuda:
        return None, "no CUDA device (CPU run)"
    major, minor = capability
    if major not in (8, 9):
        return None, f"sm{major}{minor} is not a GPU the FA3 kernels are built for (sm80/86/89/90)"
    if dtype != torch.bfloat16:
        return None, f"compute dtype is {str(dtype).removeprefix('torch.')}, FA3 needs bfloat16"
    return (HOPPER_REPO if major == 9 else AMPERE_ADA_REPO), ""


def _kernel_kwargs(fn, repo: str) -> dict:
    """revision / trust arguments that this version of `kernels` accepts (its API changed across versions)."""
    params = inspect.signature(fn).parameters
    kwargs = {"revision": REVISION} if "revision" in params else {}
    if "trust_remote_code" in params:  # newer `kernels` loads only trusted publishers unless told: both repos are
        kwargs["trust_remote_code"] = [repo]  # upstream's fixed choices (varunneal is not a "trusted publisher")
    return kwargs


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub (and `kernels`, which reads the same flag per call) use the local cache only."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _with_deadline(fn, seconds: float):
    """fn() in a daemon thread: (True, result) / (True, exception) when it finished in time, else (False, None).
    A thread stuck in DNS or a socket read is abandoned, not waited for."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: B036 - reported to the caller, never raised in the thread
            box["value"] = e

    t = threading.Thread(target=run, name="fa3-lookup", daemon=True)
    t.start()
    t.join(seconds)
    return ("value" in box), box.get("value")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_S) -> bool:
    """Does the Hub endpoint answer HTTP within `timeout` seconds (DNS included)?"""

    def probe():
        url = hub_endpoint() + "/api/models?limit=1"
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https"):
            return False
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True

    done, value = _with_deadline(probe, timeout)
    if done and isinstance(value, urllib.error.HTTPError):
        return True  # it answered (any status): the network is there
    return done and value is True


def load_kernel(repo: str, download_timeout: float | None = None) -> tuple[object | None, str]:
    """(flash_attn_interface, how it was found) or (None, why not) for one Hub repo. Never raises or hangs."""
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "the `kernels` package is not installed (pip install -e '.[gpu]')"
    kwargs = _kernel_kwargs(get_kernel, repo)
    try:
        with _hub_offline():
            return get_kernel(repo, **kwargs).flash_attn_interface, f"FA3 kernel {repo} loaded from the HF cache"
    except Exception as e:  # not cached (or a broken cache entry): try the Hub below
        cache_error = e
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None, f"FA3 kernel {repo} is not in the HF cache and HF_HUB_OFFLINE is set ({_short(cache_error)})"
    if not hub_reachable():
        return None, (f"FA3 kernel {repo} is not in the HF cache and {hub_endpoint()} could not be reached "
                      f"(limit {PROBE_S:.0f} s; no network? pre-fetch it: python -m nanochat.fa3 --prefetch)")
    if download_timeout is None:
        download_timeout = float(os.environ.get("NANOCHAT_FA3_TIMEOUT_S", 180))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    done, value = _with_deadline(lambda: get_kernel(repo, **kwargs).flash_attn_interface, download_timeout)
    if not done:
        return None, f"FA3 kernel {repo}: download did not finish within {download_timeout:.0f} s"
    if isinstance(value, BaseException):
        return None, f"FA3 kernel {repo} could not be loaded: {_short(value)}"
    return value, f"FA3 kernel {repo} downloaded from the Hub and loaded"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


def lookup(dtype: torch.dtype | None = None) -> tuple[object | None, str]:
    """(FA3 interface module or None, one-line reason) for this process's GPU and compute dtype."""
    if dtype is None:
        from nanochat.common import COMPUTE_DTYPE

        dtype = COMPUTE_DTYPE
    cuda = torch.cuda.is_available()
    repo, reason = plan(cuda, torch.cuda.get_device_capability() if cuda else None, dtype)
    if repo is None:
        return None, reason
    try:
        import flash_attn_interface  # a local FA3 build, if someone installed one

        return flash_attn_interface, "FA3 from the locally installed flash_attn_interface"
    except ImportError:
        pass
    return load_kernel(repo)


def prefetch(repos=(HOPPER_REPO, AMPERE_ADA_REPO)) -> int:
    """Download the FA3 kernels for this torch/CUDA build into the HF cache (no GPU needed). Returns an exit code."""
    try:
        from kernels import install_kernel
    except ImportError:
        print("error: the `kernels` package is not installed: pip install -e '.[gpu]'", file=sys.stderr)
        return 2
    failed = 0
    for repo in repos:
        t0 = time.time()
        try:
            path = install_kernel(repo, **_kernel_kwargs(install_kernel, repo))
            print(f"{repo}: cached at {path} ({time.time() - t0:.1f} s)")
        except Exception as e:
            failed += 1
            print(f"{repo}: FAILED: {_short(e)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--prefetch"]:
        sys.exit(prefetch())
    module, why = lookup()
    print(f"FA3 {'available' if module is not None else 'not used'}: {why}")
