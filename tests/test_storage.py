"""python -m pytest tests/test_storage.py -q

nanochat.storage on a local directory and on a real S3-compatible server (moto, subprocess on loopback): the same
operations behave the same; writes are atomic; bad storage fails within seconds with a message naming the fix.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from nanochat import storage
from nanochat.common import NanochatError
from tests.s3server import S3Server

# "Fails fast" means "does not hang": the regressions these catch (botocore's default 60 s connect/read timeouts,
# each retried) take minutes; a loaded 2-core machine can take seconds for what is instant on a quiet one.
NO_HANG_S = 55

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A fresh, empty storage root: a local directory or a prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    server = request.getfixturevalue("s3")
    server.apply_env(monkeypatch)
    return server.uri(f"t/{request.node.name}-{time.monotonic_ns()}")


def test_join_and_is_remote():
    assert storage.is_remote("s3://b/p") and not storage.is_remote("/tmp/x")
    assert storage.join("s3://b/p/", "a", "/c.pt") == "s3://b/p/a/c.pt"
    assert storage.join("/tmp/x", "a", "c.pt") == os.path.join("/tmp/x", "a", "c.pt")


def test_file_ops_same_on_local_and_s3(root):
    assert storage.listdir(root) == []
    assert not storage.exists(root)
    storage.makedirs(root)
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01" * 1000)
    storage.write_bytes(storage.join(root, "sub", "a.txt"), b"hello")
    storage.write_bytes(storage.join(root, "a.txt"), b"first")
    storage.write_bytes(storage.join(root, "a.txt"), b"second")  # overwrite replaces the whole file
    assert storage.listdir(root) == ["a.txt", "b.bin", "sub"]
    assert storage.listdir(storage.join(root, "sub")) == ["a.txt"]
    assert storage.listdir(storage.join(root, "missing")) == []
    assert storage.read_bytes(storage.join(root, "a.txt")) == b"second"
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01" * 1000
    assert storage.isdir(storage.join(root, "sub")) and not storage.isdir(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "sub")) and storage.exists(storage.join(root, "a.txt"))
    assert storage.getmtime(storage.join(root, "sub")) > 0
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope.txt"))
    storage.remove(storage.join(root, "a.txt"))
    storage.remove(storage.join(root, "a.txt"))  # removing a missing file is fine
    assert storage.listdir(root) == ["b.bin", "sub"]
    assert storage.check_writable(root) == root
    assert storage.listdir(root) == ["b.bin", "sub"]  # the write check leaves nothing behind


def test_failed_write_leaves_old_content_and_no_temp_files(root):
    path = storage.join(root, "x.bin")
    storage.write_bytes(path, b"good")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_writer(path) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert storage.read_bytes(path) == b"good"
    assert storage.listdir(root) == ["x.bin"]


def test_pyarrow_filesystem_sees_the_same_files(root):
    storage.write_bytes(storage.join(root, "p.bin"), b"abc")
    fs, inner = storage.get_filesystem(root)
    with fs.open_input_stream(inner + "/p.bin") as f:
        assert f.read() == b"abc"


def test_s3_uri_with_query_parameters_is_rejected():
    with pytest.raises(NanochatError, match="AWS_ENDPOINT_URL"):
        storage.listdir("s3://bucket/p?endpoint_override=localhost:9000")


def test_local_not_writable_is_clear(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NanochatError, match="cannot write"):
        storage.check_writable(str(blocker / "sub"))  # a path below a regular file can never be created


def test_missing_bucket_is_clear(s3, monkeypatch):
    s3.apply_env(monkeypatch)
    with pytest.raises(NanochatError, match="does not exist.*aws s3 mb"):
        storage.check_writable("s3://no-such-bucket-nanochat/base")
    with pytest.raises(NanochatError, match="does not exist"):
        storage.listdir("s3://no-such-bucket-nanochat/base")


def test_unreachable_endpoint_fails_fast(s3, monkeypatch):
    s3.apply_env(monkeypatch)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(NanochatError, match="cannot reach S3.*AWS_ENDPOINT_URL"):
        storage.check_writable(s3.uri("x"))
    assert time.monotonic() - t0 < NO_HANG_S


def test_hung_endpoint_fails_fast(s3, monkeypatch):
    s3.apply_env(monkeypatch)
    with socket.socket() as silent:  # accepts TCP connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(NanochatError, match="AWS_ENDPOINT_URL"):
            storage.check_writable(s3.uri("x"))
        assert time.monotonic() - t0 < NO_HANG_S


def test_missing_credentials_are_clear(s3, monkeypatch, tmp_path):
    s3.apply_env(monkeypatch)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    t0 = time.monotonic()
    with pytest.raises(NanochatError, match="AWS_ACCESS_KEY_ID"):
        storage.check_writable(s3.uri("x"))
    assert time.monotonic() - t0 < NO_HANG_S


def test_open_read_and_download(root, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(storage.join(root, "big.bin"), data)
    with storage.open_read(storage.join(root, "big.bin")) as f:
        assert f.read() == data
    storage.download_to_local(storage.join(root, "big.bin"), str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        storage.open_read(storage.join(root, "missing.bin"))


def test_bad_credentials_are_clear(monkeypatch):
    with S3Server(auth=True) as strict:  # moto checks keys: the test keys are unknown to it
        strict.apply_env(monkeypatch)
        t0 = time.monotonic()
        with pytest.raises(NanochatError, match="refused access.*AWS_ACCESS_KEY_ID"):
            storage.check_writable(strict.uri("x"))
        with pytest.raises(NanochatError, match="InvalidAccessKeyId"):
            storage.read_bytes(strict.uri("x/model_000001.pt"))
        assert time.monotonic() - t0 < NO_HANG_S


def test_cli_reports_error_without_traceback(s3):
    env = {**os.environ, **s3.env}
    bad = subprocess.run([sys.executable, "-m", "nanochat.storage", "s3://no-such-bucket-nanochat/x"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr and "Traceback" not in bad.stderr
