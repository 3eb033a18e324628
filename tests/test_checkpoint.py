"""python -m pytest tests/test_checkpoint.py -q

nanochat.checkpoint_manager: exact save/load round trips on a local dir and on S3 (moto server on loopback),
crash safety (failures injected at every file of a save, and a saving process SIGKILLed while it is parked inside
a file of a save, which the test first sees as incomplete on storage),
clear errors for missing checkpoints, and compatibility with base dirs written by upstream nanochat
(tests/fixtures/upstream_checkpoint, made by dev/make_upstream_fixtures_checkpoint.py).
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import storage
from nanochat.common import NanochatError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "upstream_checkpoint")



@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """An empty base dir: local, or a fresh prefix in the moto bucket. NANOCHAT_BASE_DIR points at it."""
    if request.param == "local":
        base = str(tmp_path / "base")
    else:
        server = request.getfixturevalue("s3")
        server.apply_env(monkeypatch)
        base = server.uri(f"t/{request.node.name}-{time.monotonic_ns()}")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    return base


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    model = {
        "transformer.wte.weight": torch.randn(40, 8, generator=g).to(torch.bfloat16),
        "transformer.h.0.attn.c_q.weight": torch.randn(8, 8, generator=g),
        "resid_lambdas": torch.ones(2) * seed,
        "counter": torch.tensor([seed], dtype=torch.int64),
    }
    optim = {"state": {0: {"exp_avg": torch.randn(8, 8, generator=g), "step": seed}},
             "param_groups": [{"kind": "adamw", "lr": 0.02, "betas": (0.8, 0.95), "params": [0]}]}
    meta = {"step": seed, "val_bpb": 1.0 / (seed + 1), "model_config": {"n_layer": 2},
            "loop_state": {"min_val_bpb": 0.5, "total_training_time": 1.5}, "tags": ["a", "b"]}
    return model, optim, meta


def _assert_state_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# -----------------------------------------------------------------------------
# Round trips and layout


def test_round_trip_exact(root):
    ckdir = storage.join(root, "base_checkpoints", "d2")
    for step in (9, 10):
        model, optim, meta = _state(step)
        for rank in (1, 0):
            cm.save_checkpoint(ckdir, step, model, {**optim, "rank": rank}, meta, rank=rank)
    assert storage.listdir(ckdir) == [
        "meta_000009.json", "meta_000010.json", "model_000009.pt", "model_000010.pt",
        "optim_000009_rank0.pt", "optim_000009_rank1.pt", "optim_000010_rank0.pt", "optim_000010_rank1.pt"]
    assert cm.find_last_step(ckdir) == 10
    assert cm.find_largest_model(storage.join(root, "base_checkpoints")) == "d2"
    model, optim, meta = _state(9)
    got_model, got_optim, got_meta = cm.load_checkpoint(ckdir, 9, "cpu", load_optimizer=True, rank=1)
    _assert_state_equal(got_model, model)
    assert got_meta == json.loads(json.dumps(meta))  # JSON turns the tuple into a list, nothing else changes
    assert got_optim["rank"] == 1 and got_optim["param_groups"] == optim["param_groups"]
    assert torch.equal(got_optim["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])
    assert cm.load_optimizer_state("base", "cpu", rank=0, model_tag="d2", step=9)["rank"] == 0
    assert cm.load_optimizer_state("base", "cpu", rank=5) is None  # a rank that saved nothing
    assert json.loads(storage.read_bytes(cm.meta_path(ckdir, 10))) == json.loads(json.dumps(_state(10)[2]))


def test_rl_style_checkpoint_without_optimizer(root):
    ckdir = storage.join(root, "chatrl_checkpoints", "d2")
    model, _, _ = _state(3)
    cm.save_checkpoint(ckdir, 3, model, None, {"model_config": {"n_layer": 2}})
    assert storage.listdir(ckdir) == ["meta_000003.json", "model_000003.pt"]
    got, optim, meta = cm.load_checkpoint(ckdir, 3, "cpu")
    _assert_state_equal(got, model)
    assert optim is None and meta == {"model_config": {"n_layer": 2}}
    with pytest.raises(cm.CheckpointNotFoundError, match="same number of workers"):
        cm.load_checkpoint(ckdir, 3, "cpu", load_optimizer=True)


def _save_with_ranks(rank, world, ckdir, port):
    # One process of a 2-rank gloo group: both ranks call save_checkpoint, as base_train does.
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, optim, meta = _state(4)
    if rank == 1:
        time.sleep(1.0)  # a slow rank: rank 0 must not write meta before this shard exists
    cm.save_checkpoint(ckdir, 4, model, {**optim, "rank": rank}, meta, rank=rank)
    if rank == 0:
        assert os.path.exists(os.path.join(ckdir, "optim_000004_rank1.pt"))
    torch.distributed.destroy_process_group()


def test_multi_rank_save_writes_meta_after_all_shards(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckdir = str(tmp_path / "d2")
    # fork: the children reuse this process's imports (spawn would re-import torch twice on a 2-core machine)
    torch.multiprocessing.start_processes(_save_with_ranks, args=(2, ckdir, port), nprocs=2, start_method="fork")
    assert sorted(os.listdir(ckdir)) == ["meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt",
                                         "optim_000004_rank1.pt"]
    meta_mtime = os.path.getmtime(os.path.join(ckdir, "meta_000004.json"))
    assert all(os.path.getmtime(os.path.join(ckdir, f)) <= meta_mtime for f in os.listdir(ckdir))


# -----------------------------------------------------------------------------
# Missing checkpoints: errors that name the command to run


@pytest.mark.parametrize("source,command", [("base", "ray_jobs.base_train"), ("sft", "ray_jobs.chat_sft"),
                                            ("rl", "ray_jobs.chat_rl")])
def test_missing_checkpoints_name_the_command(root, source, command):
    with pytest.raises(NanochatError, match=f"No checkpoints found.*python -m {command}") as info:
        cm.load_model(source, "cpu", phase="eval")
    assert isinstance(info.value, FileNotFoundError)  # upstream raised FileNotFoundError; callers may catch it


def test_missing_tag_and_step_list_what_exists(root):
    base_ck = storage.join(root, "base_checkpoints")
    model, optim, meta = _state(5)
    cm.save_checkpoint(storage.join(base_ck, "d3"), 5, model, None, meta)
    cm.save_checkpoint(storage.join(base_ck, "d12"), 5, model, None, meta)
    assert cm.find_largest_model(base_ck) == "d12"  # by depth, not by name order
    with pytest.raises(NanochatError, match=r"No model tag 'd7'.*found: d12, d3"):
        cm.load_model("base", "cpu", "eval", model_tag="d7")
    with pytest.raises(NanochatError, match=r"step 6 is missing.*complete steps: \[5\]"):
        cm.load_checkpoint(storage.join(base_ck, "d3"), 6, "cpu")
    with pytest.raises(ValueError, match="source must be one of"):
        cm.load_model("pretrain", "cpu", "eval")


def test_find_largest_model_falls_back_to_newest(tmp_path):
    for i, tag in enumerate(["zeta", "alpha"]):  # alpha is written last
        d = tmp_path / tag
        d.mkdir()
        os.utime(d, (1000 + i, 1000 + i))
    assert cm.find_largest_model(str(tmp_path)) == "alpha"


# -----------------------------------------------------------------------------
# Crash safety


@pytest.mark.parametrize("fail_at", [0, 1, 2])  # 0: model file, 1: optimizer shard, 2: meta
def test_failure_at_any_file_keeps_previous_checkpoint(root, monkeypatch, fail_at):
    ckdir = storage.join(root, "base_checkpoints", "d2")
    for step in (5, 10):
        cm.save_checkpoint(ckdir, step, *_state(step))
    real_writer = storage.atomic_writer
    calls = []

    @contextlib.contextmanager
    def failing_writer(path):
        calls.append(path)
        with real_writer(path) as f:
            yield f
            if len(calls) - 1 == fail_at:
                f.write(b"torn")
                raise OSError("injected crash while writing " + path)

    def check_last(expected_step):
        assert cm.find_last_step(ckdir) == expected_step
        model, optim, meta = cm.load_checkpoint(ckdir, expected_step, "cpu", load_optimizer=True)
        _assert_state_equal(model, _state(expected_step)[0])
        assert meta["step"] == expected_step and optim["state"][0]["step"] == expected_step
        assert not [n for n in storage.listdir(ckdir) if "tmp" in n]

    monkeypatch.setattr(storage, "atomic_writer", failing_writer)
    with pytest.raises(OSError, match="injected"):
        cm.save_checkpoint(ckdir, 20, *_state(20))
    check_last(10)
    # Re-saving an existing step (e.g. after a resume) that crashes must not pair new files with old meta:
    # step 10 becomes incomplete and the previous good step is the newest.
    calls.clear()
    with pytest.raises(OSError, match="injected"):
        cm.save_checkpoint(ckdir, 10, *_state(30))
    check_last(5)


def test_failed_meta_write_falls_back_to_previous_step(root, monkeypatch):
    ckdir = storage.join(root, "base_checkpoints", "d2")
    good = _state(10)
    cm.save_checkpoint(ckdir, 10, *good)
    def full_disk(path, data):
        raise OSError("disk full")

    with monkeypatch.context() as m, pytest.raises(OSError, match="disk full"):
        m.setattr(storage, "write_bytes", full_disk)  # only meta goes through write_bytes
        cm.save_checkpoint(ckdir, 20, *_state(20))
    assert storage.exists(cm.model_path(ckdir, 20))  # the model file landed, but the step is not complete
    assert cm.find_last_step(ckdir) == 10
    model, optim, meta = cm.load_checkpoint(ckdir, cm.find_last_step(ckdir), "cpu", load_optimizer=True)
    _assert_state_equal(model, good[0])
    assert meta["step"] == 10


_SAVER = r"""
import contextlib, sys, torch
from nanochat import checkpoint_manager as cm, storage
ckdir, mb, gate_name, gate_fraction = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
n = mb * 1024 * 1024 // 4 // 3
writer = storage.atomic_writer


class Gate:
    # The file object of the save being written: parks the process mid-write of gate_name (after gate_fraction of
    # its bytes), says so on stdout, and waits for the SIGKILL.
    def __init__(self, f, size):
        self.f, self.size, self.written = f, size, 0

    def write(self, data):
        if self.written + len(data) >= self.size * gate_fraction:
            cut = max(0, int(self.size * gate_fraction) - self.written)
            self.f.write(data[:cut])
            self.f.flush()
            print("mid-write", flush=True)
            sys.stdin.readline()  # never answered
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextlib.contextmanager
def gated_writer(p):
    with writer(p) as f:
        yield Gate(f, 4 * n * (3 if "model_" in p else 1)) if p.endswith(gate_name) else f  # bytes of float32 data


storage.atomic_writer = gated_writer
for step in range(1, 10):
    model = {f"w{i}": torch.full((n,), float(step)) for i in range(3)}
    cm.save_checkpoint(ckdir, step, model, {"step": step, "m": torch.full((n,), float(step))}, {"step": step})
    print(step, flush=True)
"""


def _incomplete_steps(ckdir) -> tuple[set, list]:
    """(steps with a model/optimizer file but no meta, partial temp files) as the storage shows them."""
    names = storage.listdir(ckdir)
    steps = {int(m.group(1)) for n in names if (m := re.fullmatch(r"(?:model|optim)_(\d+)(?:_rank\d+)?\.pt", n))}
    return {s for s in steps if f"meta_{s:06d}.json" not in names}, [n for n in names if n.startswith(".")]


# gate: which file of step 2's save the process is killed in the middle of (S3 shows a step as incomplete only
# between its objects: an interrupted upload never becomes an object)
@pytest.mark.parametrize("backend,megabytes,gate", [("local", 4, "model_000002.pt"),
                                                    ("local", 4, "optim_000002_rank0.pt"),
                                                    ("s3", 4, "optim_000002_rank0.pt")])  # fmt: skip
def test_sigkill_mid_save_leaves_a_loadable_last_step(backend, megabytes, gate, tmp_path, request, monkeypatch):
    env = dict(os.environ)
    if backend == "local":
        ckdir = str(tmp_path / "d2")
    else:
        server = request.getfixturevalue("s3")
        env.update(server.env)
        server.apply_env(monkeypatch)
        ckdir = server.uri(f"kill/{time.monotonic_ns()}/d2")
    fraction = random.Random(gate).uniform(0.2, 0.8)  # somewhere inside the file
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, ckdir, str(megabytes), gate, str(fraction)], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "1"  # one full checkpoint exists
        assert proc.stdout.readline().strip() == "mid-write"  # step 2's save is parked inside `gate`
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kill landed inside a save: storage shows step 2 incomplete (a file without meta, or a partial temp file)
    incomplete, partial = _incomplete_steps(ckdir)
    if gate.startswith("model_"):
        assert incomplete == set() and len(partial) == 1, (incomplete, partial)  # model file half written
    else:
        assert incomplete == {2}, storage.listdir(ckdir)  # model written, optimizer (and meta) not
        assert len(partial) == (1 if backend == "local" else 0), partial
    last = cm.find_last_step(ckdir)
    assert last == 1
    model, optim, meta = cm.load_checkpoint(ckdir, last, "cpu", load_optimizer=True)
    assert meta == {"step": last} and optim["step"] == last
    assert all(torch.all(t == float(last)) for t in model.values())
    for name in storage.listdir(ckdir):  # every visible model file is whole (temp files are hidden dotfiles)
        if name.startswith("model_"):
            with storage.open_read(storage.join(ckdir, name)) as f:
                torch.load(f)
    if backend == "local":  # the next successful save cleans up the killed save's partial temp file (once stale)
        for name in os.listdir(ckdir):
            if name.startswith("."):
                os.utime(os.path.join(ckdir, name), (time.time() - 3600, time.time() - 3600))
        cm.save_checkpoint(ckdir, last + 1, {"w": torch.zeros(1)}, None, {"step": last + 1})
        assert not [n for n in os.listdir(ckdir) if n.startswith(".")]


# -----------------------------------------------------------------------------
# Real models: upstream-written base dir, and our own writes on local disk and S3


def _copy_fixture(dst):
    for dirpath, _, files in os.walk(FIXTURE):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, FIXTURE).replace(os.sep, "/")
            with open(src, "rb") as f:
                storage.write_bytes(storage.join(dst, rel), f.read())


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def test_upstream_written_base_dir_loads(root):
    _copy_fixture(root)
    expected = torch.load(os.path.join(FIXTURE, "expected_logits.pt"))
    model, tokenizer, meta = cm.load_model("base", "cpu", phase="eval")
    assert not model.training and tokenizer.get_vocab_size() == 300
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 embeddings upcast on CPU
    with open(os.path.join(FIXTURE, "base_checkpoints", "d2", "meta_000007.json")) as f:
        assert meta == json.load(f)
    torch.testing.assert_close(_logits(model, expected["ids"]), expected["base"], rtol=0, atol=1e-6)
    # An old upstream checkpoint: no window_pattern, no resid/x0 lambdas, torch.compile "_orig_mod." keys.
    model, _, meta = cm.load_model("sft", "cpu", phase="train", model_tag="d2", step=3)
    assert model.training and model.config.window_pattern == "L"
    assert torch.equal(model.resid_lambdas.detach(), torch.ones(2))
    torch.testing.assert_close(_logits(model, expected["ids"]), expected["sft"], rtol=0, atol=1e-6)


def test_our_checkpoint_of_a_real_model_round_trips(root, tmp_path, monkeypatch):
    # Load the fixture from a local dir, save it with ours into root (local or S3), load it back from root.
    local = str(tmp_path / "fixture")
    shutil.copytree(FIXTURE, local)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", local)
    model, _, meta = cm.load_model("base", "cpu", phase="eval")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", root)
    storage.write_bytes(storage.join(root, "tokenizer", "tokenizer.pkl"),
                        storage.read_bytes(os.path.join(local, "tokenizer", "tokenizer.pkl")))
    ckdir = storage.join(root, "base_checkpoints", "d2")
    cm.save_checkpoint(ckdir, 8, model.state_dict(), None, {**meta, "step": 8})
    loaded, _, meta2 = cm.load_model("base", "cpu", phase="eval")
    assert meta2["step"] == 8 and meta2["model_config"] == meta["model_config"]
    _assert_state_equal(loaded.state_dict(), model.state_dict())
    ids = torch.load(os.path.join(FIXTURE, "expected_logits.pt"))["ids"]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upstream_fixture_loads_on_cuda(tmp_path, monkeypatch):
    # On CUDA the bf16 embeddings are not upcast (as upstream); logits match the CPU reference loosely.
    shutil.copytree(FIXTURE, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    expected = torch.load(os.path.join(FIXTURE, "expected_logits.pt"))
    model, _, _ = cm.load_model("base", torch.device("cuda"), phase="eval")
    assert all(p.is_cuda for p in model.parameters())
    got = _logits(model, expected["ids"].cuda()).cpu()
    torch.testing.assert_close(got, expected["base"], rtol=0, atol=5e-2)
    # Saving from CUDA and loading back on CPU gives the same weights.
    cm.save_checkpoint(str(tmp_path / "again" / "d2"), 1, model.state_dict(), None, {"model_config": {}})
    sd, _, _ = cm.load_checkpoint(str(tmp_path / "again" / "d2"), 1, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v.cpu()), k
