"""python -m pytest tests/test_dashboard_hint.py -q

The line the speedrun prints at start (ray_jobs/cluster_utils.dashboard_hint): the dashboard's URL, where its token
comes from, and whether its charts can work. The slow test starts an embedded Ray with its dashboard (as
`python -m ray_jobs.speedrun --preset cpu` does, in a fresh HOME) and follows the hint like a user: the URL
refuses a request without the token and serves the dashboard with the token that `ray get-auth-token` prints.
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
info = cluster_utils.connect(include_dashboard=True, num_cpus=1)
print(json.dumps({"hint": cluster_utils.dashboard_hint(info)}), flush=True)
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
        hint = json.loads(line)["hint"]
        url = re.match(r"dashboard (http://\S+)", hint).group(1)
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
    finally:
        proc.communicate("\n", timeout=120)
