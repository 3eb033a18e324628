"""Helpers shared by the evaluation tests (not a test module): the fixtures of dev/make_eval_fixtures.py served by
tests.httpserver on loopback, a byte-level tokenizer, and a tiny real checkpoint."""

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch

from tests.httpserver import FileServer

REPO = Path(__file__).resolve().parents[1]


def load_fixture_builder():
    spec = importlib.util.spec_from_file_location("make_eval_fixtures", REPO / "dev" / "make_eval_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_fixtures(root) -> FileServer:
    """Build the fixtures under root and serve them on loopback (tests.httpserver); caller stops the server."""
    server = FileServer(root).start()
    load_fixture_builder().build(str(root), server.base_url)
    return server


def fixture_env(server: FileServer) -> dict[str, str]:
    """Point every evaluation download at the fixture server."""
    return {
        "NANOCHAT_EVAL_BUNDLE_URL": server.url("eval_bundle.zip"),
        "NANOCHAT_TASK_DATA_URL": server.base_url,
        "NANOCHAT_WORD_LIST_URL": server.url("words_alpha.txt"),
    }


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, BOS is 256: token spans can be computed by hand."""

    def get_bos_token_id(self):
        return 256

    def __call__(self, texts, prepend=None):
        single = isinstance(texts, str)
        out = [
            ([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in ([texts] if single else texts)
        ]
        return out[0] if single else out


CORPUS = [
    "The cat sat on the mat. Question: Which color is the dog? Answer: red blue green yellow black white.",
    "Tom has 3 apples and buys 4 more. How many apples does he have? #### 7",
    "Multiple Choice question: What is 1 plus 1? - 2=A - 3=B Respond only with the letter of the correct answer.",
    "def add(x, y): return x + y  # The horse chased the sheep because the horse was fast.",
] * 20


def make_tiny_checkpoint(base_dir, source_dir="base_checkpoints", tag="d2", step=5, seed=0, n_layer=2):
    """Train a tiny tokenizer into base_dir/tokenizer and save a randomly initialised (noised) GPT checkpoint.

    Returns (model, tokenizer, checkpoint_dir). The weights get seeded noise so that predictions differ
    between options (a freshly initialised GPT has zero output projections and ties everywhere)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes, save_token_bytes

    tok_dir = os.path.join(base_dir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")):
        tokenizer = RustBPETokenizer.from_directory(tok_dir)
    else:
        tokenizer = RustBPETokenizer.train_from_iterator(iter(CORPUS), 320)
        os.makedirs(tok_dir, exist_ok=True)
        tokenizer.save(tok_dir)
        save_token_bytes(compute_token_bytes(tokenizer), tok_dir)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer, n_head=2,
                       n_kv_head=2, n_embd=64, window_pattern="L")  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    checkpoint_dir = os.path.join(base_dir, source_dir, tag)
    meta = {"step": step, "model_config": dataclasses.asdict(config), "user_config": {}}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return model, tokenizer, checkpoint_dir
