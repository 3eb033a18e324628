"""python -m pytest tests/test_staging.py -q

Host-to-device staging of training batches (nanochat/staging.py): no host buffer is overwritten before the copy
that reads it has completed, even when the device lags the CPU without bound. On CPU a fake device whose copies run
only when waited for drives the real protocol (pretraining packer and SFT); the same guard flags the single-buffer
protocol the loader used before (the CUDA race). The `gpu` tests reproduce the race on a real lagging GPU.
"""

import functools

import numpy as np
import pytest
import torch

from nanochat import sft
from nanochat.dataloader import pack_batches
from nanochat.staging import HostStaging

# -----------------------------------------------------------------------------
# A device that lags: copies are queued and run (in order, like a stream) only when someone waits for one


class LaggingDevice:
    """transfer() queues the copy and returns at once; a copy runs when its handle (or a later one) is waited on,
    or at flush(). Each copy checks that its source still holds what it held when the copy was issued."""

    def __init__(self):
        self.queue, self.overwritten, self.copies = [], [], 0

    def transfer(self, host, device):
        out = tuple(torch.empty_like(h) for h in host)
        job = {"n": self.copies, "pairs": [(h, o, h.clone()) for h, o in zip(host, out)]}
        self.copies += 1
        self.queue.append(job)
        return out, _Done(self, job)

    def run_through(self, job):
        while job in self.queue:
            j = self.queue.pop(0)
            for src, dst, issued in j["pairs"]:
                if not torch.equal(src, issued):
                    self.overwritten.append(j["n"])  # the GPU would have read a later batch's data
                dst.copy_(src)

    def flush(self):
        if self.queue:
            self.run_through(self.queue[-1])


class _Done:
    def __init__(self, dev, job):
        self.dev, self.job = dev, job

    def synchronize(self):
        self.dev.run_through(self.job)


class SingleBufferStaging:
    """The protocol the loader had before: one persistent host buffer, refilled without waiting for its copy."""

    def __init__(self, specs, transfer):
        self.host = tuple(torch.empty(s, dtype=d) for s, d in specs)
        self.transfer = transfer

    def put(self, fill):
        fill(*self.host)
        out, _ = self.transfer(self.host, "lagging")
        return out


# -----------------------------------------------------------------------------
# Documents and the reference batches (the default CPU path, which never stages)


def random_chunks(seed=0, bos=7, vocab=50):
    rng = np.random.default_rng(seed)
    n = 0
    while True:
        docs = [np.concatenate([[bos], rng.integers(0, vocab, rng.integers(1, 40))]).astype(np.int64)
                for _ in range(16)]
        refs = [(0, 0, n + i) for i in range(len(docs))]
        n += len(docs)
        yield docs, refs, (0, 0, n, 1)


def draw(it, n):
    return [next(it)[:2] for _ in range(n)]


B, T, N = 3, 16, 9


def reference_batches():
    return [(x.clone(), y.clone()) for x, y in draw(pack_batches(random_chunks(), B, T, buffer_size=8), N)]


def compare(got, ref):
    return [torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(got, ref)]


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_lagging_device_gets_every_batch_intact(slots):
    dev = LaggingDevice()
    staging = HostStaging([((2, B, T), torch.long)], "cpu", slots=slots, transfer=dev.transfer)
    got = draw(pack_batches(random_chunks(), B, T, buffer_size=8, staging=staging), N)
    pending = len(dev.queue)
    dev.flush()
    assert compare(got, reference_batches()) == [True] * N
    assert dev.overwritten == []
    assert pending == slots  # the CPU ran ahead by `slots` copies and waited only then: still asynchronous


def test_guard_flags_the_single_buffer_protocol():
    """The same guard on the old protocol: every copy but the last reads a buffer refilled after it was issued."""
    dev = LaggingDevice()
    staging = SingleBufferStaging([((2, B, T), torch.long)], dev.transfer)
    got = draw(pack_batches(random_chunks(), B, T, buffer_size=8, staging=staging), N)
    dev.flush()
    assert dev.overwritten == list(range(N - 1))
    assert compare(got, reference_batches()) == [False] * (N - 1) + [True]


def test_cpu_batches_are_not_overwritten_by_later_ones():
    it = pack_batches(random_chunks(), B, T, buffer_size=8)
    got = draw(it, N)  # no clones: each batch must be its own tensor
    assert compare(got, reference_batches()) == [True] * N


def test_multiple_specs_and_dtypes():
    dev = LaggingDevice()
    staging = HostStaging([((2, 3), torch.int32), ((2, 3), torch.long)], "cpu", slots=2, transfer=dev.transfer)
    outs = [staging.put(lambda a, b, k=k: (a.fill_(k), b.fill_(-k))) for k in range(5)]
    dev.flush()
    assert dev.overwritten == []
    assert [(a.dtype, b.dtype) for a, b in outs] == [(torch.int32, torch.long)] * 5
    assert [(int(a[0, 0]), int(b[1, 2])) for a, b in outs] == [(k, -k) for k in range(5)]


def test_slots_must_be_positive():
    with pytest.raises(ValueError, match="slots"):
        HostStaging([((1,), torch.long)], "cpu", slots=0)


# -----------------------------------------------------------------------------
# SFT's per-micro-step copies (int32 inputs, int64 targets) go through the same ring


class ListTokenizer:
    """A conversation is a list of token ids; BOS = 0, every token after BOS supervised."""

    def get_bos_token_id(self):
        return 0

    def render_conversation(self, conversation, max_tokens=2048):
        ids = [0, *conversation][:max_tokens]
        return ids, [0] + [1] * (len(ids) - 1)


def sft_iter(device):
    rng = np.random.default_rng(3)
    data = [rng.integers(1, 50, int(rng.integers(3, 30))).tolist() for _ in range(200)]
    return sft.sft_batches(data, ListTokenizer(), B=4, T=32, rank=0, world=1, device=device, buffer_size=10)


def sft_stream(device, n=7):
    return draw(sft_iter(device), n)


def test_sft_batches_on_a_lagging_device(monkeypatch):
    ref = sft_stream("cpu")
    dev = LaggingDevice()
    monkeypatch.setattr(sft, "HostStaging", functools.partial(HostStaging, slots=2, transfer=dev.transfer))
    got = sft_stream("cpu")
    dev.flush()
    assert dev.overwritten == []
    assert compare(got, ref) == [True] * len(ref)
    assert (got[0][0].dtype, got[0][1].dtype) == (torch.int32, torch.long)


# -----------------------------------------------------------------------------
# On a real GPU (skips without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_lagging_gpu_gets_the_cpu_batches():
    """The issue's reproduction: draw 1 batch, make the GPU lag, draw 4 more; all must equal the CPU stream."""
    ref = reference_batches()[:5]
    it = pack_batches(random_chunks(), B, T, device="cuda", buffer_size=8)
    got = [next(it)[:2]]
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued before the next copies
    got += [next(it)[:2] for _ in range(4)]
    torch.cuda.synchronize()
    assert compare([(x.cpu(), y.cpu()) for x, y in got], ref) == [True] * 5


@pytest.mark.gpu
@cuda
def test_lagging_gpu_with_the_real_loader(base_dir):
    """Same through the public loader (parquet shards, tokenizer, pinned ring), and its bytes match the CPU run."""
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader
    from tests.test_dataloader import ByteTokenizer, write_files

    rng = np.random.default_rng(1)
    docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(5, 300))) for _ in range(2048)]
    write_files(base_dir / "base_data_climbmix", [[docs[:1024]], [docs[1024:]], [docs[:64]]], row_group_size=256)
    on_cpu = loader(ByteTokenizer(), 8, 256, "train", device="cpu")
    cpu = [next(on_cpu)[:2] for _ in range(6)]
    it = loader(ByteTokenizer(), 8, 256, "train", device="cuda")
    got = [next(it)[:2]]
    torch.cuda._sleep(2_000_000_000)
    got += [next(it)[:2] for _ in range(5)]
    torch.cuda.synchronize()
    assert compare([(x.cpu(), y.cpu()) for x, y in got], cpu) == [True] * 6


@pytest.mark.gpu
@cuda
def test_lagging_gpu_sft_batches():
    ref = sft_stream("cpu", 5)
    it = sft_iter("cuda")
    got = [next(it)[:2]]
    torch.cuda._sleep(2_000_000_000)
    got += draw(it, 4)
    torch.cuda.synchronize()
    assert compare([(x.cpu(), y.cpu()) for x, y in got], ref) == [True] * 5
