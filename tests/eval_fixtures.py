"""Helpers shared by the evaluation tests (not a test module): a loopback HTTP server with fault injection,
the eval fixtures of dev/make_eval_fixtures.py, a byte-level tokenizer, and a tiny real checkpoint."""

import dataclasses
import http.server
import importlib.util
import os
import threading
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_fixture_builder():
    spec = importlib.util.spec_from_file_location("make_eval_fixtures", REPO / "dev" / "make_eval_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FixtureServer:
    """Serves a directory on 127.0.0.1:<free port>. `faults[url_path]` is a list of actions applied to the next
    requests of that path, one per request: "500" (HTTP error), "truncate" (half the body, full Content-Length),
    "corrupt" (bytes flipped mid-file, same length). `requests` logs every path served."""

    def __init__(self, root):
        self.root = str(root)
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests.append(path)
                action = server.faults.get(path, []).pop(0) if server.faults.get(path) else None
                file = os.path.join(server.root, path.lstrip("/"))
                if action == "500" or not os.path.isfile(file):
                    self.send_error(500 if action == "500" else 404)
                    return
                with open(file, "rb") as f:
                    body = f.read()
                if action == "corrupt":
                    mid = len(body) // 2
                    body = body[:mid] + bytes(b ^ 0xFF for b in body[mid : mid + 64]) + body[mid + 64 :]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if action == "truncate" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_fixtures(root):
    """Build the fixtures under root and return a started FixtureServer (caller must __exit__ it)."""
    server = FixtureServer(root).__enter__()
    load_fixture_builder().build(str(root), server.url)
    return server


def fixture_env(server) -> dict[str, str]:
    return {
        "NANOCHAT_EVAL_BUNDLE_URL": f"{server.url}/eval_bundle.zip",
        "NANOCHAT_TASK_DATA_URL": server.url,
        "NANOCHAT_WORD_LIST_URL": f"{server.url}/words_alpha.txt",
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
