"""
Joining a Ray cluster, or starting an embedded one, for the speedrun driver; fast, clear failures.

    from ray_jobs.cluster_utils import connect
    info = connect(address=None)        # RAY_ADDRESS (set by `ray job submit`) or an embedded local cluster

Address forms accepted (the same as `ray.init`): empty (embedded cluster, or the job's cluster when running under
`ray job submit`), `auto` (the cluster started on this machine with `ray start`), `host:port` (the GCS port, 6379
by default) and `ray://host:10001` (Ray Client). An `http://host:8265` address is the dashboard / Jobs API, which
`ray job submit` uses but `ray.init` cannot: we say so instead of timing out.

Before calling `ray.init` on an explicit address, a TCP connect with a short timeout checks that something listens
there, so a wrong address fails in seconds with a message naming the fix (Ray itself retries for about a minute).

Token auth (on by default in Ray 2.60): `ray.init` finds the token itself (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token). An AuthenticationError is turned into a message that says where the token goes.

`dashboard_hint(info)` is the line a driver prints at start: where the dashboard is, that it asks for a token and
which command prints it, and whether its time-series charts can work (they need Prometheus and Grafana).
"""

import os
import socket
import time
from dataclasses import dataclass

from nanochat.common import NanochatError

CONNECT_TIMEOUT_S = 3.0
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001


@dataclass
class ClusterInfo:
    address: str  # "" for an embedded cluster
    embedded: bool
    started_here: bool  # this call ran ray.init (so the caller should shut it down)
    init_seconds: float
    dashboard_url: str | None
    num_nodes: int
    resources: dict


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for an explicit address; None for 'auto' / local / empty."""
    address = address.strip()
    if address in ("", "auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise NanochatError(
            f"{address!r} is a dashboard / Jobs API address: `ray job submit --address {address}` takes it, but the "
            f"driver needs the cluster address (host:6379, or ray://host:10001). Inside `ray job submit` leave "
            f"--address and RAY_ADDRESS unset: Ray sets RAY_ADDRESS for the job"
        )
    default_port = DEFAULT_GCS_PORT
    if address.startswith("ray://"):
        address, default_port = address[len("ray://") :], DEFAULT_CLIENT_PORT
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, str(default_port)
    host = host.strip("[]")  # [ipv6]:port
    try:
        port_num = int(port)
    except ValueError:
        raise NanochatError(f"bad Ray address {address!r}: expected host:port, e.g. 10.0.0.5:6379") from None
    if not host or not 0 < port_num < 65536:
        raise NanochatError(f"bad Ray address {address!r}: expected host:port, e.g. 10.0.0.5:6379")
    return host, port_num


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise NanochatError within `timeout` seconds when nothing listens at an explicit address."""
    target = parse_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        raise NanochatError(
            f"cannot reach the Ray cluster at {address} ({e.__class__.__name__}: {e}). Is it running "
            f"(`ray status --address {host}:{port}`)? Check the address/port and firewall, or unset RAY_ADDRESS "
            f"and drop --address to run on an embedded local Ray instead"
        ) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    include_dashboard: bool | None = None,
    env_vars: dict | None = None,
    namespace: str | None = None,
) -> ClusterInfo:
    """Join the cluster at `address` (default RAY_ADDRESS) or start an embedded one. Idempotent."""
    import ray

    address = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return _info(address, started_here=False, seconds=0.0)
    check_reachable(address)
    kwargs = {}
    if not address:
        # Ray Train's placement-group cleaner asks the State API whether the run's controller is alive. In an
        # embedded cluster it finds "the" API server by looking around the host: with a second Ray instance on the
        # machine it fails with a traceback, and without our dashboard it asks 127.0.0.1:8265, where another
        # cluster's dashboard does not know our controller and the cleaner removes our placement group (the
        # workers die). Give the dashboard a port of our choosing and point every process of the job at it.
        port = _free_port()
        if include_dashboard is not False:
            kwargs["dashboard_port"] = port
        env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **(env_vars or {})}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
        # Under `ray job submit` the job already has a runtime env (working_dir, env_vars): merge ours into it
        # instead of failing on keys both set (ours win: e.g. the resolved NANOCHAT_BASE_DIR).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    if namespace:
        kwargs["namespace"] = namespace
    if address:
        kwargs["address"] = address
    else:
        kwargs["address"] = "local"  # never join a stray `ray start` cluster recorded in /tmp/ray
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if include_dashboard is not None:
            kwargs["include_dashboard"] = include_dashboard
    t0 = time.time()
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise NanochatError(
            f"could not connect to Ray at {address or 'auto'}: {e}. Start one with `ray start --head`, or unset "
            f"RAY_ADDRESS to use an embedded local Ray"
        ) from None
    except Exception as e:  # AuthenticationError and friends have no common public base class
        if "auth" in type(e).__name__.lower() or "token" in str(e).lower():
            raise NanochatError(
                f"Ray rejected the connection to {address or 'the local cluster'} ({type(e).__name__}: {e}). The "
                f"cluster uses token auth: put its token in ~/.ray/auth_token, or set RAY_AUTH_TOKEN / "
                f"RAY_AUTH_TOKEN_PATH (with RAY_AUTH_MODE=token)"
            ) from None
        raise
    return _info(address, started_here=True, seconds=time.time() - t0)


def _info(address: str, started_here: bool, seconds: float) -> ClusterInfo:
    import ray

    ctx = ray.get_runtime_context()
    dashboard = getattr(ctx, "dashboard_url", None) or None
    if dashboard is None:
        try:
            dashboard = ray.worker.get_dashboard_url() or None
        except Exception:
            dashboard = None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=address,
        embedded=not address,
        started_here=started_here,
        init_seconds=seconds,
        dashboard_url=dashboard,
        num_nodes=len(nodes),
        resources={k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
    )


def _token_auth_enabled() -> bool:
    try:  # the mode this process runs with (env, or enabled by default for a new local cluster)
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # moved in another Ray version: the documented default
        return os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"


def dashboard_hint(info: ClusterInfo, token_auth: bool | None = None) -> str | None:
    """One line: the dashboard's URL, how to get its token, and whether its charts have Prometheus/Grafana."""
    if not info.dashboard_url:
        return None
    url = info.dashboard_url if "://" in info.dashboard_url else f"http://{info.dashboard_url}"
    token_auth = _token_auth_enabled() if token_auth is None else token_auth
    if info.embedded:
        where = f"dashboard {url}"
        token = "it asks for a token: `ray get-auth-token` prints it" if token_auth else ""
    else:
        where = (f"dashboard {url} on the head (from your machine: `ray dashboard CLUSTER.yaml`, or "
                 f"`kubectl port-forward svc/<cluster>-head-svc 8265`)")  # fmt: skip
        token = "token: `ray get-auth-token` on the head" if token_auth else ""
    charts = ""
    if not (os.environ.get("RAY_PROMETHEUS_HOST") and os.environ.get("RAY_GRAFANA_HOST")):
        charts = ("time-series charts need Prometheus + Grafana (RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST; "
                  "cluster/README.md, Watch)")  # fmt: skip
    return " | ".join(part for part in (where, token, charts) if part)


def shutdown(info: ClusterInfo | None) -> None:
    """Shut down Ray if `connect` started it (a joined cluster keeps running)."""
    import ray

    if info is not None and info.started_here and ray.is_initialized():
        ray.shutdown()
