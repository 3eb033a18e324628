"""python -m pytest tests/test_job_submit.py -q

The speedrun as a real Ray job: a local cluster started with `ray start --head` (free ports, its own temp dir,
token auth on with a per-test token), `ray job submit --working-dir .`, stopped mid-pretraining with `ray job stop`,
re-submitted: the second job skips the finished stages, resumes pretraining from the last checkpoint (not step 0),
succeeds, and its logs say so. The first job's loop is parked after step HOLD_AT (NANOCHAT_TRAIN_HOLD_AT, a test
hook of ray_jobs.train_common) until it is stopped, so the stop always lands at a known step on any machine. Only
the processes of this test's cluster are stopped (never `ray stop`).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
ITERS, SAVE_EVERY = 24, 3
HOLD_AT = 5  # parked after step 5: the checkpoint of step 3 exists, the one of step 6 does not


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """`ray start --head --block` in its own session + temp dir; stop() kills exactly those processes."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/rjs")  # short: Ray's unix socket paths have a length limit
        self.token = secrets.token_hex(16)
        gcs, self.dash_port, agent_listen, agent_grpc, metrics, client, rt_env = free_ports(7)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"http://127.0.0.1:{self.dash_port}"
        cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={self.dash_port}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
               f"--runtime-env-agent-port={rt_env}", "--num-cpus=4"]  # fmt: skip
        self.log = open(os.path.join(self.temp_dir, "ray_start.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout=180):
        """The Jobs API answers (with the token) and a trivial job can be submitted."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, open(os.path.join(self.temp_dir, "ray_start.log")).read()
            req = urllib.request.Request(f"{self.address}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(2)
        else:
            raise TimeoutError("Ray head did not come up")
        # the job agent starts a little after the dashboard: submitting too early answers "No available agent".
        # --no-wait + the REST status: the CLI's log-following mode can hang after the job ends on a loaded machine.
        while time.time() < deadline:
            out = self.ray("job", "submit", "--no-wait", "--", "true", check=False, timeout=120)
            m = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
            if out.returncode == 0 and m:
                sid = m.group(0)
                status = wait_for(lambda: (st := self.api(f"/api/jobs/{sid}")["status"]) in  # noqa: B023
                                  ("SUCCEEDED", "FAILED", "STOPPED") and st, deadline - time.time(), "probe job")
                assert status == "SUCCEEDED", self.ray("job", "logs", sid, check=False).stdout
                return
            time.sleep(3)
        raise TimeoutError("Ray job agent did not come up")

    def api(self, path: str) -> dict:
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def ray(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        out = subprocess.run([RAY, *args[:2], "--address", self.address, *args[2:]], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    def our_pids(self) -> list[int]:
        """Every process of this cluster: its session group plus anything whose command line names its temp dir."""
        pids = set()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.getpgid(int(d)) == self.proc.pid:
                    pids.add(int(d))
                    continue
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if self.temp_dir.encode() in f.read():
                        pids.add(int(d))
            except OSError:
                continue
        return sorted(pids)

    def stop(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.our_pids():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
            if not self.our_pids():
                break
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def submit_args(base: Path, submission_id: str, extra_env: dict | None = None) -> list[str]:
    runtime_env = {"env_vars": {**{k: os.environ[k] for k in ("NANOCHAT_DTYPE", "WANDB_MODE",
                                                              "RAY_USAGE_STATS_ENABLED",
                                                              "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION")
                                   if k in os.environ}, **(extra_env or {})}}  # fmt: skip
    return ["job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--runtime-env-json",
            json.dumps(runtime_env), "--entrypoint-num-cpus", "0", "--no-wait", "--", sys.executable,
            "ray_jobs/speedrun.py", "--preset", "cpu-tiny", "--base-dir", str(base), "--stages",
            "data,tokenizer,base_train", "--set", f"base_train.num_iterations={ITERS}", "--set",
            f"base_train.save_every={SAVE_EVERY}", "--set", "base_train.eval_every=12"]  # fmt: skip


def job_status(cluster, sid) -> str:
    """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED, from the Jobs REST API (cheaper than a CLI process)."""
    return cluster.api(f"/api/jobs/{sid}")["status"]


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(2)
    raise TimeoutError(what)


def alive_train_workers(cluster) -> list[dict]:
    """Ray Train worker actors still alive in the cluster (State API)."""
    out = cluster.api("/api/v0/actors?limit=1000&detail=false")
    return [a for a in out["data"]["result"]["result"]
            if a.get("state") == "ALIVE" and "TrainWorker" in (a.get("class_name") or "")]  # fmt: skip


def checkpoint_steps(ck_dir: Path) -> list[int]:
    if not ck_dir.exists():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in ck_dir.glob("meta_*.json"))


@pytest.mark.ray
@pytest.mark.slow
def test_submit_kill_mid_pretraining_resubmit_resumes(cluster, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    ck_dir = base / "base_checkpoints" / "d2"

    # 1) submit with the loop parked after step HOLD_AT; stop the job while it is parked there
    held = tmp_path / "held"
    cluster.ray(*submit_args(base, "speedrun-1", {"NANOCHAT_TRAIN_HOLD_AT": f"{HOLD_AT}:{held}"}))
    wait_for(lambda: held.exists() or job_status(cluster, "speedrun-1") in ("FAILED", "SUCCEEDED", "STOPPED"), 600,
             "pretraining never reached the hold step")  # fmt: skip
    logs = cluster.ray("job", "logs", "speedrun-1", check=False).stdout[-3000:]
    assert held.exists(), logs
    assert checkpoint_steps(ck_dir) == [SAVE_EVERY], logs  # a known state: the step-3 checkpoint and nothing later
    cluster.ray("job", "stop", "speedrun-1", timeout=180)
    wait_for(lambda: job_status(cluster, "speedrun-1") == "STOPPED", 120, "job 1 did not stop")
    logs1 = cluster.ray("job", "logs", "speedrun-1").stdout
    assert "[speedrun] tokenizer: done" in logs1 and "[speedrun] base_train: starting" in logs1
    assert "[speedrun] base_train: done" not in logs1
    wait_for(lambda: not alive_train_workers(cluster), 120, "job 1's training worker outlived the stop")
    assert checkpoint_steps(ck_dir) == [SAVE_EVERY]  # the stopped job wrote nothing more

    # 2) re-submit the same command: finished stages are skipped, pretraining resumes, the job succeeds
    cluster.ray(*submit_args(base, "speedrun-2"))
    status = wait_for(lambda: (s := job_status(cluster, "speedrun-2")) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                      600, "job 2 did not finish")  # fmt: skip
    logs2 = cluster.ray("job", "logs", "speedrun-2").stdout
    assert status == "SUCCEEDED", logs2[-4000:]
    assert "[speedrun] data: already done" in logs2 and "[speedrun] tokenizer: already done" in logs2
    m = re.search(r"Resuming optimization from step (\d+)", logs2)
    assert m, logs2[-4000:]
    assert int(m.group(1)) == SAVE_EVERY  # resumed from the checkpoint the stopped job left, not restarted
    step_lines = re.findall(rf"step (\d+)/{ITERS:05d}", logs2)
    trained = {int(s) for s in step_lines}
    assert trained and min(trained) >= int(m.group(1))  # no step before the checkpoint was recomputed
    assert len(step_lines) == len(trained), "a worker's step line reached the job log more than once"
    assert "Reporting training result" not in logs2, "Ray Train's per-report INFO line (metrics dict) is back"
    assert "[speedrun] all stages finished" in logs2 and f"[speedrun] report: {base / 'report.md'}" in logs2

    # one consistent history: every step once, in order, across both jobs
    recs = [json.loads(line) for line in (base / "speedrun" / "metrics" / "base_train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, ITERS + 1))
    marker = json.loads((base / "speedrun" / "stages" / "base_train.json").read_text())
    assert marker["status"] == "done" and marker["metrics"]["step"] == ITERS
    assert marker["metrics"]["start_step"] == int(m.group(1))
    assert (base / "report.md").exists()
