"""python -m pytest tests/test_dataloader.py -q

The plain (no Ray) pretraining loader: identical batches to upstream nanochat's for the same documents (golden
fixture from dev/make_dataloader_golden.py), disjoint DDP ranks, exact and approximate resume, and bad input.
"""

import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataloader
from nanochat.common import NanochatError
from nanochat.dataloader import BestFitPacker, row_group_plan
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit as plain_loader
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as state_loader

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dataloader_golden.json")
UPSTREAM_KEYS = ("pq_idx", "rg_idx", "epoch")


class ByteTokenizer:
    """Stand-in with the tokenizer interface the loader uses: UTF-8 bytes, BOS = 256 (as the golden fixture)."""

    def get_bos_token_id(self):
        return 256

    def encode(self, text, prepend=None, append=None, num_threads=1):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def set_rank(monkeypatch, rank, world):
    if world == 1:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
    else:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))


def write_files(data_dir, files, row_group_size):
    os.makedirs(data_dir, exist_ok=True)
    for i, rgs in enumerate(files):
        docs = [d for rg in rgs for d in rg]
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"),
                       row_group_size=row_group_size)


@pytest.fixture(scope="module")
def golden():
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.fixture
def golden_dir(golden, base_dir):
    write_files(base_dir / "base_data_climbmix", golden["files"], row_group_size=32)
    return base_dir / "base_data_climbmix"


def take(it, n):
    out = []
    for _ in range(n):
        x, y, s = next(it)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(s))))
    return out


# -----------------------------------------------------------------------------
# Same batches as upstream


@pytest.mark.parametrize("case", ["single", "long_wraps_epoch", "ddp_rank0", "ddp_rank1", "val", "resume_approx"])
def test_matches_upstream(golden, golden_dir, monkeypatch, case):
    spec = next(c for c in golden["cases"] if c["name"] == case)
    expected = golden["outputs"][case]
    set_rank(monkeypatch, spec["rank"], spec["world"])
    resume = None
    if "resume_from" in spec:  # an upstream-format state (3 keys): upstream's approximate resume
        resume = golden["outputs"][spec["resume_from"]["case"]]["states"][spec["resume_from"]["step"]]
        assert set(resume) == set(UPSTREAM_KEYS)
    it = state_loader(ByteTokenizer(), spec["B"], spec["T"], spec["split"], tokenizer_threads=1,
                      tokenizer_batch_size=golden["tokenizer_batch_size"], device="cpu", resume_state_dict=resume,
                      buffer_size=golden["buffer_size"])
    for step, (x, y, state) in enumerate(take(it, spec["steps"])):
        assert x.dtype == torch.long and x.shape == (spec["B"], spec["T"])
        assert x.tolist() == expected["inputs"][step], f"{case}: inputs differ at step {step}"
        assert y.tolist() == expected["targets"][step], f"{case}: targets differ at step {step}"
        assert {k: state[k] for k in UPSTREAM_KEYS} == expected["states"][step]
        assert (x[:, 0] == 256).all()  # every row starts with BOS


def test_packer_matches_a_plain_scan_on_random_docs():
    """The bisect-based packer picks exactly what a linear scan (upstream's rule) picks, ties included."""
    rng = random.Random(0)
    docs = [[256] + [rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 3, 7, 7, 7, 15, 40, 90]))]
            for _ in range(3000)]
    cap, buffer_size = 33, 50
    feed = iter(docs)
    packer = BestFitPacker(buffer_size)
    ours = []
    for _ in range(200):
        arr = np.zeros(cap, dtype=np.int64)
        packer.fill_row(arr, lambda: [packer.add(next(feed)) for _ in range(4)])
        ours.append(arr.tolist())
    feed, buf, scan = iter(docs), [], []
    for _ in range(200):
        row, pos = [], 0
        while pos < cap:
            while len(buf) < buffer_size:
                buf += [next(feed) for _ in range(4)]
            rem = cap - pos
            best, best_len = -1, 0
            for i, d in enumerate(buf):
                if best_len < len(d) <= rem:
                    best, best_len = i, len(d)
            if best >= 0:
                d = buf.pop(best)
                row += d
                pos += len(d)
            else:
                d = buf.pop(min(range(len(buf)), key=lambda i: len(buf[i])))
                row += d[:rem]
                pos = cap
        scan.append(row)
    assert ours == scan


# -----------------------------------------------------------------------------
# DDP and resume


def test_ddp_ranks_are_disjoint_and_cover_their_row_groups(base_dir, monkeypatch):
    # Each document says where it lives, so decoded rows tell which row groups a rank read.
    files = [[[f"<{f}.{g}.{i}> " + "x" * (i % 9) for i in range(16)] for g in range(ng)]
             for f, ng in enumerate([5, 3, 1])]
    write_files(base_dir / "base_data_climbmix", files, row_group_size=16)
    seen = {}
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        it = state_loader(ByteTokenizer(), 4, 16, "train", device="cpu", buffer_size=8, tokenizer_batch_size=4)
        groups = set()
        for x, _y, _ in take(it, 25):
            for row in x.tolist():
                for piece in ByteTokenizer().decode([t if t != 256 else ord("|") for t in row]).split("|"):
                    if piece.startswith("<") and ">" in piece:
                        f, g, _i = piece[1:piece.index(">")].split(".")
                        groups.add((int(f), int(g)))
        seen[rank] = groups
    assert seen[0] & seen[1] == set()
    assert seen[0] == {(0, 0), (0, 2), (0, 4), (1, 0), (1, 2)}
    assert seen[1] == {(0, 1), (0, 3), (1, 1)}


def test_exact_resume_continues_the_same_batches(golden, golden_dir):
    kwargs = dict(tokenizer_threads=1, tokenizer_batch_size=8, device="cpu", buffer_size=40)
    full = take(state_loader(ByteTokenizer(), 4, 48, "train", **kwargs), 40)  # wraps into epoch 2
    for k in (0, 7, 23):
        state = full[k][2]  # as saved in a checkpoint (JSON round trip)
        resumed = take(state_loader(ByteTokenizer(), 4, 48, "train", resume_state_dict=state, **kwargs), 40 - k - 1)
        for j, (x, y, s) in enumerate(resumed):
            assert torch.equal(x, full[k + 1 + j][0]) and torch.equal(y, full[k + 1 + j][1]), (k, j)
            assert s == full[k + 1 + j][2]
    assert len(json.dumps(full[-1][2])) < 2000  # small enough for checkpoint meta


def test_exact_resume_under_ddp_with_all_ranks_states(golden, golden_dir, monkeypatch):
    kwargs = dict(tokenizer_threads=1, tokenizer_batch_size=8, device="cpu", buffer_size=40)
    runs = {}
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        runs[rank] = take(state_loader(ByteTokenizer(), 2, 24, "train", **kwargs), 12)
    saved = {"ranks": [runs[0][5][2], runs[1][5][2]]}  # what a trainer gathers at step 5
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        resumed = take(state_loader(ByteTokenizer(), 2, 24, "train", resume_state_dict=saved, **kwargs), 6)
        assert [r[0].tolist() for r in resumed] == [r[0].tolist() for r in runs[rank][6:12]]


def test_approximate_resume_skips_at_most_the_rest_of_a_row_group():
    # Upstream state {pq, rg, epoch}: continue with this rank's next row group in the same file, then the next file.
    plan = row_group_plan([6, 4], rank=1, world_size=2, state={"pq_idx": 0, "rg_idx": 3, "epoch": 1})
    assert [next(plan)[:2] for _ in range(5)] == [(0, 5), (1, 1), (1, 3), (0, 1), (0, 3)]
    plan = row_group_plan([6, 4], rank=0, world_size=2, state={"pq_idx": 0, "rg_idx": 4, "epoch": 3})
    assert [next(plan) for _ in range(2)] == [(1, 0, 0, 3), (1, 2, 0, 3)]


def test_val_batches_are_identical_every_time(golden, golden_dir):
    def val_batches():
        it = plain_loader(ByteTokenizer(), 2, 24, "val", device="cpu", buffer_size=40, tokenizer_batch_size=8)
        return [next(it)[0].clone() for _ in range(5)]

    a, b = val_batches(), val_batches()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -----------------------------------------------------------------------------
# Bad input


def test_no_shards_names_the_fix(base_dir):
    with pytest.raises(NanochatError) as e:
        next(state_loader(ByteTokenizer(), 2, 16, "train", device="cpu"))
    assert "python -m nanochat.dataset" in str(e.value) and "--source sample" in str(e.value)


def test_corrupt_shard_names_the_file(golden, golden_dir):
    bad = golden_dir / "shard_00001.parquet"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: the footer is gone
    with pytest.raises(NanochatError) as e:
        it = state_loader(ByteTokenizer(), 2, 16, "train", device="cpu", buffer_size=40)
        next(it)
    assert str(bad) in str(e.value) and "python -m nanochat.dataset" in str(e.value)


def test_empty_null_and_non_utf8_documents_do_not_crash(base_dir):
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir()
    texts = [b"", b"\xff\xfe not utf-8 \xc3", None, "caf\u00e9".encode(), b"plain"] * 20
    for i in range(2):
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.binary())}), data_dir / f"shard_{i:05d}.parquet")
    it = state_loader(ByteTokenizer(), 2, 16, "train", device="cpu", buffer_size=10, tokenizer_batch_size=4)
    batches = take(it, 10)
    flat = [t for x, _, _ in batches for t in x.flatten().tolist()]
    assert flat.count(256) > 10  # lots of tiny documents, each starting with BOS
    assert 0xEF in flat  # U+FFFD (EF BF BD) replaced the invalid bytes


def test_rank_without_row_groups_is_a_clear_error(base_dir, monkeypatch):
    write_files(base_dir / "base_data_climbmix", [[["a", "b"]], [["c"]]], row_group_size=16)
    set_rank(monkeypatch, 1, 2)
    with pytest.raises(NanochatError, match="rank 1 of 2 gets no data"):
        next(state_loader(ByteTokenizer(), 1, 8, "train", device="cpu"))


def test_bad_split_is_a_value_error(base_dir):
    with pytest.raises(ValueError, match="split"):
        next(dataloader.tokenizing_distributed_data_loader_bos_bestfit(ByteTokenizer(), 1, 8, "test", device="cpu"))
