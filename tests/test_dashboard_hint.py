"""python -m pytest tests/test_dashboard_hint.py -q

The line the speedrun prints at start (ray_jobs/cluster_utils.dashboard_hint): the dashboard's URL, where its token
comes from, and whether its charts can work. The slow test starts an embedded Ray with its dashboard (as
`python -m ray_jobs.speedrun --preset cpu` does, in a fresh HOME) and follows the hint like a user: the URL
refuses a request without the token and serves the dashboard with the token that `ray get-auth-token` prints; a
Ray Train job in a second embedded cluster beside it trains without a traceback.
"""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ray_jobs.cluster_utils import ClusterInfo, dashboard_hint

ROOT = Path(__file__).resolve().parent.parent


def info(embedded=True, url="127.0.0.1:8265"):
    return ClusterInfo(address="" if embedded else "10.0.0.5:6379", embedded=embedded, started_here=embedded,
                       init_seconds=1.0, dashboard_url=url, num_nodes=1, resources={})  # fmt: skip


def test_hint_names_url_token_command_and_charts(monkeypatch):
    monkeypatch.delenv("RAY_PROMETHEUS_HOST", raising=False)
    hint = dashboard_hint(info(), token_auth=True)
    assert hint.startswith("dashboard http://127.0.0.1:8265 | ") and "`ray get-auth-token` prints it" in hint
    assert "RAY_PROMETHEUS_HOST" in hint and "Grafana" in hint
    assert "token" not in dashboard_hint(info(), token_auth=False)
    on_cluster = dashboard_hint(info(embedded=False, url="10.0.0.5:8265"), token_auth=True)
    assert "on the head" in on_cluster and "ray dashboard" in on_cluster and "port-forward" in on_cluster
    monkeypatch.setenv("RAY_PROMETHEUS_HOST", "http://127.0.0.1:9090")
    monkeypatch.setenv("RAY_GRAFANA_HOST", "http://127.0.0.1:3000")
    assert "Grafana" not in dashboard_hint(info(), token_auth=True)  # charts are wired: nothing to say
    assert dashboard_hint(info(url=None)) is None


SCRIPT = """
import json
from ray_jobs import cluster_utils
import os, ray
info = cluster_utils.connect(include_dashboard=True, num_cpus=1)
api = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote())
print(json.dumps({"hint": cluster_utils.dashboard_hint(info), "api": api}), flush=True)
input()
cluster_utils.shutdown(info)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_dashboard_hint_works_as_printed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_PROMETHEUS"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), RAY_TMPDIR="/tmp")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = next(line for line in proc.stdout if line.startswith("{"))
        hint, api = json.loads(line)["hint"], json.loads(line)["api"]
        url = re.match(r"dashboard (http://\S+)", hint).group(1)
        # every process of the job asks its own dashboard for the State API (Ray Train's placement-group cleaner
        # would otherwise look around the host and may ask another cluster's dashboard)
        assert api == url and not url.endswith(":8265"), (api, url)
        assert "`ray get-auth-token` prints it" in hint
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/api/version", timeout=30)
        assert e.value.code in (401, 403)
        token = subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token"], env=env,
                               capture_output=True, text=True, timeout=60).stdout.strip()  # fmt: skip
        assert token
        req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and "ray_version" in json.loads(r.read())
        # a second embedded cluster on the host while this one runs: a Ray Train job there trains cleanly (its
        # placement-group cleaner asks its own dashboard; looking around the host it found two and died with a
        # traceback, or asked this cluster's and took its controller for dead)
        train = [sys.executable, "-m", "ray_jobs.base_train", "--num-workers", "1", "--depth", "2", "--max-seq-len",
                 "64", "--device-batch-size", "2", "--total-batch-size", "128", "--num-iterations", "3", "--data",
                 "synthetic", "--vocab-size", "256", "--eval-every", "-1", "--core-metric-every", "-1",
                 "--sample-every", "-1", "--device-type", "cpu"]  # fmt: skip
        out = subprocess.run(train, cwd=ROOT, env={**env, "NANOCHAT_BASE_DIR": str(tmp_path / "base")},
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stdout + out.stderr and "multiple active Ray" not in out.stderr, out.stderr[-3000:]
    finally:
        proc.communicate("\n", timeout=120)
