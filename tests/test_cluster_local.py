"""python -m pytest tests/test_cluster_local.py -q        (about 2.5 minutes; Debian's `prometheus` must be installed)

cluster/aws-gpu.yaml run on this machine the way a user runs it: `cluster/local_cluster.py up` starts the head with
the config's own `ray start --head` flags and its node types (GPU nodes become CPU-sized fake nodes, min_workers 0),
Prometheus scrapes the nodes listed in the session's service-discovery file with the scrape config Ray generated,
`ray job submit` runs the speedrun (cpu-tiny: data, tokenizer, pretraining). The test sees the autoscaler add a
`gpu_8x_h100` node for the job's work, the training gauges in Prometheus (through the Grafana dashboard's own
queries), the job succeed, the idle node scaled down, and `down` leave no process of the cluster behind.
Only the processes of this cluster and this Prometheus are stopped (never `ray stop`, never by name).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cluster"))
import local_cluster  # noqa: E402

sys.path.remove(str(ROOT / "cluster"))
RAY = str(Path(sys.executable).with_name("ray"))
DASHBOARD = json.loads((ROOT / "cluster" / "monitoring" / "nanochat-dashboard.json").read_text())
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def wait_for(cond, timeout, what, every=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(what)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:")) != "Z"
    except (OSError, StopIteration):
        return False


class Prometheus:
    """Prometheus as a cluster head starts it (cluster/monitoring/start-monitoring.sh: Ray's generated scrape config
    for this session, nanochat's Grafana dashboard added to Ray's), on a free loopback port, scraping every second."""

    def __init__(self, session_dir: str, workdir: str):
        if shutil.which("prometheus") is None:
            pytest.fail("Prometheus is not installed: run `bash install.sh --test` (apt-get install prometheus)")
        self.workdir = Path(workdir)
        (self.port,) = local_cluster.free_ports(1)
        env = {
            **os.environ,
            "RAY_SESSION_DIR": session_dir,
            "MONITORING_DIR": workdir,
            "PROMETHEUS_PORT": str(self.port),
            "PROMETHEUS_SCRAPE_INTERVAL": "1s",
            "PATH": os.environ["PATH"],
        }
        out = subprocess.run(["bash", str(ROOT / "cluster" / "monitoring" / "start-monitoring.sh")], env=env,
                             capture_output=True, text=True, timeout=240)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        self.pid = int((self.workdir / "prometheus.pid").read_text())
        # Ray's config, with the session's service-discovery file, and the dashboard next to Ray's own
        config = yaml.safe_load((self.workdir / "prometheus.yml").read_text())
        (sd_file,) = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
        assert sd_file == str(Path(session_dir) / "prom_metrics_service_discovery.json")
        assert config["global"]["scrape_interval"] == "1s"
        assert (Path(session_dir) / "metrics" / "grafana" / "dashboards" / "nanochat-dashboard.json").exists()
        wait_for(self.ready, 60, "Prometheus did not start: " + (self.workdir / "prometheus.log").read_text()[-2000:])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            out = json.loads(r.read())
        assert out["status"] == "success", out
        return out["data"]

    def stop(self):
        """By the pid the script recorded (only this Prometheus)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            try:
                wait_for(lambda: not alive(self.pid), 20, "Prometheus did not stop", every=0.2)
                return
            except TimeoutError:
                continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rlc")
    t0 = time.time()
    # While the head starts: put the pretraining shards in the base dir, as they would already be in the bucket
    # (building the offline sample corpus takes ~30 s of CPU; the job's data stage then only checks the shards).
    base = tmp_path_factory.mktemp("base")
    data = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "--source", "sample", "-n", "-1"], cwd=ROOT,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(base)}, stdout=subprocess.DEVNULL)  # fmt: skip
    out = subprocess.run([sys.executable, str(ROOT / "cluster" / "local_cluster.py"), "up",
                          str(ROOT / "cluster" / "aws-gpu.yaml"), "--temp-dir", temp_dir, "--cpus-per-node", "2",
                          "--idle-timeout-s", "8", "--system-config", '{"metrics_report_interval_ms": 1000}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
    state_path = Path(temp_dir) / "local_cluster.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert data.wait(timeout=300) == 0
        state["up_seconds"], state["base_dir"] = time.time() - t0, str(base)
        state["session_dir"] = os.path.realpath(Path(temp_dir) / "session_latest")
        yield state
    finally:
        if state is not None:
            subprocess.run([sys.executable, str(ROOT / "cluster" / "local_cluster.py"), "down", "--state",
                            str(state_path)], timeout=120)  # fmt: skip
            assert local_cluster.session_pids(state) == []  # nothing of this cluster is left running
        shutil.rmtree(temp_dir, ignore_errors=True)


def workers(state) -> list[dict]:
    return [n for n in local_cluster.nodes(state) if not n["is_head"]]


def job_status(state, sid) -> str:
    return local_cluster.api(state, f"/api/jobs/{sid}")["status"]


def rss_mib(pids) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return total / 1024


TRAINING_PANELS = ("Training loss (smoothed)", "Throughput", "MFU", "Step time", "Validation bits per byte")


def test_job_autoscales_a_worker_trains_reports_metrics_and_scales_down(cluster, tmp_path):
    state = cluster
    env = {**os.environ, "RAY_ADDRESS": state["address"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": state["token"]}
    assert workers(state) == []  # min_workers: 0, as in aws-gpu.yaml: no GPU node until a job needs one
    prom = Prometheus(state["session_dir"], str(tmp_path))
    try:
        base = state["base_dir"]
        runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}  # the image's role: the code is on every node
        t0 = time.time()
        sub = subprocess.run([RAY, "job", "submit", "--submission-id", "local-speedrun", "--no-wait",
                              "--entrypoint-num-cpus", "0", "--runtime-env-json", json.dumps(runtime_env), "--",
                              sys.executable, str(ROOT / "ray_jobs" / "speedrun.py"), "--preset", "cpu-tiny",
                              "--base-dir", str(base), "--stages", "data,tokenizer,base_train"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]

        # 1) the autoscaler adds a node of the config's GPU node type for the job's tasks (the head has 0 CPUs)
        wait_for(lambda: workers(state), 300, "no worker node was added for the job")
        t_up = time.time() - t0
        status = subprocess.run([RAY, "status", "--address", state["gcs_address"]], env=env, capture_output=True,
                                text=True, timeout=60).stdout  # fmt: skip
        assert re.search(r"\d+ gpu_8x_h100", status), status

        # 2) during training, rank 0's gauges reach Prometheus through the service-discovery file
        def step_seen():
            res = prom.api("query", query="ray_nanochat_train_step")["result"]
            return res or job_status(state, "local-speedrun") in ("FAILED", "STOPPED")

        wait_for(step_seen, 400, "no training gauge in Prometheus")
        peak_rss = rss_mib(local_cluster.session_pids(state))
        final = wait_for(lambda: (s := job_status(state, "local-speedrun")) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                         600, "the job did not finish")  # fmt: skip
        t_job = time.time() - t0
        logs = local_cluster.api(state, "/api/jobs/local-speedrun/logs")["logs"]
        assert final == "SUCCEEDED", logs[-4000:]
        assert "[speedrun] base_train: done" in logs
        assert "on the head (from your machine: `ray dashboard CLUSTER.yaml`" in logs  # the start-up hint

        # the dashboard's training panels, as Grafana would query them, return the run's series
        end = time.time()
        for panel in (p for p in DASHBOARD["panels"] if p.get("title") in TRAINING_PANELS):
            for target in panel["targets"]:
                expr = target["expr"].replace("$run", ".*")
                res = prom.api("query_range", query=expr, start=t0, end=end, step=1)["result"]
                assert res, (panel["title"], expr)
                assert res[0]["metric"]["run"].startswith("speedrun-base_train"), res[0]["metric"]
        steps = prom.api("query", query="max(last_over_time(ray_nanochat_train_step[15m]))")["result"]
        assert float(steps[0]["value"][1]) >= 6  # cpu-tiny trains 12 steps; the gauge followed them
        tok = prom.api("query", query="max(max_over_time(ray_nanochat_train_tokens_per_second[15m]))")["result"]
        assert float(tok[0]["value"][1]) > 0

        # 3) the idle worker is scaled down (idle timeout 8 s here, 15 min in the config)
        t_idle = time.time()
        wait_for(lambda: not workers(state), 180, "the idle worker node was not scaled down")
        print(f"\nlocal cluster: up {state['up_seconds']:.0f}s, worker added after {t_up:.0f}s, job done after "
              f"{t_job:.0f}s, scaled down {time.time() - t_idle:.0f}s after; cluster RSS {peak_rss:.0f} MiB "
              f"during training")  # fmt: skip
        print("\n".join(line for line in logs.splitlines() if line.startswith("[speedrun]") or "autoscaler +" in line))
    finally:
        prom.stop()
