"""
Golden token ids for tests/test_engine.py, produced once by upstream nanochat's Engine on CPU in float32.

    python dev/make_upstream_fixtures_engine.py /tmp/upstream [--out tests/fixtures/upstream_engine.json]

The argument is an unpacked upstream checkout (nanochat@92d63d4). It is put first on sys.path, so `nanochat` in
this process is upstream's package; nothing from upstream is copied, only its outputs (token ids) are saved.

This file also defines the fakes shared with the test (importable without upstream; module level imports torch
only): a byte-level chat tokenizer, a deterministic weight filler for a GPT, a batch-independent bigram model and a
scripted model that drives the calculator tool. The test loads this file by path and rebuilds the same inputs, so
the fixture holds no weights.
"""

import argparse
import json
import os
import sys

import torch

# A small GPT whose decode crosses the short sliding window (S = 128 for sequence_len 256) and uses GQA.
GPT_CONFIG = dict(sequence_len=256, vocab_size=265, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                  window_pattern="SSSL")
WEIGHT_SEED = 1234
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the engine keeps a cache of keys and values; "
               "every new token attends to everything it has seen so far, sort of.")
GPT_CASES = [  # (name, generate kwargs)
    ("greedy", dict(num_samples=1, max_tokens=40, temperature=0.0)),
    ("greedy_x3", dict(num_samples=3, max_tokens=12, temperature=0.0)),
    ("sample_t1", dict(num_samples=4, max_tokens=24, temperature=1.0, seed=7)),
    ("sample_topk", dict(num_samples=3, max_tokens=24, temperature=0.7, top_k=16, seed=11)),
]
BIGRAM_CASES = [
    ("bigram_t1", dict(num_samples=6, max_tokens=40, temperature=1.0, seed=3)),
    ("bigram_topk", dict(num_samples=5, max_tokens=40, temperature=0.9, top_k=8, seed=5)),
]


class ByteChatTokenizer:
    """Bytes 0..255, then upstream's 9 special tokens in upstream's order (bos = 256)."""

    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def get_vocab_size(self):
        return 256 + len(self.SPECIALS)

    def encode_special(self, s):
        return 256 + self.SPECIALS.index(s)

    def get_bos_token_id(self):
        return 256

    def encode(self, text, prepend=None, append=None):
        ids = list(text.encode("utf-8"))
        if prepend is not None:
            ids = [prepend if isinstance(prepend, int) else self.encode_special(prepend)] + ids
        if append is not None:
            ids = ids + [append if isinstance(append, int) else self.encode_special(append)]
        return ids

    def decode(self, ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def fill_weights(model, seed=WEIGHT_SEED):
    """Overwrite every parameter from one seeded stream, in sorted-name order (init-independent, non-degenerate:
    upstream's init zeroes the output projections). Matrices ~ N(0, 1/fan_in) (embeddings N(0, 1)), scalars and
    vectors ~ U(0.5, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                std = 1.0 if ("wte" in name or "value_embeds" in name) else p.shape[-1] ** -0.5
                vals = torch.randn(p.shape, generator=g) * std
            else:
                vals = 0.5 + 0.5 * torch.rand(p.shape, generator=g)
            p.copy_(vals.to(p.dtype))


class _Config:
    def __init__(self, sequence_len=256):
        self.n_kv_head, self.n_head, self.n_embd, self.n_layer, self.sequence_len = 1, 1, 8, 1, sequence_len


class BigramModel:
    """Logits depend only on each row's last input token (a fixed random table), so they do not depend on the batch
    composition; <|assistant_end|> is boosted so rows finish at different times."""

    def __init__(self, vocab_size=265, seed=0, end_token=260, end_boost=2.5):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, generator=g) * 2.0
        self.table[:, end_token] += end_boost
        self.config = _Config()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        if kv_cache is not None:
            kv_cache.advance(ids.size(1))
        return self.table[ids]  # (B, T, vocab)


class ScriptedModel:
    """Emits `script` (a token list) deterministically: the logit of script[p - prompt_len] is 20 at absolute
    position p (read from the cache, per row), then <|assistant_end|>. Forced tool tokens take script slots, so a
    script fills them with any placeholder."""

    def __init__(self, prompt_len, script, vocab_size=265, end_token=260):
        self.prompt_len, self.script, self.vocab_size, self.end_token = prompt_len, script, vocab_size, end_token
        self.config = _Config()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        start = kv_cache.cache_seqlens.tolist() if kv_cache is not None else [0] * B
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                k = start[b] + t + 1 - self.prompt_len  # index of the token this position predicts
                logits[b, t, self.script[k] if 0 <= k < len(self.script) else self.end_token] = 20.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits


def calculator_script(tok):
    """A reply that calls the tool twice (arithmetic and .count) and then ends; '#' marks forced-output slots."""
    ps, pe = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    text = lambda s: tok.encode(s)
    return (text("So ") + [ps] + text("12,000*3+7") + [pe] + text("#" * 7) + text(" and ") + [ps]
            + text("'strawberry'.count('r')") + [pe] + text("#" * 3) + text(" ok") + [ps] + text("__import__('os')")
            + [pe] + text("!"))


def prompt_ids(tok):
    return tok.encode(PROMPT_TEXT, prepend=tok.get_bos_token_id())


def run_cases(engine_cls, model, tok, cases, prompt):
    """{name: {"columns": [...], "masks": [...], "results": [...], "result_masks": [...]}} for one engine class."""
    out = {}
    for name, kw in cases:
        columns, masks = [], []
        for col, m in engine_cls(model, tok).generate(prompt, **kw):
            columns.append(col)
            masks.append(m)
        results, result_masks = engine_cls(model, tok).generate_batch(prompt, **kw)
        out[name] = {"kwargs": kw, "columns": columns, "masks": masks, "results": results,
                     "result_masks": result_masks}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", help="path to an unpacked upstream nanochat checkout (92d63d4)")
    parser.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                       "..", "tests", "fixtures", "upstream_engine.json")))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.upstream, "nanochat", "engine.py")):
        raise SystemExit(f"{args.upstream} does not look like a nanochat checkout (no nanochat/engine.py)")
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, os.path.abspath(args.upstream))
    import nanochat.engine as up_engine
    import nanochat.gpt as up_gpt

    assert os.path.abspath(up_engine.__file__).startswith(os.path.abspath(args.upstream)), up_engine.__file__
    torch.set_num_threads(1)
    tok = ByteChatTokenizer()
    prompt = prompt_ids(tok)

    with torch.device("meta"):
        model = up_gpt.GPT(up_gpt.GPTConfig(**GPT_CONFIG))
    model.to_empty(device="cpu")
    model.init_weights()
    fill_weights(model)
    model.eval()
    fixture = {"upstream_commit": "92d63d4", "gpt_config": GPT_CONFIG, "prompt": prompt,
               "param_shapes": {n: list(p.shape) for n, p in sorted(model.named_parameters())}}
    fixture["gpt"] = run_cases(up_engine.Engine, model, tok, GPT_CASES, prompt)
    fixture["gpt_naive_greedy"] = list(model.generate(prompt, max_tokens=40, temperature=0.0))
    fixture["bigram"] = run_cases(up_engine.Engine, BigramModel(), tok, BIGRAM_CASES, prompt)
    script = calculator_script(tok)
    tool_prompt = [tok.get_bos_token_id()] + tok.encode("What is 12,000*3+7?")
    fixture["tool"] = run_cases(up_engine.Engine, ScriptedModel(len(tool_prompt), script), tok,
                                [("tool", dict(num_samples=2, max_tokens=80, temperature=0.0))], tool_prompt)
    fixture["tool"]["tool"]["prompt"] = tool_prompt
    with open(args.out, "w") as f:
        json.dump(fixture, f)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    for name, case in {**fixture["gpt"], **fixture["bigram"], **fixture["tool"]}.items():
        print(name, [len(r) for r in case["results"]], case["results"][0][-12:])


if __name__ == "__main__":
    main()
