"""A real S3-compatible server for tests: `python -m moto.server` on a free loopback port, in a subprocess.

Usage in a test module (one server per module keeps the suite fast):

    from tests.s3server import S3Server

    @pytest.fixture(scope="module")
    def s3():
        with S3Server() as server:      # starts moto, creates a unique bucket
            yield server

    def test_x(s3, monkeypatch):
        s3.apply_env(monkeypatch)       # AWS_ENDPOINT_URL, keys, region for this test only
        uri = s3.uri("runs/a")          # "s3://<bucket>/runs/a"

`server.env` is the same settings as a dict, e.g. for `ray.init(runtime_env={"env_vars": server.env})` so that Ray
workers see them too. `stop()` ends only the subprocess this object started. `S3Server(auth=True)` makes moto check
credentials after creating the bucket, so every request with the test keys is refused (InvalidAccessKeyId): use it
to test bad-credential errors.
"""

import os
import socket
import subprocess
import sys
import time
import uuid


def _free_port():
    # Ask the kernel for a free port; the tiny race until moto binds it is handled by retrying in start().
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto S3 server subprocess plus one freshly created bucket."""

    def __init__(self, bucket=None, region="us-east-1", startup_timeout=30.0, auth=False):
        self.bucket = bucket or f"nanochat-test-{uuid.uuid4().hex[:12]}"
        self.auth = auth
        self.region = region
        self.startup_timeout = startup_timeout
        self.proc = None
        self.port = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self):
        """Environment variables that point boto3 and pyarrow at this server (moto accepts any keys)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe the cloud metadata endpoint from tests
        }

    def uri(self, prefix=""):
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def apply_env(self, monkeypatch):
        """Export env for the current test only (pytest's monkeypatch undoes it afterwards)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def start(self):
        for _attempt in range(3):
            self.port = _free_port()
            env = dict(os.environ)
            if self.auth:
                env["INITIAL_NO_AUTH_ACTION_COUNT"] = "1"  # only create_bucket below goes unchecked
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                self.client().create_bucket(Bucket=self.bucket)
                return self
            self.stop()
        raise RuntimeError("moto server did not start (is moto[server] installed?)")

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited, e.g. the port was taken in the meantime
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    # Manual use: print the env for a shell, keep the server up until Ctrl-C.
    with S3Server() as server:
        for k, v in server.env.items():
            print(f"export {k}={v}")
        print(f"# bucket: {server.uri()}", file=sys.stderr)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
