"""Embedded Ray never joins a stray cluster: a `ray start` left behind <ray temp dir>/ray_current_cluster.

python -m pytest tests/test_ray_local.py -q

The stray cluster is simulated in a private RAY_TMPDIR (the machine's real /tmp/ray is shared with other runs) by a
ray_current_cluster file naming a dead address. Plain `ray.init(num_cpus=...)` reads that file and fails; the
launchers' ray_init (base_train / chat_sft / chat_rl) and the eval fan-out's init_ray must start a local cluster.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import ray
try:
    ray.init(num_cpus=1, include_dashboard=False)
    print("PLAIN: started")
except ValueError as e:
    print("PLAIN:", e)
from ray_jobs import eval_fanout, train_common
for name, start in (("train_common", lambda: train_common.ray_init(train_common.ClusterArgs())),
                    ("eval_fanout", lambda: eval_fanout.init_ray(None))):
    start()
    print(name.upper() + ":", ray.cluster_resources().get("CPU", 0) > 0, ray.get_runtime_context().gcs_address)
    ray.shutdown()
"""


def test_launchers_start_a_local_cluster_despite_a_stray_one():
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # the "last `ray start`": nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(REPO), NANOCHAT_BASE_DIR=os.path.join(tmp, "base"))
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                 if line.split(":", 1)[0] in ("PLAIN", "TRAIN_COMMON", "EVAL_FANOUT")}  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "When connecting to an existing cluster" in lines["PLAIN"]  # the hazard is real in this set-up
        for key in ("TRAIN_COMMON", "EVAL_FANOUT"):
            ok, gcs = lines[key].split(" ", 1)
            assert ok == "True" and not gcs.endswith(":9"), lines
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
