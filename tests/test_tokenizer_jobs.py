"""python -m pytest tests/test_tokenizer_jobs.py -q

The tokenizer entry points on real parquet shards in a temporary base dir: `python -m ray_jobs.tok_train` (CLI,
outputs, upstream's max-chars/doc-cap semantics, user errors, an s3:// base dir on a moto server) and
`python -m ray_jobs.tok_eval` (with the GPT-2/GPT-4 downloads unreachable, and with a stand-in baseline).
"""

import gzip
import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import tiktoken
import torch

from nanochat import storage
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes, get_token_bytes, get_tokenizer
from ray_jobs import tok_eval, tok_train
from tests.s3server import S3Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def corpus_docs() -> list[str]:
    with gzip.open(os.path.join(FIXTURES, "upstream_tokenizer_corpus.txt.gz"), "rb") as f:
        return [d for d in f.read().decode("utf-8").split("\n\n") if d.strip()]


def shard_bytes(docs: list[str]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs}), sink, row_group_size=100)
    return sink.getvalue().to_pybytes()


def write_shards(data_dir: str, docs: list[str], n_files: int = 3) -> None:
    """n_files shards in upstream's layout (text column); the last one is the val split."""
    per = len(docs) // n_files
    for i in range(n_files):
        storage.write_bytes(
            storage.join(data_dir, f"shard_{i:05d}.parquet"), shard_bytes(docs[i * per : (i + 1) * per])
        )


@pytest.fixture
def shards(base_dir):
    docs = corpus_docs()
    os.makedirs(base_dir / "base_data_climbmix")
    write_shards(str(base_dir / "base_data_climbmix"), docs)
    return docs


def reference_training_text(docs: list[str], max_chars: int, doc_cap: int) -> list[str]:
    """Upstream's rule, written out: crop each train doc, stop after the doc that crosses max_chars."""
    train_docs = docs[: 2 * (len(docs) // 3)]  # shards 0 and 1; shard 2 is val
    out, n = [], 0
    for d in train_docs:
        out.append(d[:doc_cap])
        n += len(out[-1])
        if n > max_chars:
            break
    return out


# -----------------------------------------------------------------------------
# tok_train


def test_tok_train_cli_writes_upstream_compatible_outputs(shards, base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    env.pop("RAY_ADDRESS", None)
    args = ["--vocab-size", "400", "--max-chars", "40000", "--doc-cap", "300"]
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.tok_train", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ["max_chars: 40,000", "doc_cap: 300", "vocab_size: 400", "Training time: ", "Saved tokenizer encoding to ",
                 "Saved token_bytes to "]:  # fmt: skip
        assert line in out, out
    tok_dir = base_dir / "tokenizer"
    with open(tok_dir / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # plain pickle, as upstream loads it
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 400
    # identical to training directly on the text upstream's tok_train would have read
    expected = RustBPETokenizer.train_from_iterator(iter(reference_training_text(shards, 40000, 300)), 400)
    assert enc._mergeable_ranks == expected.enc._mergeable_ranks
    tok = get_tokenizer()
    token_bytes = get_token_bytes("cpu")
    assert token_bytes.dtype == torch.int32 and torch.equal(token_bytes, compute_token_bytes(tok))
    assert token_bytes[-9:].tolist() == [0] * 9 and int(token_bytes[:256].sum()) == 256


def test_tok_train_max_chars_and_doc_cap(shards, base_dir, capsys):
    summary = tok_train.main(tok_train.TokTrainConfig(max_chars=5000, doc_cap=50, vocab_size=300))
    text = reference_training_text(shards, 5000, 50)
    assert summary["docs"] == len(text) and summary["chars"] == sum(map(len, text))
    assert 5000 < summary["chars"] <= 5000 + 50
    assert summary["vocab_size"] == 300
    assert f"({len(text):,} docs, {summary['chars']:,} chars)" in capsys.readouterr().out


def test_tok_train_no_shards_is_a_clear_error(base_dir, capsys):
    assert tok_train.cli(["--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert "python -m nanochat.dataset" in err and "Traceback" not in err


def test_tok_train_only_val_shard_is_a_clear_error(base_dir, capsys):
    os.makedirs(base_dir / "base_data_climbmix")
    write_shards(str(base_dir / "base_data_climbmix"), corpus_docs()[:50], n_files=1)
    assert tok_train.cli(["--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert "train split" in err and "python -m nanochat.dataset -n 2" in err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--vocab-size", "264"], "--vocab-size"),
        (["--max-chars", "0"], "--max-chars"),
        (["--doc-cap", "-1"], "--doc-cap"),
    ],
)
def test_tok_train_bad_flags(base_dir, capsys, argv, flag):
    assert tok_train.cli(argv) == 2
    assert flag in capsys.readouterr().err


def test_tok_train_small_corpus_warns(base_dir, capsys):
    os.makedirs(base_dir / "base_data_climbmix")
    write_shards(str(base_dir / "base_data_climbmix"), ["abc abc", "abd", "val doc"], n_files=3)
    summary = tok_train.main(tok_train.TokTrainConfig(vocab_size=2000))
    assert summary["vocab_size"] < 2000
    assert "WARNING: the corpus only supported" in capsys.readouterr().out


def test_tok_train_s3_base_dir(monkeypatch):
    docs = corpus_docs()[:600]
    with S3Server() as s3:
        s3.apply_env(monkeypatch)
        base = s3.uri("nanochat")
        monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
        write_shards(base + "/base_data_climbmix", docs)
        summary = tok_train.main(tok_train.TokTrainConfig(vocab_size=300))
        assert summary["tokenizer_path"] == base + "/tokenizer/tokenizer.pkl"
        assert storage.exists(base + "/tokenizer/token_bytes.pt")
        tok = get_tokenizer()
        assert tok.get_vocab_size() == 300 and tok.decode(tok.encode(docs[0])) == docs[0]
        assert torch.equal(get_token_bytes(), compute_token_bytes(tok))


# -----------------------------------------------------------------------------
# tok_eval


def _offline(name):
    raise requests.exceptions.ConnectionError(f"Failed to resolve host for {name} (simulated: no network)")


def test_tok_eval_offline_skips_baselines(shards, base_dir, monkeypatch, capsys):
    tok_train.main(tok_train.TokTrainConfig(vocab_size=400))
    capsys.readouterr()
    monkeypatch.setattr(tiktoken, "get_encoding", _offline)
    report = tok_eval.main()
    out = capsys.readouterr().out
    assert out.count("skipped: encoding not available offline") == 2
    assert set(report["results"]) == {"Ours"} and report["vocab_sizes"] == {"Ours": 400}
    names = list(report["results"]["Ours"])
    assert names == ["news", "korean", "code", "math", "science", "shard-train", "shard-val"]
    train_text = "\n".join(shards[:100])  # first row group of the first train shard
    assert report["results"]["Ours"]["shard-train"]["bytes"] == len(train_text.encode("utf-8"))
    assert "Our tokenizer:" in out and "Comparison with" not in out


def test_tok_eval_compares_with_available_baseline(shards, base_dir, monkeypatch, capsys):
    tok_train.main(tok_train.TokTrainConfig(vocab_size=400))
    with open(os.path.join(FIXTURES, "upstream_tokenizer.pkl"), "rb") as f:
        stand_in = pickle.load(f)  # a real tiktoken Encoding (vocab 512) standing in for the downloadable gpt2
    stand_in_special = tiktoken.Encoding(
        name="stand-in", pat_str=stand_in._pat_str, mergeable_ranks=stand_in._mergeable_ranks,
        special_tokens={"<|endoftext|>": 512},
    )  # fmt: skip
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in_special if name == "gpt2" else _offline(name))
    report = tok_eval.main()
    out = capsys.readouterr().out
    assert out.count("skipped: encoding not available offline") == 1
    assert report["vocab_sizes"] == {"Ours": 400, "GPT-2": 513}
    assert "Comparison with GPT-2:" in out and "Comparison with GPT-4:" not in out
    ours, base = report["results"]["Ours"]["news"], report["results"]["GPT-2"]["news"]
    assert ours["bytes"] == base["bytes"] and ours["tokens"] != base["tokens"]


def test_tok_eval_without_tokenizer(base_dir, capsys):
    assert tok_eval.cli() == 2
    assert "python -m ray_jobs.tok_train" in capsys.readouterr().err
