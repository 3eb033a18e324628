"""
Tokenizer benchmark: BPE training time and encode throughput, ours vs upstream nanochat on the same text.

    python bench/bench_tokenizer.py                                  # ours only
    python bench/bench_tokenizer.py --upstream /tmp/upstream         # also upstream's tokenizer.py (by file path)
    python bench/bench_tokenizer.py --max-chars 2000000 --vocab-size 4096 --repeats 5

Text: the offline `sample` corpus (nanochat.sample_corpus: stdlib prose and code), cropped like tok_train
(--doc-cap per document, --max-chars in total). Runs alternate ours/upstream so machine noise hits both alike; the
table shows the best and median of --repeats runs. With --upstream, the learned merges and the encoded ids are also
checked to be identical. The last line is a JSON object with every number.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanochat.sample_corpus import build_documents  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402


def load_corpus(max_chars: int, doc_cap: int) -> list[str]:
    docs, total = [], 0
    for doc in build_documents():
        docs.append(doc[:doc_cap])
        total += len(docs[-1])
        if total > max_chars:
            break
    return docs


def load_upstream(root: str):
    path = os.path.join(root, "nanochat", "tokenizer.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--upstream: {path} not found (pass the root of an upstream nanochat checkout)")
    spec = importlib.util.spec_from_file_location("upstream_nanochat_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RustBPETokenizer


def time_train(cls, docs: list[str], vocab_size: int):
    t0 = time.perf_counter()
    tok = cls.train_from_iterator(iter(docs), vocab_size)
    return time.perf_counter() - t0, tok


def time_encode(tok, docs: list[str], threads: int, batch_docs: int) -> dict:
    """Seconds to encode all docs: as the pretraining dataloader does (batches of batch_docs documents, BOS
    prepended, num_threads=threads), and one document at a time."""
    bos = tok.get_bos_token_id()
    t0 = time.perf_counter()
    rows = []
    for i in range(0, len(docs), batch_docs):
        rows.extend(tok.encode(docs[i : i + batch_docs], prepend=bos, num_threads=threads))
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for doc in docs:
        tok.encode(doc)
    t_single = time.perf_counter() - t0
    return {"batch_s": t_batch, "single_s": t_single, "tokens": sum(len(r) - 1 for r in rows), "rows": rows}


def summarize(values: list[float]) -> dict:
    return {"best": min(values), "median": statistics.median(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark tokenizer training and encoding")
    parser.add_argument("--upstream", default=None, help="root of an upstream nanochat checkout to compare with")
    parser.add_argument("--max-chars", type=int, default=6_000_000, help="training/encoding text size")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=4, help="num_threads for batch encode (dataloader: 4)")
    parser.add_argument("--batch-docs", type=int, default=128, help="documents per encode call (dataloader: 128)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = load_corpus(args.max_chars, args.doc_cap)
    n_chars = sum(map(len, docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    impls = {"ours": RustBPETokenizer}
    if args.upstream:
        impls["upstream"] = load_upstream(args.upstream)

    train_s = {name: [] for name in impls}
    batch_s = {name: [] for name in impls}
    single_s = {name: [] for name in impls}
    toks, tokens, rows = {}, {}, {}
    for _ in range(args.repeats):
        for name, cls in impls.items():  # alternate implementations within each repeat
            t, toks[name] = time_train(cls, docs, args.vocab_size)
            train_s[name].append(t)
            enc = time_encode(toks[name], docs, args.threads, args.batch_docs)
            batch_s[name].append(enc["batch_s"])
            single_s[name].append(enc["single_s"])
            tokens[name], rows[name] = enc["tokens"], enc["rows"]

    identical = None
    if "upstream" in impls:
        identical = (
            toks["ours"].enc._mergeable_ranks == toks["upstream"].enc._mergeable_ranks
            and rows["ours"] == rows["upstream"]
        )

    report = {
        "bench": "tokenizer",
        "docs": len(docs),
        "chars": n_chars,
        "bytes": n_bytes,
        "vocab_size": args.vocab_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "batch_docs": args.batch_docs,
        "cpu_count": os.cpu_count(),
        "identical_to_upstream": identical,
    }
    print(f"corpus: {len(docs):,} docs, {n_chars:,} chars, {n_bytes:,} bytes; vocab {args.vocab_size:,}; "
          f"{args.repeats} repeats; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'impl':<10} {'train best s':>13} {'train med s':>12} {'batch enc MB/s':>15} {'batch Mtok/s':>13} "
          f"{'single enc MB/s':>16} {'bytes/token':>12}")  # fmt: skip
    for name in impls:
        tr, bt, sg = summarize(train_s[name]), summarize(batch_s[name]), summarize(single_s[name])
        report[name] = {
            "train_s_best": tr["best"],
            "train_s_median": tr["median"],
            "encode_batch_MBps": n_bytes / bt["best"] / 1e6,
            "encode_batch_Mtokps": tokens[name] / bt["best"] / 1e6,
            "encode_single_MBps": n_bytes / sg["best"] / 1e6,
            "tokens": tokens[name],
            "bytes_per_token": n_bytes / tokens[name],
        }
        r = report[name]
        print(f"{name:<10} {r['train_s_best']:>13.3f} {r['train_s_median']:>12.3f} {r['encode_batch_MBps']:>15.2f} "
              f"{r['encode_batch_Mtokps']:>13.3f} {r['encode_single_MBps']:>16.2f} {r['bytes_per_token']:>12.3f}")  # fmt: skip
    if "upstream" in impls:
        o, u = report["ours"], report["upstream"]
        report["train_speedup_vs_upstream"] = u["train_s_median"] / o["train_s_median"]
        report["encode_batch_speedup_vs_upstream"] = o["encode_batch_MBps"] / u["encode_batch_MBps"]
        print(f"ours vs upstream: training x{report['train_speedup_vs_upstream']:.3f} (median), batch encode "
              f"x{report['encode_batch_speedup_vs_upstream']:.3f} (best); identical merges and ids: {identical}")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
