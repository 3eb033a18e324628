"""
Tokenizer benchmark: BPE training time and encode throughput, ours vs upstream nanochat on the same text.

    python bench/bench_tokenizer.py                                  # ours only
    python bench/bench_tokenizer.py --upstream /tmp/upstream         # also upstream's tokenizer.py (by file path)
    python bench/bench_tokenizer.py --max-chars 2000000 --vocab-size 4096 --repeats 5

Text: the offline `sample` corpus (nanochat.sample_corpus: stdlib prose and code), cropped like tok_train
(--doc-cap per document, --max-chars in total). Runs alternate ours/upstream so machine noise hits both alike; the
table shows medians (training) and bests (encoding) of --repeats runs, in wall seconds and in CPU seconds of the
process (all threads): on a shared machine CPU seconds are the steadier number. With --upstream, the learned merges and the encoded ids are also
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


def timed(fn):
    """(result, wall seconds, CPU seconds of this process: all threads, incl. rustbpe's and tiktoken's)."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def encode_like_dataloader(tok, docs: list[str], threads: int, batch_docs: int) -> list[list[int]]:
    """As the pretraining dataloader does: batches of batch_docs documents, BOS prepended, num_threads=threads."""
    bos, rows = tok.get_bos_token_id(), []
    for i in range(0, len(docs), batch_docs):
        rows.extend(tok.encode(docs[i : i + batch_docs], prepend=bos, num_threads=threads))
    return rows


def encode_one_by_one(tok, docs: list[str]) -> int:
    return sum(len(tok.encode(doc)) for doc in docs)


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

    # per implementation: lists of (wall s, cpu s) per repeat
    runs = {name: {"train": [], "batch": [], "single": []} for name in impls}
    toks, rows = {}, {}
    for _ in range(args.repeats):
        for name, cls in impls.items():  # alternate implementations within each repeat
            toks[name], *t = timed(lambda cls=cls: cls.train_from_iterator(iter(docs), args.vocab_size))
            runs[name]["train"].append(t)
            rows[name], *t = timed(lambda n=name: encode_like_dataloader(toks[n], docs, args.threads, args.batch_docs))
            runs[name]["batch"].append(t)
            _, *t = timed(lambda n=name: encode_one_by_one(toks[n], docs))
            runs[name]["single"].append(t)

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
    print(f"{'impl':<10} {'train wall s':>12} {'train cpu s':>12} {'batch MB/s':>11} {'batch MB/cpu-s':>15} "
          f"{'1-by-1 MB/s':>12} {'bytes/token':>12}")  # fmt: skip
    for name in impls:
        r = runs[name]
        tokens = sum(len(row) - 1 for row in rows[name])
        train_wall, train_cpu = (statistics.median(x) for x in zip(*r["train"]))
        batch_wall, batch_cpu = (min(x) for x in zip(*r["batch"]))
        single_wall = min(w for w, _ in r["single"])
        report[name] = {
            "train_wall_s_median": train_wall,
            "train_wall_s_best": min(w for w, _ in r["train"]),
            "train_cpu_s_median": train_cpu,
            "encode_batch_MBps": n_bytes / batch_wall / 1e6,
            "encode_batch_MB_per_cpu_s": n_bytes / batch_cpu / 1e6,
            "encode_batch_Mtokps": tokens / batch_wall / 1e6,
            "encode_single_MBps": n_bytes / single_wall / 1e6,
            "tokens": tokens,
            "bytes_per_token": n_bytes / tokens,
        }
        x = report[name]
        print(f"{name:<10} {train_wall:>12.3f} {train_cpu:>12.3f} {x['encode_batch_MBps']:>11.2f} "
              f"{x['encode_batch_MB_per_cpu_s']:>15.2f} {x['encode_single_MBps']:>12.2f} {x['bytes_per_token']:>12.3f}")  # fmt: skip
    if "upstream" in impls:
        o, u = report["ours"], report["upstream"]
        report["train_wall_speedup_vs_upstream"] = u["train_wall_s_median"] / o["train_wall_s_median"]
        report["encode_batch_speedup_vs_upstream"] = o["encode_batch_MBps"] / u["encode_batch_MBps"]
        report["encode_batch_cpu_efficiency_vs_upstream"] = (
            o["encode_batch_MB_per_cpu_s"] / u["encode_batch_MB_per_cpu_s"]
        )
        print(f"ours vs upstream: training x{report['train_wall_speedup_vs_upstream']:.3f} (median wall), batch "
              f"encode x{report['encode_batch_speedup_vs_upstream']:.3f} wall, "
              f"x{report['encode_batch_cpu_efficiency_vs_upstream']:.3f} per CPU-second (best); "
              f"identical merges and ids: {identical}")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
