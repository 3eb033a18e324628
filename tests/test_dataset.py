"""python -m pytest tests/test_dataset.py -q

`python -m nanochat.dataset` against real servers on loopback: an HTTP file server with injected failures, stalls,
truncated and garbage bodies (tests/httpserver.py), and a moto S3 server (tests/s3server.py). Also the local-dir and
offline `sample` sources, and the errors a user can run into.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from tests.httpserver import FileServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--backoff", "0.05", "--timeout", "2", "--no-progress"]


def make_shards(directory, indices, docs_per_shard=50, row_group_size=16):
    os.makedirs(directory, exist_ok=True)
    for i in indices:
        docs = [f"shard {i} document {j} " + "word " * (j % 13) for j in range(docs_per_shard)]
        pq.write_table(pa.table({"text": docs}), os.path.join(directory, dataset.index_to_filename(i)),
                       row_group_size=row_group_size)


def listing(directory):
    return sorted(n for n in os.listdir(directory) if not n.endswith(".lock"))


@pytest.fixture
def served(tmp_path):
    src = tmp_path / "remote"
    make_shards(src, [0, 1, 2, 3, 9])  # 9 plays the val shard (--val-shard 9)
    with FileServer(src) as srv:
        yield srv


def run_cli(base_dir, *args):
    """The CLI in a subprocess, as a user runs it."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


# -----------------------------------------------------------------------------
# HTTP


def test_http_download_with_faults_retries_and_leaves_no_corrupt_shard(base_dir, served, capsys):
    served.fail("shard_00000.parquet", "stall:4")  # longer than --timeout 2: a read timeout, then a retry
    served.fail("shard_00001.parquet", "500", "500")
    served.fail("shard_00002.parquet", "truncate")
    served.fail("shard_00009.parquet", "garbage")  # 200 OK but not parquet: the footer check rejects it
    rc = dataset.main(["-n", "3", "-w", "4", "--source", served.base_url, "--val-shard", "9", *FAST])
    out = capsys.readouterr()
    assert rc == 0, out
    data_dir = base_dir / "base_data_climbmix"
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_00009.parquet"]
    assert listing(data_dir) == ["SOURCE"] + names  # no .tmp left, shard 3 not requested
    for n in names:
        assert dataset.validate_parquet(str(data_dir / n)) == 50
    assert served.requests["shard_00000.parquet"] == 2
    assert served.requests["shard_00001.parquet"] == 3
    assert served.requests["shard_00002.parquet"] == 2
    assert served.requests["shard_00009.parquet"] == 2
    assert "shard_00003.parquet" not in served.requests
    assert "Done! Downloaded: 4/4 shards" in out.out
    assert "shard_00001.parquet: attempt 1 failed (HTTPError: 500" in out.out
    assert "shard_00002.parquet: attempt 1 failed (ChunkedEncodingError: ('Connection broken: IncompleteRead" in out.out
    assert "shard_00000.parquet: attempt 1 failed (ConnectionError" in out.out and "Read timed out" in out.out
    assert "shard_00009.parquet: attempt 1 failed (OSError: downloaded file is not a valid shard" in out.out


def test_http_permanent_failure_is_reported_and_nothing_partial_remains(base_dir, served):
    served.fail("shard_00001.parquet", "500*")
    served.fail("shard_00002.parquet", "truncate", "truncate", "truncate")
    result = run_cli(base_dir, "-n", "3", "-w", "2", "--source", served.base_url, "--val-shard", "9",
                     "--max-attempts", "3", *FAST)
    assert result.returncode == 1
    data_dir = base_dir / "base_data_climbmix"
    assert listing(data_dir) == ["SOURCE", "shard_00000.parquet", "shard_00009.parquet"]
    assert "Done! Downloaded: 2/4 shards" in result.stdout
    assert "shard_00001.parquet: " in result.stderr and "failed after 3 attempts" in result.stderr
    assert "500" in result.stderr
    assert "shard_00002.parquet: " in result.stderr
    assert served.requests["shard_00001.parquet"] == 3
    # Re-running fetches only what is missing (valid shards are skipped).
    before = dict(served.requests)
    served._faults.clear()
    result = run_cli(base_dir, "-n", "3", "--source", served.base_url, "--val-shard", "9", *FAST)
    assert result.returncode == 0, result.stderr
    assert served.requests["shard_00000.parquet"] == before["shard_00000.parquet"]
    assert served.requests["shard_00001.parquet"] == before["shard_00001.parquet"] + 1
    assert len(dataset.list_parquet_files()) == 4


def test_upstream_download_single_file(base_dir, served):
    served.fail("shard_00002.parquet", "500*")
    assert dataset.download_single_file(3, base_url=served.base_url, backoff_s=0.01)
    assert not dataset.download_single_file(2, base_url=served.base_url, max_attempts=2, backoff_s=0.01)
    assert listing(base_dir / "base_data_climbmix") == ["shard_00003.parquet"]


def test_broken_local_shard_is_replaced(base_dir, served):
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir()
    (data_dir / "SOURCE").write_text(served.base_url + "\n")
    (data_dir / "shard_00000.parquet").write_bytes(b"PAR1 half a file")  # e.g. an interrupted manual copy
    rc = dataset.main(["-n", "1", "--source", served.base_url, "--val-shard", "9", *FAST])
    assert rc == 0
    assert dataset.validate_parquet(str(data_dir / "shard_00000.parquet")) == 50


# The CLI with filelock's DEBUG log on stderr ("Lock ... not acquired on <path>, waiting ..."): the test sees when a
# run finds a shard's lock taken.
_CLI_LOGGING_LOCKS = ("import logging, runpy, sys; h = logging.StreamHandler(sys.stderr); "
                      "logging.getLogger('filelock').addHandler(h); logging.getLogger('filelock').setLevel('DEBUG'); "
                      "runpy.run_module('nanochat.dataset', run_name='__main__')")  # fmt: skip


def test_concurrent_runs_fetch_each_shard_once(base_dir, served):
    """Run A's downloads are held by the server until run B has found every shard's lock taken: the runs overlap on
    every shard, and still each shard is fetched once."""
    names = ("shard_00000.parquet", "shard_00001.parquet", "shard_00009.parquet")
    for name in names:
        served.fail(name, "hold")
    # a long read timeout: a held download must not time out and retry (that would be a second request)
    args = ["-n", "2", "-w", "3", "--source", served.base_url, "--val-shard", "9", "--backoff", "0.05", "--timeout",
            "600", "--no-progress"]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    a = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    procs, b_err, waited = [a], [], set()
    try:
        deadline = time.monotonic() + 300
        while served.held < len(names):  # all three of A's downloads are at the server, held
            assert a.poll() is None and time.monotonic() < deadline, "run A never reached the server"
            time.sleep(0.05)
        b = subprocess.Popen([sys.executable, "-c", _CLI_LOGGING_LOCKS, *args], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(b)
        for line in b.stderr:  # blocks until B logs; B cannot finish while A holds the locks
            b_err.append(line)
            m = re.search(r"not acquired on (\S+)\.lock,", line)
            if m:
                waited.add(os.path.basename(m.group(1)))
            if waited >= set(names):
                break
        assert waited >= set(names), "".join(b_err)[-3000:]
        assert served.held == len(names)  # A is still mid-download on every shard B waited for
    finally:
        served.release()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for name in names:
        assert served.requests[name] == 1, (name, served.requests)
    assert len(dataset.list_parquet_files()) == 3


# -----------------------------------------------------------------------------
# S3 (moto server)



def test_s3_source(base_dir, s3, monkeypatch, tmp_path):
    s3.apply_env(monkeypatch)
    make_shards(tmp_path / "up", [0, 1, 2, 7])
    client = s3.client()
    for name in sorted(os.listdir(tmp_path / "up")):
        client.upload_file(str(tmp_path / "up" / name), s3.bucket, f"climbmix/{name}")
    client.put_object(Bucket=s3.bucket, Key="climbmix/shard_00001.parquet", Body=b"not parquet")  # corrupt object
    client.put_object(Bucket=s3.bucket, Key="climbmix/README.md", Body=b"ignored")
    rc = dataset.main(["-n", "2", "--source", s3.uri("climbmix"), "--max-attempts", "2", *FAST])
    data_dir = base_dir / "base_data_climbmix"
    assert rc == 1  # shard 1 is not a valid shard on the server: reported, never written
    assert listing(data_dir) == ["SOURCE", "shard_00000.parquet", "shard_00007.parquet"]
    client.upload_file(str(tmp_path / "up" / "shard_00001.parquet"), s3.bucket, "climbmix/shard_00001.parquet")
    assert dataset.main(["-n", "2", "--source", s3.uri("climbmix"), *FAST]) == 0
    assert listing(data_dir) == ["SOURCE", "shard_00000.parquet", "shard_00001.parquet", "shard_00007.parquet"]


def test_s3_data_dir_is_listed_and_read(s3, monkeypatch, tmp_path):
    """Training can read shards straight from an s3:// NANOCHAT_BASE_DIR."""
    s3.apply_env(monkeypatch)
    make_shards(tmp_path / "up", [0, 5])
    for name in sorted(os.listdir(tmp_path / "up")):
        s3.client().upload_file(str(tmp_path / "up" / name), s3.bucket, f"base/base_data_climbmix/{name}")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", s3.uri("base"))
    paths = dataset.list_parquet_files()
    assert paths == [s3.uri("base/base_data_climbmix/shard_00000.parquet"),
                     s3.uri("base/base_data_climbmix/shard_00005.parquet")]
    batches = list(dataset.parquets_iter_batched("val"))
    assert len(batches) == 4 and batches[0][0] == "shard 5 document 0 "


# -----------------------------------------------------------------------------
# Local dirs and the sample corpus


def test_local_dir_of_mixed_files(base_dir, tmp_path):
    src = tmp_path / "mytext"
    (src / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["from parquet", None, ""]}), src / "a.parquet")
    (src / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "\ud800x"}) + "\n")
    (src / "sub" / "c.txt").write_bytes(b"latin-1 bytes \xe9\xff are not utf-8")
    (src / "ignored.bin").write_bytes(b"\x00")
    assert dataset.main(["--source", str(src), "--no-progress"]) == 0
    docs = [d for batch in dataset.parquets_iter_batched("train") for d in batch]
    docs += [d for batch in dataset.parquets_iter_batched("val") for d in batch]
    assert docs[:4] == ["from parquet", "", "", "from jsonl"]
    assert docs[4] == "?x"  # a lone surrogate cannot be stored as UTF-8: replaced
    assert docs[5].startswith("latin-1 bytes \ufffd\ufffd")
    # A local dir that already holds shards is copied shard by shard (first -n plus the last = val).
    shards = tmp_path / "shards"
    make_shards(shards, [0, 1, 2, 4])
    other = tmp_path / "other_base"
    assert dataset.main(["-n", "1", "--source", str(shards), "--data-dir", str(other), "--no-progress"]) == 0
    assert listing(other) == ["SOURCE", "shard_00000.parquet", "shard_00004.parquet"]


def test_bad_sources_and_mixing_are_user_errors(base_dir, tmp_path, capsys):
    assert dataset.main(["--source", str(tmp_path / "nope")]) == 2
    assert "unknown --source" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert dataset.main(["--source", str(empty)]) == 2
    assert "no documents found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"content": "no text field"}\n')
    assert dataset.main(["--source", str(bad)]) == 2
    assert "x.jsonl:1" in capsys.readouterr().err
    make_shards(base_dir / "base_data_climbmix", [0, 6542])  # upstream-downloaded shards, no SOURCE marker
    assert dataset.main(["--source", "sample"]) == 2
    err = capsys.readouterr().err
    assert "already holds shards from source 'hf'" in err and "NANOCHAT_BASE_DIR" in err


def _hashes(directory):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory)) if n.endswith(".parquet")}


@pytest.mark.slow
def test_sample_corpus_is_big_real_and_deterministic(base_dir, tmp_path, capsys):
    # Built twice, in two processes (different hash seeds), into two dirs: byte-identical shards.
    result = run_cli(tmp_path / "other", "--source", "sample")
    assert result.returncode == 0, result.stderr
    assert dataset.main(["--source", "sample"]) == 0
    data_dir = base_dir / "base_data_climbmix"
    first = _hashes(data_dir)
    assert first == _hashes(tmp_path / "other" / "base_data_climbmix")
    assert len(first) >= 3
    paths = dataset.list_parquet_files()
    total_bytes, n_docs = 0, 0
    for path in paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows == 1024 for i in range(pf.num_row_groups - 1))
        texts = pf.read().column("text").to_pylist()
        total_bytes += sum(len(t.encode("utf-8")) for t in texts)
        n_docs += len(texts)
    assert total_bytes >= 5_000_000
    val = [d for batch in dataset.parquets_iter_batched("val") for d in batch]
    assert 500 <= len(val) <= 2048
    # Real English prose: the most frequent words of ordinary text dominate.
    words = " ".join(val).lower().split()
    for w in ("the", "of", "is", "to", "a"):
        assert words.count(w) > len(words) * 0.005, w
    # Running again skips everything, without rebuilding the corpus (and keeps the bytes).
    assert dataset.main(["--source", "sample"]) == 0
    assert "already present" in capsys.readouterr().out
    assert _hashes(data_dir) == first
