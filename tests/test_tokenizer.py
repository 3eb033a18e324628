"""python -m pytest tests/test_tokenizer.py -q

The tokenizer library: equivalence with upstream nanochat (golden fixtures from dev/make_upstream_fixtures_tokenizer.py:
same learned merges, same ids, same chat rendering, interchangeable tokenizer.pkl), plus behaviour and error checks.
"""

import gzip
import hashlib
import json
import os
import pickle

import pytest
import tiktoken
import torch

from nanochat.common import NanochatError
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    RustBPETokenizer,
    compute_token_bytes,
    get_token_bytes,
    get_tokenizer,
    save_token_bytes,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURES, "upstream_tokenizer_expected.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def upstream_enc() -> tiktoken.Encoding:
    with open(os.path.join(FIXTURES, "upstream_tokenizer.pkl"), "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def tok(expected) -> RustBPETokenizer:
    """OUR tokenizer, trained on the exact corpus upstream was trained on for the fixtures."""
    with gzip.open(os.path.join(FIXTURES, "upstream_tokenizer_corpus.txt.gz"), "rb") as f:
        corpus = f.read().decode("utf-8")
    assert hashlib.sha256(corpus.encode("utf-8")).hexdigest() == expected["corpus_sha256"]
    docs = corpus.split("\n\n")  # same document split as the fixture generator
    return RustBPETokenizer.train_from_iterator(iter(docs), expected["vocab_size"])


# -----------------------------------------------------------------------------
# Equivalence with upstream


def test_trained_encoding_equals_upstream(tok, upstream_enc, expected):
    ours = tok.enc
    assert ours.name == upstream_enc.name == "rustbpe"
    assert ours._pat_str == upstream_enc._pat_str == SPLIT_PATTERN
    assert ours._mergeable_ranks == upstream_enc._mergeable_ranks
    assert ours._special_tokens == upstream_enc._special_tokens == expected["special_ids"]
    assert ours.n_vocab == expected["vocab_size"] == 512
    # specials are the last 9 ids, in upstream's order
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(512 - 9, 512))
    assert tok.get_bos_token_id() == expected["bos_token_id"] == 512 - 9


def test_encode_matches_upstream(tok, expected):
    for case in expected["encode"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok(case["text"]) == case["ids"]
        assert tok.decode(case["ids"]) == case["text"]


def test_batch_encode_prepend_append_matches_upstream(tok, expected):
    texts = [case["text"] for case in expected["encode"]]
    user_end = tok.encode_special("<|user_end|>")
    for num_threads in (1, 4):
        rows = tok.encode(texts, prepend="<|bos|>", append=user_end, num_threads=num_threads)
        assert rows == expected["encode_batch_prepend_append"]
    # a single string with an int prepend and a string append gives the same row
    assert tok.encode(texts[2], prepend=tok.get_bos_token_id(), append="<|user_end|>") == rows[2]


def test_id_to_token_and_token_bytes_match_upstream(tok, expected):
    assert [tok.id_to_token(i) for i in range(256, 300)] == expected["id_to_token"]
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (512,)
    assert token_bytes.tolist() == expected["token_bytes"]
    # raw bytes 0x80..0xff are 1 byte each (decoding them to str first would count 3 for U+FFFD)
    assert token_bytes[0x80:0x100].tolist() == [1] * 128


def test_render_conversation_matches_upstream(tok, expected):
    for case in expected["render_conversation"]:
        ids, mask = tok.render_conversation(case["conversation"], max_tokens=case["max_tokens"])
        assert ids == case["ids"]
        assert mask == case["mask"]


def test_render_for_completion_matches_upstream(tok, expected):
    assert len(expected["render_for_completion"]) >= 4
    for case in expected["render_for_completion"]:
        assert tok.render_for_completion(case["conversation"]) == case["ids"]


def test_our_pickle_is_upstreams_format(tok, upstream_enc, tmp_path):
    tok.save(str(tmp_path))
    with open(tmp_path / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # what upstream's from_directory does
    assert isinstance(enc, tiktoken.Encoding)
    assert (enc.name, enc._pat_str, enc._mergeable_ranks, enc._special_tokens) == (
        upstream_enc.name,
        upstream_enc._pat_str,
        upstream_enc._mergeable_ranks,
        upstream_enc._special_tokens,
    )
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file behind


def test_loads_upstream_pickle(tmp_path, expected):
    (tmp_path / "tokenizer.pkl").write_bytes(open(os.path.join(FIXTURES, "upstream_tokenizer.pkl"), "rb").read())
    up = RustBPETokenizer.from_directory(str(tmp_path))
    assert up.get_vocab_size() == 512
    for case in expected["encode"]:
        assert up.encode(case["text"]) == case["ids"]
    case = expected["render_conversation"][3]
    assert up.render_conversation(case["conversation"]) == (case["ids"], case["mask"])


# -----------------------------------------------------------------------------
# Behaviour


def test_roundtrip_and_specials_are_plain_text(tok):
    for text in ["hello world", "naïve café 你好 🙂", "unseen tokens: zqxjkv", "\r\n\t  x", "a" * 5000]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1 and tok.get_bos_token_id() not in ids
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert len({tok.encode_special(s) for s in SPECIAL_TOKENS}) == 9
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"


def test_encode_rejects_other_types(tok):
    with pytest.raises(ValueError, match="str or a list of str"):
        tok.encode(("a", "b"))


def test_render_masks_supervise_only_assistant(tok):
    conversation = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "later"},
        ]
    }
    ids, mask = tok.render_conversation(conversation)
    sp = tok.encode_special
    assert ids == (
        [sp("<|bos|>"), sp("<|user_start|>")]
        + tok.encode("hi")
        + [sp("<|user_end|>"), sp("<|assistant_start|>")]
        + tok.encode("hello!")
        + [sp("<|assistant_end|>"), sp("<|user_start|>")]
        + tok.encode("bye")
        + [sp("<|user_end|>"), sp("<|assistant_start|>")]
        + tok.encode("later")
        + [sp("<|assistant_end|>")]
    )
    supervised = [i for i, m in zip(ids, mask) if m == 1]
    assert supervised == tok.encode("hello!") + [sp("<|assistant_end|>")] + tok.encode("later") + [
        sp("<|assistant_end|>")
    ]


def test_system_message_merged_without_mutating_input(tok):
    with_system = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    snapshot = json.dumps(with_system)
    merged = {"messages": [{"role": "user", "content": "be brief\n\nhi"}, {"role": "assistant", "content": "yo"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert json.dumps(with_system) == snapshot
    tok.render_for_completion(with_system)
    assert json.dumps(with_system) == snapshot


def test_tool_parts_masks(tok):
    conversation = {
        "messages": [
            {"role": "user", "content": "add"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "sure"},
                    {"type": "python", "text": "1+1"},
                    {"type": "python_output", "text": "2"},
                    {"type": "text", "text": "it is 2"},
                ],
            },
        ]
    }
    ids, mask = tok.render_conversation(conversation)
    sp = tok.encode_special
    ps, pe = ids.index(sp("<|python_start|>")), ids.index(sp("<|python_end|>"))
    os_, oe = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    assert ps < pe < os_ < oe
    assert all(m == 1 for m in mask[ps : pe + 1])
    assert all(m == 0 for m in mask[os_ : oe + 1])
    assert ids[os_ + 1 : oe] == tok.encode("2")
    assert mask[-1] == 1 and ids[-1] == sp("<|assistant_end|>")


def test_truncation_and_completion(tok):
    conversation = {
        "messages": [
            {"role": "user", "content": "hello " * 100},
            {"role": "assistant", "content": "this gets stripped"},
        ]
    }
    ids, mask = tok.render_conversation(conversation, max_tokens=32)
    assert len(ids) == len(mask) == 32
    full_ids, _ = tok.render_conversation(conversation)
    assert ids == full_ids[:32]
    prompt = tok.render_for_completion(conversation)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert prompt[:-1] == full_ids[: len(prompt) - 1]
    assert tok.decode(prompt).count("this gets stripped") == 0


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "assistant", "content": "x"}], "should be from 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "should be from 'assistant'"),
        ([{"role": "user", "content": ["a"]}], "must be a str"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
            "unknown assistant content part type",
        ),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "str or a list of parts"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user message"),
        ([], "no messages"),
    ],
)
def test_bad_conversations_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_assistant_last(tok):
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    out = tok.visualize_tokenization(ids, mask, with_token_id=True)
    assert out.count("|") >= 2 * len(ids) - 1
    assert "\033[92m" in out and "\033[91m" in out and f"({tok.get_bos_token_id()})" in out


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), 264)
    assert RustBPETokenizer.train_from_iterator(iter(["abc abc"]), 265).get_vocab_size() == 265


# -----------------------------------------------------------------------------
# Files under the base dir


def test_missing_tokenizer_names_the_command(base_dir):
    with pytest.raises(NanochatError, match=r"python -m ray_jobs\.tok_train"):
        get_tokenizer()
    with pytest.raises(NanochatError, match=r"python -m ray_jobs\.tok_train"):
        get_token_bytes()


def test_corrupt_tokenizer_file_is_reported(base_dir):
    (base_dir / "tokenizer").mkdir()
    (base_dir / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(NanochatError, match="not a tiktoken.Encoding"):
        get_tokenizer()


def test_get_tokenizer_and_token_bytes_from_base_dir(tok, base_dir):
    tok.save(str(base_dir / "tokenizer"))
    save_token_bytes(compute_token_bytes(tok), str(base_dir / "tokenizer"))
    loaded = get_tokenizer()
    assert loaded.enc._mergeable_ranks == tok.enc._mergeable_ranks
    token_bytes = get_token_bytes("cpu")
    assert token_bytes.dtype == torch.int32 and torch.equal(token_bytes, compute_token_bytes(tok))


def test_batch_encode_many_texts_keeps_order(tok):
    texts = [f"doc {i}: " + "naïve café 你好 " * (i % 7) + str(i * 7919) for i in range(301)]
    expected_rows = [tok.encode(t) for t in texts]
    for num_threads in (1, 2, 3, 8):
        assert tok.encode(texts, num_threads=num_threads) == expected_rows
    assert tok.encode([]) == []
    assert tok.encode([""], prepend="<|bos|>") == [[tok.get_bos_token_id()]]


def _encode_in_child(tok, texts, queue):
    queue.put(tok.encode(texts, num_threads=2))


def test_batch_encode_after_fork(tok):
    # the persistent encode pool must not be inherited half-alive by a forked child (e.g. a DataLoader worker)
    import multiprocessing

    texts = ["hello world", "second document", "third"] * 10
    tok.encode(texts, num_threads=2)  # make sure the parent's pool exists before forking
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(tok, texts, queue))
    child.start()
    rows = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert rows == tok.encode(texts)
