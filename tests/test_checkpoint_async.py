"""Background checkpoint saves (no Ray): how long the loop is blocked, and SIGKILL in the middle of an S3 upload.

python -m pytest tests/test_checkpoint_async.py -q

Timing is compared within one test on the same machine (synchronous vs background save of the same model), on the
loop's measured blocking time of the save itself, not on step times (noisy on a shared 2-core machine). The kill
test runs training in a subprocess whose S3 client SIGKILLs the process once the upload of one checkpoint file
has started, from the background writer thread: the newest meta on S3 must still point at complete files.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat import storage
from nanochat.checkpoint_manager import complete_steps, find_last_step, load_checkpoint, steps_on_storage
from nanochat.train import BaseTrainConfig, train
from tests.s3server import S3Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def cfg(**kw):
    # depth 2 x 256 wide with a 4096 vocab: ~4M params, ~45 MB of model + optimizer per save; tiny batches
    base = dict(depth=2, aspect_ratio=128, head_dim=64, max_seq_len=32, window_pattern="L", num_iterations=12,
                device_batch_size=1, total_batch_size=32, eval_every=-1, eval_tokens=32, core_metric_every=-1,
                sample_every=-1, save_every=3, data="synthetic", vocab_size=4096, warmup_steps=1, device_type="cpu",
                keep_checkpoints=2)  # fmt: skip
    base.update(kw)
    return BaseTrainConfig(**base)


def test_background_save_blocks_the_loop_less_than_a_synchronous_save(base_dir):
    sync = train(cfg(background_save=0, model_tag="sync"))
    bg = train(cfg(background_save=1, model_tag="bg"))
    # periodic saves only (steps 3, 6, 9); the final save is awaited by design
    sync_stall = sorted(t for s, t in sync["save_stalls"] if s < 12)
    bg_stall = sorted(t for s, t in bg["save_stalls"] if s < 12)
    print(f"blocking time per save: synchronous {sync_stall}, background {bg_stall}")
    assert len(sync_stall) == len(bg_stall) == 3
    assert bg_stall[1] < 0.5 * sync_stall[1], (bg_stall, sync_stall)  # medians: the write is off the loop
    assert bg["saved_steps"] == sync["saved_steps"] == [3, 6, 9, 12]
    # same training either way, and the background run's checkpoints are complete and identical
    assert bg["losses"] == sync["losses"]
    a = load_checkpoint(sync["checkpoint_dir"], 12, "cpu")[0]
    b = load_checkpoint(bg["checkpoint_dir"], 12, "cpu")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


CHILD = textwrap.dedent("""
    import json, os, signal, sys, threading
    from nanochat import storage
    from nanochat.train import BaseTrainConfig, train

    target = os.environ["KILL_AT_KEY"]
    real_client = storage._s3_client

    class KillingClient:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def upload_fileobj(self, f, bucket, key, **kw):
            if key.endswith(target):
                print(f"UPLOADING {key} from thread {threading.current_thread().name}", flush=True)

                def progress(nbytes):  # s3transfer reports bytes as they are sent: die mid-upload
                    os.kill(os.getpid(), signal.SIGKILL)

                kw["Callback"] = progress
            return self.client.upload_fileobj(f, bucket, key, **kw)

    storage._s3_client = lambda *a, **k: KillingClient(real_client(*a, **k))
    train(BaseTrainConfig(**json.loads(sys.argv[1])))
""")


@pytest.mark.parametrize("victim", ["model_000008.pt", "optim_000008_rank0.pt"])
def test_sigkill_during_a_background_upload_leaves_a_complete_newest_checkpoint(victim, s3, monkeypatch, tmp_path):
    s3.apply_env(monkeypatch)
    base = s3.uri(f"kill-{victim[:5]}")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    small = dict(depth=2, aspect_ratio=32, head_dim=32, vocab_size=256, num_iterations=10, save_every=4)  # the kill needs an upload, not a big one
    c = cfg(model_tag="killed", keep_checkpoints=1, **small)
    env = {**os.environ, "KILL_AT_KEY": victim, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(c.to_dict())], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # SIGKILLed, not finished
    assert f"{victim} from thread ckpt" in proc.stdout, proc.stdout[-2000:]  # the background writer, not the loop
    ckpt = storage.join(base, "base_checkpoints", "killed")
    assert find_last_step(ckpt) == 4  # step 8 never got its meta
    assert sorted(steps_on_storage(ckpt)[4]) == ["meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt"]
    model, _, meta = load_checkpoint(ckpt, 4, "cpu")  # the newest meta points at files that exist and load
    assert meta["step"] == 4 and model
    # and the run resumes from it and finishes; retention then clears the leftovers of the killed save
    out = train(cfg(model_tag="killed", keep_checkpoints=1, resume_from_step=4, **small))
    assert out["start_step"] == 4 and out["step"] == 10
    assert complete_steps(ckpt) == [8, 10] and sorted(steps_on_storage(ckpt)) == [8, 10]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])  # fmt: skip
def test_snapshot_is_a_host_copy_that_training_cannot_change(device):
    from nanochat.checkpoint_saver import snapshot

    state = {"w": torch.arange(6.0, device=device).view(2, 3), "groups": [{"lr": 0.1, "params": [0]}], "step": 3}
    snap = snapshot(state)
    state["w"].add_(100)  # the loop keeps training in place
    state["groups"][0]["lr"] = 0.05  # and changes param_groups' learning rates
    assert snap["w"].device.type == "cpu" and torch.equal(snap["w"], torch.arange(6.0).view(2, 3))
    assert snap["groups"][0]["lr"] == 0.1 and snap["step"] == 3
    if device == "cuda":
        assert snap["w"].is_pinned()  # copied asynchronously into pinned memory, synchronized before returning
