"""
Pretraining input benchmark: packed tokens/s and first-batch latency of the Ray Data pipeline (1 and 2 tokenizer
actors) vs the single-process loader, with the same tokenizer on the same shards.

    python bench/bench_data.py                          # sample-corpus shards (x8) in a temp dir, a fresh 4k tokenizer
    python bench/bench_data.py --data-dir ~/.cache/nanochat/base_data_climbmix --tokenizer-dir ~/.cache/nanochat/tokenizer
    python bench/bench_data.py -B 16 -T 512 --batches 600 --copies 8 --cpus 4

Rows:
  tokenize only      tokenizer.encode(batch, prepend=BOS, num_threads=1) over the documents the loaders consume
                     (no reading, no packing): the single-process tokenization ceiling;
  plain loader       nanochat.dataloader, one process, tokenizer_threads=1: read + tokenize + best-fit pack;
  ray, N actor(s)    ray_jobs.data_pipeline.make_batch_iterator with N RowGroupTokenizer actors (1 CPU each).
"tok/s" counts packed tokens (B*T per batch, what training consumes) over the second half of the batches: the
steady state, after what Ray prefetched while the first batch was awaited has been drained; "e2e tok/s" covers all
batches including start-up; "first batch s" is the time from creating the iterator to the first batch (for Ray: pipeline start,
actor start, first row group). On a small shared machine these are noisy; compare rows of one run. The last line is
a JSON object with every number.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanochat import dataset  # noqa: E402
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit  # noqa: E402


def get_tokenizer(args, data_dir):
    from nanochat.tokenizer import RustBPETokenizer

    if args.tokenizer_dir:
        return RustBPETokenizer.from_directory(args.tokenizer_dir), 0.0
    texts, total = [], 0
    for batch in dataset.parquets_iter_batched("train", data_dir=data_dir):
        for t in batch:
            texts.append(t[:10_000])
            total += len(texts[-1])
        if total > 1_000_000:
            break
    t0 = time.perf_counter()
    tok = RustBPETokenizer.train_from_iterator(iter(texts), args.vocab_size)
    return tok, time.perf_counter() - t0


def measure(make_iter, B, T, batches):
    t0 = time.perf_counter()
    it = make_iter()
    next(it)
    first = time.perf_counter() - t0
    half = batches // 2
    for _ in range(half - 1):
        next(it)
    t1 = time.perf_counter()
    for _ in range(batches - half):
        next(it)
    end = time.perf_counter()
    it.close()
    return {"first_batch_s": first, "tok_per_s": (batches - half) * B * T / (end - t1),
            "e2e_tok_per_s": batches * B * T / (end - t0), "total_s": end - t0}


def replicate_shards(src_dir, dst_dir, copies):
    """Train shards repeated `copies` times under new names (then the val shard last): a long enough epoch that
    start-up work (Ray prefetching while the first batch is awaited) does not dominate the measurement."""
    os.makedirs(dst_dir)
    paths = dataset.list_parquet_files(src_dir)
    k = 0
    for _ in range(copies):
        for p in paths[:-1]:
            os.symlink(p, os.path.join(dst_dir, dataset.index_to_filename(k)))
            k += 1
    os.symlink(paths[-1], os.path.join(dst_dir, dataset.index_to_filename(k)))


def tokenize_only(tokenizer, data_dir, batches, B, T, tokenizer_batch_size=128):
    """Encode, one thread, the documents a plain loader reads for `batches` batches (found from its last state)."""
    it = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, "train", tokenizer_threads=1,
                                                                   device="cpu", data_dir=data_dir)
    for _ in range(batches):
        _, _, state = next(it)
    it.close()
    texts = []
    for pq_idx, path in enumerate(dataset.list_parquet_files(data_dir)[:-1]):
        pf = dataset.open_parquet(path)
        for rg in range(pf.num_row_groups):
            if (pq_idx, rg) > (state["pq_idx"], state["rg_idx"]):
                break
            docs = dataset.read_texts(pf, rg, path)
            texts += docs if (pq_idx, rg) < (state["pq_idx"], state["rg_idx"]) else docs[:state["doc_idx"]]
    bos = tokenizer.get_bos_token_id()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), tokenizer_batch_size):
        n += sum(len(t) for t in tokenizer.encode(texts[i:i + tokenizer_batch_size], prepend=bos, num_threads=1))
    dt = time.perf_counter() - t0
    return {"docs": len(texts), "doc_tokens": n, "tok_per_s": n / dt, "seconds": dt}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--data-dir", default=None, help="shards to read (default: sample corpus in a temp dir)")
    parser.add_argument("--tokenizer-dir", default=None, help="trained tokenizer (default: train a fresh one)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("-B", type=int, default=16)
    parser.add_argument("-T", type=int, default=512)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--copies", type=int, default=8, help="sample corpus: repeat the train shards this often")
    parser.add_argument("--cpus", type=int, default=4, help="ray.init(num_cpus=...)")
    parser.add_argument("--actors", default="1,2", help="tokenizer actor counts to try")
    args = parser.parse_args()

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = os.path.join(tmp.name, "base_data_climbmix")
        dataset.download("sample", data_dir=data_dir + "_once", progress=False)
        replicate_shards(data_dir + "_once", data_dir, args.copies)
    tokenizer, train_s = get_tokenizer(args, data_dir)
    B, T, n = args.B, args.T, args.batches
    print(f"shards: {data_dir}; tokenizer vocab {tokenizer.get_vocab_size()} (trained in {train_s:.1f} s); "
          f"B={B} T={T}, {n} batches per row")

    results = {"tokenize_only": tokenize_only(tokenizer, data_dir, n, B, T)}
    results["plain_loader"] = measure(lambda: tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, "train", tokenizer_threads=1, device="cpu", data_dir=data_dir), B, T, n)

    import ray

    from ray_jobs.data_pipeline import make_batch_iterator

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for a in [int(x) for x in args.actors.split(",")]:
            results[f"ray_{a}_actors"] = measure(lambda a=a: make_batch_iterator(
                tokenizer, B, T, "train", device="cpu", num_tokenizer_actors=a, rank=0, world_size=1,
                data_dir=data_dir), B, T, n)
    finally:
        ray.shutdown()

    base = results["plain_loader"]["tok_per_s"]
    print(f"{'pipeline':<18} {'tok/s':>12} {'vs plain':>9} {'e2e tok/s':>12} {'first batch s':>14}")
    for name, r in results.items():
        first = f"{r['first_batch_s']:>14.2f}" if "first_batch_s" in r else f"{'-':>14}"
        e2e = f"{r['e2e_tok_per_s']:>12,.0f}" if "e2e_tok_per_s" in r else f"{'-':>12}"
        print(f"{name:<18} {r['tok_per_s']:>12,.0f} {r['tok_per_s'] / base:>9.2f} {e2e} {first}")
    print("(tokenize_only counts document tokens; the loaders count packed B*T tokens; e2e includes the first batch)")
    report = {"B": B, "T": T, "batches": n, "vocab_size": tokenizer.get_vocab_size(), "cpus": os.cpu_count(),
              "ray_num_cpus": args.cpus, "tokenizer_train_s": train_s, **results}
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
