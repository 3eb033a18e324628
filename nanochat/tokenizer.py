"""
GPT-4 style byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

The trained vocabulary is 256 byte tokens + merges, followed by the 9 chat special tokens (so they take the last 9
ids). The whole tokenizer is one pickled `tiktoken.Encoding` in `<base>/tokenizer/tokenizer.pkl`, the same file format
upstream nanochat writes, so tokenizers move freely between the two. `token_bytes.pt` (bytes per token, for
bits-per-byte) sits next to it. Both are written by `python -m ray_jobs.tok_train`.

    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    ids = tok.encode("hello world", prepend=tok.get_bos_token_id())
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]})
"""

import copy
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import tiktoken

from nanochat.common import NanochatError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the dataloader packs rows so each begins with one
    # the rest only appear when rendering chat conversations (SFT, RL, chat)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool (calculator)
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, inserted at inference time, never supervised
    "<|output_end|>",
]

# GPT-4's cl100k split regex, except numbers split into chunks of at most 2 digits (not 3): with a 32K vocab that
# spends fewer merges on numbers. Possessive quantifiers (?+, ++) need fancy-regex / Python >= 3.11 `re`.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_PKL = "tokenizer.pkl"
TOKEN_BYTES_PT = "token_bytes.pt"
TRAIN_COMMAND = "python -m ray_jobs.tok_train"


# -----------------------------------------------------------------------------
# Small file helpers: a tokenizer dir is a local path or an s3:// URI (then nanochat.storage does the I/O).


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if _is_remote(base) else os.path.join(base, name)


def _exists(path: str) -> bool:
    if _is_remote(path):
        from nanochat import storage

        return storage.exists(path)
    return os.path.exists(path)


def _read_bytes(path: str) -> bytes:
    if _is_remote(path):
        from nanochat import storage

        return storage.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def _write_bytes(path: str, data: bytes) -> None:
    """Atomic write: readers never see a half-written tokenizer (tmp file + rename locally, one PUT on S3)."""
    if _is_remote(path):
        from nanochat import storage

        storage.write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Batch encoding on a persistent thread pool. tiktoken's encode_ordinary_batch builds and tears down a new
# ThreadPoolExecutor on every call and submits one future per text; the dataloader calls it for every batch of
# ~128 documents, so that overhead (new OS threads, cold per-thread regex state) dominated: on 2 cores it was
# slower than a plain loop. Here the pool lives as long as the process and each future encodes a contiguous chunk.

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_CHUNKS_PER_THREAD = 2  # >1 evens out documents of very different lengths; fewer futures cost less CPU


def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(num_threads)
        if pool is None:
            pool = _POOLS[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="nanochat-tok")
        return pool


def _forget_pools_after_fork() -> None:
    # a forked child inherits the dict but not the threads; it builds its own pools on first use
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _encode_ordinary_batch(enc: tiktoken.Encoding, texts: list[str], num_threads: int) -> list[list[int]]:
    if num_threads <= 1 or len(texts) <= 1:
        return [enc.encode_ordinary(t) for t in texts]
    chunk = -(-len(texts) // (num_threads * _CHUNKS_PER_THREAD))  # ceil division
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    rows: list[list[int]] = []
    for encoded in _thread_pool(num_threads).map(lambda part: [enc.encode_ordinary(t) for t in part], chunks):
        rows.extend(encoded)
    return rows


# -----------------------------------------------------------------------------
# The tokenizer


class RustBPETokenizer:
    """A tiktoken Encoding plus the chat rendering nanochat needs; `train_from_iterator` builds one with rustbpe."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self._special_ids: dict[str, int] = {}  # encode_special cache, per instance
        self.bos_token_id = self.encode_special(bos_token)

    # --- construction ---------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int) -> "RustBPETokenizer":
        """Learn vocab_size - 9 BPE tokens from an iterator of strings; the 9 specials take the last ids."""
        n_bpe = vocab_size - len(SPECIAL_TOKENS)
        if n_bpe < 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {len(SPECIAL_TOKENS)} special "
                f"tokens, so at least {256 + len(SPECIAL_TOKENS)}"
            )
        import rustbpe  # only training needs it (GPU machines without it can still load a trained tokenizer)

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_bpe, pattern=SPLIT_PATTERN)
        # rank == token id; bytes 0..255 come first, then the merges in the order they were learned
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        enc = cls._make_encoding(trainer.get_pattern(), mergeable_ranks)
        return cls(enc, "<|bos|>")

    @staticmethod
    def _make_encoding(pattern: str, mergeable_ranks: dict[bytes, int]) -> tiktoken.Encoding:
        # Same name and fields as upstream's encoding, so the pickles are interchangeable.
        first_special = len(mergeable_ranks)
        return tiktoken.Encoding(
            name="rustbpe",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens={name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)},
        )

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> "RustBPETokenizer":
        path = _join(tokenizer_dir, TOKENIZER_PKL)
        if not _exists(path):
            raise NanochatError(f"No tokenizer at {path}. Train one first: {TRAIN_COMMAND}")
        enc = pickle.loads(_read_bytes(path))
        if not isinstance(enc, tiktoken.Encoding):
            raise NanochatError(
                f"{path} holds a {type(enc).__name__}, not a tiktoken.Encoding. Retrain: {TRAIN_COMMAND}"
            )
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> "RustBPETokenizer":
        """Wrap one of tiktoken's named encodings ("gpt2", "cl100k_base"); needs tiktoken's cache or the network."""
        enc = tiktoken.get_encoding(tiktoken_name)
        # OpenAI's encodings call their document delimiter <|endoftext|>; nanochat uses it as BOS.
        return cls(enc, "<|endoftext|>")

    def save(self, tokenizer_dir: str) -> str:
        path = _join(tokenizer_dir, TOKENIZER_PKL)
        _write_bytes(path, pickle.dumps(self.enc))
        print(f"Saved tokenizer encoding to {path}")
        return path

    # --- vocabulary -----------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    def id_to_token(self, id: int) -> str:
        return self.enc.decode([id])

    def encode_special(self, text: str) -> int:
        token_id = self._special_ids.get(text)
        if token_id is None:
            token_id = self._special_ids[text] = self.enc.encode_single_token(text)
        return token_id

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    # --- encode / decode ------------------------------------------------------

    def _as_id(self, token) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int], or list[str] -> list[list[int]] (encoded on num_threads threads).

        Special-token strings inside text are encoded as plain text. prepend/append take a token id or a
        special-token string and are added to every row.
        """
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return head + ids + tail if (head or tail) else ids
        if isinstance(text, list):
            rows = _encode_ordinary_batch(self.enc, text, num_threads)
            if head or tail:
                rows = [head + row + tail for row in rows]
            return rows
        raise ValueError(f"encode() takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids) -> str:
        return self.enc.decode(ids)

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    # --- chat rendering -------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Tokenize one chat conversation for SFT.

        Returns (ids, mask), equal lengths, truncated to max_tokens; mask is 1 on the tokens the assistant is
        trained to produce (its text, its python tool calls with their delimiters, and <|assistant_end|>).
        A leading system message is folded into the first user message.
        """
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = copy.deepcopy(messages[1])  # never mutate the caller's conversation
            merged["content"] = messages[0]["content"] + "\n\n" + merged["content"]
            messages = [merged] + list(messages[2:])
        if not messages:
            raise ValueError("conversation has no messages")

        sp = self.encode_special
        ids: list[int] = [self.get_bos_token_id()]
        mask: list[int] = [0]

        def add(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        for i, message in enumerate(messages):
            expected_role = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected_role:
                raise ValueError(f"message {i} is from {message['role']!r} but should be from {expected_role!r}")
            content = message["content"]
            if expected_role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} content must be a str, got {type(content).__name__}")
                add([sp("<|user_start|>")] + self.encode(content) + [sp("<|user_end|>")], 0)
                continue
            add([sp("<|assistant_start|>")], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        add(self.encode(part["text"]), 1)
                    elif kind == "python":
                        add([sp("<|python_start|>")] + self.encode(part["text"]) + [sp("<|python_end|>")], 1)
                    elif kind == "python_output":
                        # produced by the interpreter at inference time, so never a training target
                        add([sp("<|output_start|>")] + self.encode(part["text"]) + [sp("<|output_end|>")], 0)
                    else:
                        raise ValueError(f"unknown assistant content part type: {kind!r}")
            else:
                raise ValueError(f"assistant message {i} content must be a str or a list of parts")
            add([sp("<|assistant_end|>")], 1)

        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Ids of the conversation minus its final assistant reply, ending in <|assistant_start|> (RL / eval)."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be from the assistant (it is the one being completed)")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids: list[int], mask: list[int], with_token_id: bool = False) -> str:
        """Tokens joined by '|', green when supervised (mask 1), red otherwise; optionally each id in gray."""
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        out = []
        for token_id, m in zip(ids, mask):
            out.append(f"{green if m == 1 else red}{self.decode([token_id])}{reset}")
            if with_token_id:
                out.append(f"{gray}({token_id}){reset}")
        return "|".join(out)


# -----------------------------------------------------------------------------
# nanochat conveniences: the tokenizer under the base dir


def get_tokenizer_dir() -> str:
    return _join(get_base_dir(), "tokenizer")


def get_tokenizer() -> RustBPETokenizer:
    return RustBPETokenizer.from_directory(get_tokenizer_dir())


def compute_token_bytes(tokenizer: RustBPETokenizer):
    """int32 tensor (vocab_size,): raw byte length of every token, 0 for special tokens (the bits-per-byte weights).

    Lengths come from the raw token bytes: decoding to str first would turn partial UTF-8 sequences into U+FFFD
    (3 bytes) and miscount them.
    """
    import torch

    special_ids = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    lengths = [
        0 if token_id in special_ids else len(tokenizer.decode_single_token_bytes(token_id))
        for token_id in range(tokenizer.get_vocab_size())
    ]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(token_bytes, tokenizer_dir: str) -> str:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(token_bytes, buf)
    path = _join(tokenizer_dir, TOKEN_BYTES_PT)
    _write_bytes(path, buf.getvalue())
    print(f"Saved token_bytes to {path}")
    return path


def get_token_bytes(device="cpu"):
    """int32 tensor (vocab_size,): UTF-8 byte length of every token, 0 for special tokens."""
    import io

    import torch

    path = _join(get_tokenizer_dir(), TOKEN_BYTES_PT)
    if not _exists(path):
        raise NanochatError(f"No token bytes at {path}. They are written with the tokenizer: {TRAIN_COMMAND}")
    return torch.load(io.BytesIO(_read_bytes(path)), map_location=device)
