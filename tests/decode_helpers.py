"""Helpers shared by the decode/serving tests (not a test module): a host-read counter and a small random GPT."""

import contextlib

import torch

from nanochat.gpt import GPT, GPTConfig


@contextlib.contextmanager
def count_host_reads():
    """Count reads of tensor values into Python (each is a device->host sync on a GPU)."""
    counts = {"n": 0}
    names = ["tolist", "item", "__int__", "__float__", "__bool__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(fn):
        def counted(self, *a, **kw):
            counts["n"] += 1
            return fn(self, *a, **kw)
        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(saved[n]))
    try:
        yield counts
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])


def random_model(window_pattern="SSSL", sequence_len=128, seed=0, n_kv_head=2):
    """A small GPT with every weight random (init_weights zeroes smear/projections, which would hide bugs)."""
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=300, n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            std = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std + (0.5 if p.ndim < 2 else 0.0))
    return model.eval()


def tiny_chat_model(base: str, depth: int = 2, sequence_len: int = 256):
    """(model, tokenizer, base) of serve.tiny's random chat checkpoint, written to base and loaded back on CPU."""
    import os

    from nanochat.checkpoint_manager import load_model
    from serve.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(base, depth=depth, sequence_len=sequence_len)
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        model, tok, _ = load_model("sft", "cpu", phase="eval")
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return model, tok, base
