"""
A tiny random chat checkpoint (tokenizer + GPT) for serving demos, tests and benchmarks: no training needed.

    python -m serve.tiny --base-dir /tmp/tinychat --depth 2      # then: NANOCHAT_BASE_DIR=/tmp/tinychat
    python -m serve.chat_web --base-dir /tmp/tinychat -i sft      # (or python -m serve.chat_cli ...)

Writes `<base>/tokenizer/tokenizer.pkl` (a 512-token BPE trained in a second on built-in text that mixes ASCII,
accents, CJK and emoji, so byte-level tokens that split UTF-8 characters do occur) and
`<base>/<chatsft|base>_checkpoints/d<depth>/model_000001.pt` + meta. The weights are random but scaled so the
next-token distribution is peaked (sampling parameters visibly matter) and the special tokens are rarely sampled
(replies usually run to max_tokens instead of ending at once).
"""

import argparse
import os

import torch

from nanochat.checkpoint_manager import CHECKPOINT_SOURCES, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

_WORDS = ("the model answers every question with care . hello world , how are you today ? naïve café déjà vu "
          "über straße 日本語 のテキスト 中文 字符 🙂 🚀 ✨ emoji and numbers 12 + 34 = 46 ; 7 * 6 = 42 .").split()


def tiny_corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        idx = torch.randint(len(_WORDS), (int(torch.randint(8, 40, (1,), generator=g)),), generator=g)
        docs.append(" ".join(_WORDS[i] for i in idx.tolist()))
    return docs


def make_tiny_checkpoint(base_dir: str, depth: int = 2, sequence_len: int = 256, vocab_size: int = 512,
                         source: str = "sft", model_tag: str | None = None, step: int = 1, seed: int = 0) -> str:
    """Write a tokenizer and a random GPT checkpoint under base_dir; returns the checkpoint directory."""
    tokenizer = RustBPETokenizer.train_from_iterator(iter(tiny_corpus()), vocab_size)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    n_embd = 64 * depth
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=depth,
                       n_head=max(1, n_embd // 64), n_kv_head=max(1, n_embd // 64), n_embd=n_embd,
                       window_pattern="SL")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # init_weights makes every block the identity; random blocks give varied outputs
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p.float()).to(p.dtype) * p.size(-1) ** -0.5)
        model.lm_head.weight.mul_(3.0)  # logits with std ~3: a peaked distribution
        special = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
        model.lm_head.weight[special] = 0.0  # specials get logit 0, far below the likely tokens
    tag = model_tag or f"d{depth}"
    ckdir = os.path.join(base_dir, CHECKPOINT_SOURCES[source][0], tag)
    meta = {"step": step, "model_config": {f: getattr(config, f) for f in
                                           ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                            "n_embd", "window_pattern")}}
    save_checkpoint(ckdir, step, model.state_dict(), None, meta)
    return ckdir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a tiny random chat checkpoint for serving demos/tests")
    parser.add_argument("--base-dir", required=True, help="directory to write (used as NANOCHAT_BASE_DIR)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("-i", "--source", default="sft", choices=sorted(CHECKPOINT_SOURCES))
    args = parser.parse_args(argv)
    path = make_tiny_checkpoint(args.base_dir, depth=args.depth, sequence_len=args.sequence_len, source=args.source)
    print(f"Wrote {path}; use NANOCHAT_BASE_DIR={args.base_dir}")


if __name__ == "__main__":
    main()
