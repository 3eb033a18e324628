"""
Try a `ray up` cluster config on this machine: its node types become an autoscaling cluster of fake nodes (Ray's
`fake_multinode` provider), and the head starts with the config's own `ray start --head` command.

    python cluster/local_cluster.py up cluster/aws-gpu.yaml         # prints the dashboard, token and submit command
    export RAY_ADDRESS=http://127.0.0.1:PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...
    ray job submit --entrypoint-num-cpus 0 --runtime-env-json '{"env_vars": {"PYTHONPATH": "'$PWD'"}}' \
        -- $PWD/.venv/bin/python $PWD/ray_jobs/speedrun.py --preset cpu-tiny
    python cluster/local_cluster.py status --state /tmp/rlcXXXX/local_cluster.json
    python cluster/local_cluster.py down --state /tmp/rlcXXXX/local_cluster.json

Kept from the config: the node type names, their min/max workers, the cluster's max_workers and upscaling speed, the
head's advertised resources and the flags of its `ray start --head` command (the autoscaler runs on the head, as
after `ray up`, with autoscaler v2 as `ray up` enables it). Replaced: the cloud (fake nodes are Ray processes on this
machine), each worker type's resources (CPU-sized: --cpus-per-node CPUs, no GPUs), every port (free ones), the idle
timeout (--idle-timeout-s, so a scale-down is seen in seconds), docker and setup commands (not run).

Submit without `--working-dir` (the code is on this machine, as it is in the image on a real cluster): the fake nodes
share this machine's Ray session directory, and a worker node's runtime-env agent deletes a working_dir it no longer
needs, which is the head's copy too (the job's driver would lose its current directory).

`ray down` is not used: for this provider it runs `ray stop` on the machine, which stops every Ray cluster of the
user. `down` ends the process session that `up` started (the head, its autoscaler and the fake nodes the autoscaler
launched all live in it) plus any process whose command line names this cluster's temp dir; nothing else.
"""

import argparse
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

FAKE_HEAD_TYPE = "ray.head.default"  # the head node type name Ray's fake provider reports for its head
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"  # the fake provider's fixed head node id (node_provider.FAKE_HEAD_NODE_ID)
# `ray start --head` flags that name ports or the local bootstrap file: replaced with free ports / our files
REPLACED_FLAGS = {"--port", "--autoscaling-config", "--dashboard-host", "--dashboard-port", "--metrics-export-port",
                  "--temp-dir", "--block", "--head"}  # fmt: skip


def free_ports(n: int) -> list[int]:
    """n distinct free loopback TCP ports (all bound at once, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def head_start_flags(config: dict) -> list[str]:
    """The flags of the config's `ray start --head` command, minus those that name ports or local files."""
    for cmd in config.get("head_start_ray_commands") or []:
        for part in cmd.split(";"):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"] and "--head" in argv:
                kept = []
                for arg in argv[2:]:
                    name = arg.split("=", 1)[0]
                    if name not in REPLACED_FLAGS:
                        kept.append(arg)
                return kept
    raise SystemExit("error: the config has no `ray start --head ...` in head_start_ray_commands")


def derive_config(config: dict, cpus_per_node: int, idle_timeout_s: float, gcs_address: str) -> dict:
    """The fake_multinode config for `config`: same node types and scaling limits, CPU-sized local nodes."""
    head_type = config["head_node_type"]
    types = {}
    for name, t in config["available_node_types"].items():
        if name == head_type:
            resources = {k: v for k, v in (t.get("resources") or {}).items() if k != "GPU"}
            types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        types[name] = {
            "resources": {"CPU": cpus_per_node},  # the real type's GPUs/CPUs come from the instance; here: CPUs only
            "node_config": {},
            "min_workers": int(t.get("min_workers", 0)),
            "max_workers": int(t.get("max_workers", config.get("max_workers", 1))),
        }
    return {
        "cluster_name": f"{config['cluster_name']}-local",
        "max_workers": int(config.get("max_workers", 1)),
        "upscaling_speed": float(config.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        # Ray's fake_multinode provider, loaded as an `external` module: the wheel lacks the defaults file that
        # `type: fake_multinode` reads (fake_multi_node/example.yaml), and the provider class is the same
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "gcs_address": gcs_address,
            "disable_node_updaters": True,
        },  # fake nodes start Ray themselves: nothing to install  # fmt: skip
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def up(config_path: str, temp_dir: str | None, cpus_per_node: int, idle_timeout_s: float,
       system_config: dict | None = None, timeout: float = 180) -> dict:  # fmt: skip
    """Start the head (in its own process session) and wait until its Jobs API answers. Returns the state dict."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="/tmp/rlc")  # short: Ray's socket paths have a length limit
    os.makedirs(temp_dir, exist_ok=True)
    gcs, dash, metrics, agent_listen, agent_grpc, client, rt_env = free_ports(7)
    derived = derive_config(config, cpus_per_node, idle_timeout_s, f"{node_ip()}:{gcs}")
    derived_path = os.path.join(temp_dir, "autoscaling_config.yaml")
    with open(derived_path, "w") as f:
        yaml.safe_dump(derived, f)
    head_resources = derived["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    argv = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={gcs}",
            f"--autoscaling-config={derived_path}", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--ray-client-server-port={client}", f"--runtime-env-agent-port={rt_env}",
            *head_start_flags(config)]  # fmt: skip
    if "CPU" in head_resources and not any(a.startswith("--num-cpus") for a in argv):
        argv.append(f"--num-cpus={head_resources['CPU']}")
    if system_config:
        argv.append(f"--system-config={json.dumps(system_config, separators=(',', ':'))}")
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           # what `ray up` exports before the head's start command (autoscaler v2, the head's instance id and type)
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_NODE_TYPE_NAME": FAKE_HEAD_TYPE}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state = {"pid": proc.pid, "temp_dir": temp_dir, "address": f"http://127.0.0.1:{dash}", "token": token,
             "gcs_address": derived["provider"]["gcs_address"], "config": os.path.abspath(config_path),
             "autoscaling_config": derived_path}  # fmt: skip
    state_path = os.path.join(temp_dir, "local_cluster.json")
    with open(state_path, "w") as f:
        json.dump(state, f, indent=2)
    state["state_path"] = state_path
    try:
        wait_ready(state, proc, timeout)
    except BaseException:
        down(state)
        raise
    return state


def api(state: dict, path: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(state["address"] + path, headers={"Authorization": f"Bearer {state['token']}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(state: dict, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(os.path.join(state["temp_dir"], "ray_start.log")) as f:
                raise SystemExit(f"error: `ray start --head` exited ({proc.returncode}):\n{f.read()[-3000:]}")
        try:
            api(state, "/api/version", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the head's dashboard did not answer within {timeout:.0f}s")


def nodes(state: dict) -> list[dict]:
    """Alive nodes: [{'node_id', 'is_head', 'node_type'}] from the dashboard's state API."""
    out = api(state, "/api/v0/nodes?limit=1000&detail=true")
    rows = out["data"]["result"]["result"]
    return [{"node_id": r["node_id"], "is_head": r.get("is_head_node", False),
             "node_type": (r.get("labels") or {}).get("ray.io/node-group")
             or (r.get("labels") or {}).get("ray.io/node-type-name")}
            for r in rows if r.get("state") == "ALIVE"]  # fmt: skip


def session_pids(state: dict) -> list[int]:
    """Every process of this cluster: the head's process session plus any whose command line names its temp dir."""
    pids, mark = set(), state["temp_dir"].encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.getsid(int(d)) == state["pid"]:
                pids.add(int(d))
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if mark in f.read():
                    pids.add(int(d))
        except OSError:
            continue
    return sorted(pids)


def down(state: dict, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL, exactly this cluster's processes."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(state):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and session_pids(state):
            time.sleep(0.5)
        if not session_pids(state):
            break
    try:
        os.waitpid(state["pid"], os.WNOHANG)  # reap the head if we are its parent
    except ChildProcessError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the head of a local fake-node cluster from a ray up config")
    u.add_argument("config")
    u.add_argument("--temp-dir", default=None)
    u.add_argument("--cpus-per-node", type=int, default=2, help="CPUs of each fake worker node (default 2)")
    u.add_argument("--idle-timeout-s", type=float, default=10.0, help="scale an idle worker down after this")
    u.add_argument(
        "--system-config",
        type=json.loads,
        default=None,
        help="Ray system config (JSON), e.g. "
        "'{\"metrics_report_interval_ms\": 1000}' to export custom metrics every second",
    )
    for name in ("status", "down"):
        p = sub.add_parser(name)
        p.add_argument("--state", required=True, help="the local_cluster.json that `up` printed")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        state = up(args.config, args.temp_dir, args.cpus_per_node, args.idle_timeout_s, args.system_config)
        print(json.dumps({k: state[k] for k in ("address", "state_path", "temp_dir")}))
        print(f"export RAY_ADDRESS={state['address']} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={state['token']}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = json.dumps({"env_vars": {"PYTHONPATH": root}})
        print(
            f"ray job submit --entrypoint-num-cpus 0 --runtime-env-json '{env}' -- {sys.executable} "
            f"{root}/ray_jobs/speedrun.py --preset cpu-tiny"
        )
        print(f"python cluster/local_cluster.py down --state {state['state_path']}")
        return 0
    with open(args.state) as f:
        state = json.load(f)
    if args.cmd == "status":
        print(json.dumps(nodes(state), indent=2))
    else:
        down(state)
        print(f"stopped {state['address']} ({state['temp_dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
