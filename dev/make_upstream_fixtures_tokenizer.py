"""
Generate the tokenizer golden fixtures by running UPSTREAM nanochat's tokenizer once.

    python dev/make_upstream_fixtures_tokenizer.py /path/to/upstream/nanochat/checkout [--out tests/fixtures]

Writes (all small):
  upstream_tokenizer_corpus.txt.gz   the training text (stdlib docstrings + a few multilingual lines), gzipped with
                                     mtime 0 so re-running gives identical bytes; stored because docstrings change
                                     between Python versions and the test must train on exactly this text
  upstream_tokenizer.pkl             upstream's tokenizer.pkl (pickled tiktoken.Encoding) for that text, vocab 512
  upstream_tokenizer_expected.json   ids for a set of strings, batch encode with prepend/append, render_conversation
                                     ids + masks, render_for_completion ids, token_bytes, special ids

tests/test_tokenizer.py trains OUR tokenizer on the same corpus and checks every value against these files.
Only upstream's nanochat/tokenizer.py is imported (by file path, so our own `nanochat` package is never shadowed).
"""

import argparse
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import sys
import tempfile

import tiktoken

VOCAB_SIZE = 512
MAX_CORPUS_CHARS = 150_000

# Modules whose docstrings make the corpus: English prose, code snippets, numbers, punctuation.
CORPUS_MODULES = [
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
]

# Non-English lines so the corpus has multi-byte merges (repeated so a few of them become tokens).
MULTILINGUAL = [
    "정직한 사실 위에, 공정한 시선을 더하다. 헤럴드코리아타임즈는 종합 온라인 신문사입니다.",
    "你好世界！今天天气很好，我们一起去公园散步吧。",
    "Grüße aus München: Straße, Größe, naïve café, résumé, coöperate — “quoted” ‘text’…",
    "Emoji: 🌍🚀✨🙂 and math: ∑ k³ = (n(n+1)/2)², α ≤ β → γ, 3.14159, ½, NADP⁺, CO₂",
    "Здравствуй, мир! Это проверка токенизатора. Γειά σου κόσμε. مرحبا بالعالم",
]

TEST_STRINGS = [
    "",
    "hello world",
    "Hello world! This is a test.\nNumbers: 123, 4567, 89\nContractions: I'm, you're, it's\n"
    "Special chars: @#$%^&*()\nUnicode: 你好世界 🌍",
    "def f(x):\n    return x + 1\n\n\n\tindented\r\n  trailing   ",
    "The year 2025 had 365 days; 1234567890 is a long number, 3.14159 and -42.",
    "<|bos|> special token strings are plain text here <|assistant_end|>",
    "naïve café 你好 🙂 정직한 사실 Здравствуй мир",
    "I'LL, we've, they'RE, she'd, 'tis, don't",
    "   leading spaces and a final newline\n",
    "zqxjkv unseen letters: qqqq zzzz xxxx",
    "Returns a new list containing all items from the iterable in ascending order.",
]

CONVERSATIONS = [
    (
        {
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
            ]
        },
        2048,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello!"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "later"},
            ]
        },
        2048,
    ),
    (
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Say hi in Korean."},
                {"role": "assistant", "content": "안녕하세요! 🙂"},
            ]
        },
        2048,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "What is 123 * 456?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me compute that. "},
                        {"type": "python", "text": "123 * 456"},
                        {"type": "python_output", "text": "56088"},
                        {"type": "text", "text": "The answer is 56088."},
                    ],
                },
                {"role": "user", "content": "and 2**10?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "python", "text": "2**10"},
                        {"type": "python_output", "text": "1024"},
                        {"type": "text", "text": "It is 1024."},
                    ],
                },
            ]
        },
        2048,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "hello " * 40},
                {"role": "assistant", "content": "world " * 40},
            ]
        },
        32,
    ),
    ({"messages": [{"role": "user", "content": "only a user message"}]}, 2048),
]


def build_corpus() -> str:
    """Deterministic for a given Python version: module docstrings, then public members sorted by name."""
    pieces = []
    for modname in CORPUS_MODULES:
        mod = importlib.import_module(modname)
        if mod.__doc__:
            pieces.append(mod.__doc__)
        for name in sorted(vars(mod)):
            obj = vars(mod)[name]
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc:
                pieces.append(f"{name}:\n{doc}")
    text = "\n\n".join(pieces)[:MAX_CORPUS_CHARS]
    return text + "\n\n" + "\n".join(MULTILINGUAL * 20)


def corpus_docs(text: str) -> list[str]:
    """The iterator items: blank-line separated paragraphs (the test splits the stored corpus the same way)."""
    return text.split("\n\n")


def load_upstream_tokenizer_module(upstream_root: str):
    path = os.path.join(upstream_root, "nanochat", "tokenizer.py")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: pass the root of an upstream nanochat checkout")
    spec = importlib.util.spec_from_file_location("upstream_nanochat_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("upstream", help="root of an upstream nanochat checkout (e.g. /tmp/upstream)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = parser.parse_args()
    up = load_upstream_tokenizer_module(args.upstream)

    corpus = build_corpus()
    tok = up.RustBPETokenizer.train_from_iterator(iter(corpus_docs(corpus)), VOCAB_SIZE)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()

    # upstream's own save(), so the fixture pickle is exactly what upstream writes
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        with open(os.path.join(d, "tokenizer.pkl"), "rb") as f:
            pkl = f.read()

    special_ids = {s: tok.encode_special(s) for s in up.SPECIAL_TOKENS}
    expected = {
        "generated_by": "dev/make_upstream_fixtures_tokenizer.py",
        "python": sys.version.split()[0],
        "tiktoken": tiktoken.__version__,
        "vocab_size": VOCAB_SIZE,
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "special_ids": special_ids,
        "bos_token_id": tok.get_bos_token_id(),
        "encode": [{"text": s, "ids": tok.encode(s)} for s in TEST_STRINGS],
        "encode_batch_prepend_append": tok.encode(TEST_STRINGS, prepend="<|bos|>", append=special_ids["<|user_end|>"]),
        "id_to_token": [tok.id_to_token(i) for i in range(256, 300)],
        # the same quantity tok_train writes to token_bytes.pt: raw byte length, 0 for specials
        "token_bytes": [
            0 if i in special_ids.values() else len(tok.decode_single_token_bytes(i))
            for i in range(tok.get_vocab_size())
        ],
        "render_conversation": [],
        "render_for_completion": [],
    }
    for conversation, max_tokens in CONVERSATIONS:
        ids, mask = tok.render_conversation(conversation, max_tokens=max_tokens)
        expected["render_conversation"].append(
            {"conversation": conversation, "max_tokens": max_tokens, "ids": ids, "mask": mask}
        )
        if conversation["messages"][-1]["role"] == "assistant":
            expected["render_for_completion"].append(
                {"conversation": conversation, "ids": tok.render_for_completion(conversation)}
            )

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "upstream_tokenizer_corpus.txt.gz"), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
            gz.write(corpus.encode("utf-8"))
    with open(os.path.join(args.out, "upstream_tokenizer.pkl"), "wb") as f:
        f.write(pkl)
    with open(os.path.join(args.out, "upstream_tokenizer_expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    # also check upstream can read back the pickle it wrote (sanity of the fixture itself)
    assert pickle.loads(pkl).n_vocab == VOCAB_SIZE
    print(f"wrote fixtures to {os.path.abspath(args.out)}: corpus {len(corpus):,} chars, pkl {len(pkl):,} bytes")


if __name__ == "__main__":
    main()
