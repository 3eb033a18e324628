"""URI-aware file operations: a local path or an `s3://bucket/prefix` URI, same functions for both.

Local writes are atomic (temp file in the same directory + fsync + os.replace), S3 writes are atomic per object
(a reader sees the old object or the whole new one, never a prefix). S3 goes through boto3; the endpoint comes
from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO, moto, ...), credentials from the usual AWS chain.
Storage problems (unreachable endpoint, missing credentials, missing bucket, access denied) raise NanochatError
within seconds, naming what to set. Entry points call `check_writable(uri)` before long work.

    python -m nanochat.storage s3://bucket/prefix     # check that a location is writable, then exit
"""

import contextlib
import functools
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid

from nanochat.common import NanochatError

# Short timeouts so a wrong endpoint fails in seconds; reads of big checkpoints get a longer read timeout.
S3_CONNECT_TIMEOUT_S = 3
S3_READ_TIMEOUT_S = 60
S3_PROBE_READ_TIMEOUT_S = 2  # check_writable sends a 2-byte object: a server that does not answer is broken
S3_MAX_ATTEMPTS = 2  # total attempts = 1 retry: transient errors are retried once, a dead endpoint is reported quickly
_MULTIPART_THRESHOLD = 64 * 1024 * 1024  # above this, s3transfer uploads in parts (aborted on failure)

# -----------------------------------------------------------------------------
# URIs


def is_remote(p):
    """True for s3:// URIs (the only remote scheme supported)."""
    return str(p).startswith("s3://")


def _split_s3(p):
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    p = str(p)
    if "?" in p:
        raise NanochatError(
            f"S3 URI {p!r} has query parameters; use a plain s3://bucket/prefix and set the endpoint with "
            "AWS_ENDPOINT_URL (and AWS_DEFAULT_REGION) instead"
        )
    if not p.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {p!r}")
    bucket, _, key = p[len("s3://") :].partition("/")
    if not bucket:
        raise NanochatError(f"S3 URI {p!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key.strip("/")


def join(base, *parts):
    """os.path.join for local paths, '/'-join for URIs."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *[str(x).strip("/") for x in parts])
    return os.path.join(base, *parts)


# -----------------------------------------------------------------------------
# S3 client and error translation


def _endpoint():
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region():
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _s3_client(read_timeout=S3_READ_TIMEOUT_S):
    # Keyed by the env that matters, so tests (and users) that switch endpoints get a fresh client.
    key = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                            "AWS_PROFILE"))
    return _cached_client(_endpoint(), _region(), key, read_timeout)


@functools.lru_cache(maxsize=8)
def _cached_client(endpoint, region, _env_key, read_timeout):
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=read_timeout,
        retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        region_name=region,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _describe_endpoint():
    ep = _endpoint()
    return f"endpoint {ep} (from AWS_ENDPOINT_URL)" if ep else "the default AWS endpoint (AWS_ENDPOINT_URL is unset)"


@contextlib.contextmanager
def _s3_errors(uri, reading=True):
    """Turn botocore errors into NanochatError messages that say what to set.

    A 404 while reading means the object is missing (FileNotFoundError, like a local path); while writing or
    listing it means the bucket or the endpoint is wrong.
    """
    import botocore.exceptions as bex

    try:
        yield
    except bex.NoCredentialsError as e:
        raise NanochatError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / an instance role)"
        ) from e
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError) as e:
        raise NanochatError(
            f"cannot reach S3 at {_describe_endpoint()} for {uri}: check AWS_ENDPOINT_URL and that the server is up "
            f"({e})"
        ) from e
    except bex.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = _split_s3(uri)[0]
        if code == "NoSuchBucket":
            raise NanochatError(
                f"S3 bucket {bucket!r} does not exist at {_describe_endpoint()}: create it "
                f"(aws s3 mb s3://{bucket}) or point NANOCHAT_BASE_DIR at an existing bucket"
            ) from e
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
                    "InvalidToken", "AllAccessDisabled"}:
            raise NanochatError(
                f"S3 refused access to {uri} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(and AWS_SESSION_TOKEN) and the bucket policy; under Ray they must be set in the workers' env too"
            ) from e
        if _is_not_found(e) and reading:
            raise FileNotFoundError(f"{uri} does not exist") from e
        if _is_not_found(e):
            raise NanochatError(
                f"S3 answered 404 for {uri} at {_describe_endpoint()}: check that the bucket {bucket!r} exists and "
                "that AWS_ENDPOINT_URL points at an S3 server"
            ) from e
        raise NanochatError(f"S3 error for {uri} at {_describe_endpoint()}: {e}") from e
    except bex.BotoCoreError as e:
        raise NanochatError(f"S3 error for {uri} at {_describe_endpoint()}: {e}") from e


def _is_not_found(e):
    import botocore.exceptions as bex

    return isinstance(e, bex.ClientError) and str(e.response.get("Error", {}).get("Code")) in {
        "404", "NoSuchKey", "NotFound"}


def _s3_iter(uri, delimiter=True):
    """Yield (kind, name, last_modified) for entries directly under (delimiter=True) or anywhere below uri."""
    bucket, key = _split_s3(uri)
    prefix = key + "/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = "/"
    with _s3_errors(uri, reading=False):
        for page in _s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
            for cp in page.get("CommonPrefixes", []):
                yield "dir", cp["Prefix"][len(prefix) :].rstrip("/"), None
            for obj in page.get("Contents", []):
                yield "file", obj["Key"][len(prefix) :], obj["LastModified"].timestamp()


# -----------------------------------------------------------------------------
# Public operations


def exists(p):
    """True if p is an existing file, or a directory (on S3: any object below the prefix)."""
    if not is_remote(p):
        return os.path.exists(p)
    bucket, key = _split_s3(p)
    with _s3_errors(p):
        try:
            _s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if not _is_not_found(e):
                raise
    return isdir(p)


def isdir(p):
    if not is_remote(p):
        return os.path.isdir(p)
    return next(_s3_iter(p, delimiter=False), None) is not None


def listdir(p):
    """Sorted names directly under p (files and subdirectories); [] if p does not exist."""
    if not is_remote(p):
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    return sorted({name for _, name, _ in _s3_iter(p) if name})


def getmtime(p):
    """Modification time in seconds; for an S3 'directory', the newest object below it."""
    if not is_remote(p):
        return os.path.getmtime(p)
    times = [t for _, _, t in _s3_iter(p, delimiter=False)]
    if not times:
        bucket, key = _split_s3(p)
        with _s3_errors(p):
            return _s3_client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()
    return max(times)


def makedirs(p):
    """Create a local directory tree; a no-op on S3 (prefixes need no creation)."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)


def remove(p):
    """Delete one file/object (missing is fine)."""
    if not is_remote(p):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
        return
    bucket, key = _split_s3(p)
    with _s3_errors(p, reading=False):
        _s3_client().delete_object(Bucket=bucket, Key=key)


def read_bytes(p):
    if not is_remote(p):
        with open(p, "rb") as f:
            return f.read()
    bucket, key = _split_s3(p)
    with _s3_errors(p):
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def open_read(p):
    """A readable, seekable binary file: the file itself locally; on S3 a local temp copy of the object (downloaded
    with parallel ranged GETs, and on disk rather than in memory, which matters for multi-GB checkpoints)."""
    if not is_remote(p):
        return open(p, "rb")
    bucket, key = _split_s3(p)
    f = tempfile.TemporaryFile()
    try:
        with _s3_errors(p):
            _s3_client().download_fileobj(bucket, key, f)
    except BaseException:
        f.close()
        raise
    f.seek(0)
    return f


@contextlib.contextmanager
def atomic_writer(p):
    """Context manager yielding a binary file to write; p appears (whole) only if the block exits cleanly.

    Local: a hidden temp file next to p, fsync, os.replace, fsync of the directory. S3: a local temp file,
    uploaded as one object when the block finishes (one PUT, or a multipart upload that s3transfer aborts on
    failure), so a crash at any point leaves the previous object (or none) in place.
    """
    if is_remote(p):
        bucket, key = _split_s3(p)
        with tempfile.TemporaryFile() as f:
            yield f
            f.flush()
            f.seek(0)
            from boto3.s3.transfer import TransferConfig

            with _s3_errors(p, reading=False):
                _s3_client().upload_fileobj(f, bucket, key,
                                            Config=TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD))
        return
    directory = os.path.dirname(os.path.abspath(p))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(p)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(directory)


def remove_stale_temp_files(directory, older_than_s=600):
    """Delete temp files that atomic_writer left behind in a local directory when a process was killed mid-write
    (they can be checkpoint-sized). Only files older than older_than_s, so writes in progress are never touched.
    S3 needs nothing: an interrupted upload never becomes an object. Returns the names removed."""
    if is_remote(directory) or not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if re.fullmatch(r"\..+\.tmp-\d+-[0-9a-f]{8}", name):
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(path) > older_than_s:
                    os.remove(path)
                    removed.append(name)
    return removed


def _fsync_dir(directory):
    # Makes the rename itself durable across power loss; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(p, data):
    """Atomically write bytes to p (creating local parent directories)."""
    with atomic_writer(p) as f:
        f.write(data)


def download_to_local(p, local_path):
    """Copy p (local or S3) to a local file, atomically."""
    with atomic_writer(local_path) as f:
        if is_remote(p):
            bucket, key = _split_s3(p)
            with _s3_errors(p):
                _s3_client().download_fileobj(bucket, key, f)
        else:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f)


def get_filesystem(p):
    """(pyarrow.fs.FileSystem, path inside it) for p, e.g. for pyarrow.parquet or Ray's storage_filesystem."""
    import pyarrow.fs as pafs

    if not is_remote(p):
        return pafs.LocalFileSystem(), os.path.abspath(p)
    bucket, key = _split_s3(p)
    kwargs = {"region": _region(), "connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_READ_TIMEOUT_S,
              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    endpoint = _endpoint()
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest if rest else endpoint, scheme=scheme if rest else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def check_writable(uri):
    """Write and delete a small marker under uri; raise NanochatError within seconds if that is impossible."""
    marker = join(uri, f".nanochat_write_check_{uuid.uuid4().hex[:12]}")
    if is_remote(uri):
        bucket, key = _split_s3(marker)
        client = _s3_client(read_timeout=S3_PROBE_READ_TIMEOUT_S)  # a tiny request: a hung server fails fast too
        with _s3_errors(uri, reading=False):
            client.put_object(Bucket=bucket, Key=key, Body=b"ok")
            client.delete_object(Bucket=bucket, Key=key)
        return uri
    try:
        write_bytes(marker, b"ok")
        remove(marker)
    except OSError as e:
        raise NanochatError(f"cannot write to {uri}: {e}; fix the path or its permissions (NANOCHAT_BASE_DIR)") from e
    return uri


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else None
    if target is None:
        from nanochat.common import get_base_dir

        target = get_base_dir()
    try:
        check_writable(target)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{target} is writable")
