"""python -m pytest tests/test_execution_ray.py -q        (starts an embedded Ray cluster with its dashboard, ~30 s)

The real thing behind issue 17's first escape: Ray's head listens on Unix sockets under its session directory
(`sockets/raylet`, `plasma_store`, and one `dash_*` per dashboard module: `dash_JobHead` answers the Job API without
the token that guards the TCP port). The test process reaches every one of them; sandboxed code reaches none, and
the same program with the kernel layers off (the negative control) does reach the Job API.
"""

import os
import socket
import time

import pytest

from nanochat import execution
from nanochat.execution import _execute, sandbox_features

pytestmark = pytest.mark.ray

HANG_S = 180  # the dashboard's modules start after ray.init returns; a bound for "never came up", not a timing

# Tries every socket file it is given; prints one line per path: "<name> connected <status line>" or "<name> <error>"
PROBE = r"""
import os, socket
for path in {paths!r}:
    name = os.path.basename(path)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'GET /api/jobs/ HTTP/1.0\r\nHost: localhost\r\n\r\n')
        print(name, 'connected', s.recv(64).split(b'\r\n')[0].decode() if name.startswith('dash_') else '')
    except OSError as e:
        print(name, type(e).__name__)
"""


@pytest.fixture(scope="module")
def ray_sockets():
    import ray

    ctx = ray.init(address="local", num_cpus=1, include_dashboard=True)
    try:
        sock_dir = os.path.join(ctx.address_info["session_dir"], "sockets")  # this session's, not session_latest
        job_head = os.path.join(sock_dir, "dash_JobHead")
        deadline = time.time() + HANG_S
        while not os.path.exists(job_head) and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.exists(job_head), f"the dashboard's Job module never listened at {job_head}"
        yield sorted(os.path.join(sock_dir, n) for n in os.listdir(sock_dir))
    finally:
        ray.shutdown()


def test_sandbox_cannot_reach_rays_unix_sockets(ray_sockets):
    if "seccomp" not in sandbox_features():
        pytest.skip("this machine's kernel does not offer seccomp: nothing stops Unix sockets by path")
    # the test process itself reaches every socket, and the Job API answers without a token
    for path in ray_sockets:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    code = PROBE.format(paths=ray_sockets)
    rc, stdout, stderr, completed = _execute(code, 60.0, execution.DEFAULT_MEMORY_BYTES, kernel_filters=False)
    control = dict(line.split(" ", 1) for line in stdout.splitlines())
    assert rc == 0 and completed, stderr
    assert control["dash_JobHead"].startswith("connected HTTP/1.") and " 200" in control["dash_JobHead"], control
    # the sandbox reaches none of them
    rc, stdout, stderr, completed = _execute(code, 60.0, execution.DEFAULT_MEMORY_BYTES)
    sandboxed = dict(line.split(" ", 1) for line in stdout.splitlines())
    assert rc == 0 and completed, stderr
    assert sorted(sandboxed) == sorted(os.path.basename(p) for p in ray_sockets)
    assert set(sandboxed.values()) == {"PermissionError"}, sandboxed
