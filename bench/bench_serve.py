"""
Serving benchmark: the chat app on a local Ray cluster, one CPU engine replica, streaming requests over HTTP.

    python bench/bench_serve.py                                  # tiny random d4 checkpoint, concurrency 1,4,8,16
    python bench/bench_serve.py --upstream /tmp/upstream         # + upstream nanochat's Engine on the same weights
    python bench/bench_serve.py --base-dir $NANOCHAT_BASE_DIR -i sft   # a real checkpoint instead

Per concurrency level C, C client threads each send streaming /v1/chat/completions requests (fixed max_tokens,
temperature 0.8, top-k 50, a seed per request) until --requests-per-level have finished. Reported:
aggregate tokens/s (all completion tokens / wall time of the level), the same per CPU-second of the engine replica
(robust on a shared machine: the replica has one thread), time to first token p50/p99, and per-token latency
p50/p99 (each request's (last - first token time) / (tokens - 1)). The headline ratios: aggregate tokens/s at 8
concurrent streams over 1 stream (target >= 2.5x), and one stream over HTTP vs upstream's Engine in-process on the
same checkpoint (1 thread, target >= 1x; wall and per CPU-second). Prints a table, then one JSON object as the last
line.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = [{"role": "user", "content": "hello world, how are you today? tell me about the model and the numbers."}]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def one_request(url, seed, max_tokens):
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 50,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    assert tokens and times, "empty reply"
    tpot = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else float("nan")
    return {"ttft": times[0] - t0, "tpot": tpot, "tokens": tokens}


def engine_cpu(url):
    return requests.get(url + "/stats", timeout=30).json()["engine"]["process_cpu_s"]


def run_level(url, concurrency, n_requests, max_tokens):
    cpu0, t0 = engine_cpu(url), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, 1000 + i, max_tokens), range(n_requests)))
    wall, cpu = time.perf_counter() - t0, engine_cpu(url) - cpu0
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": n_requests, "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "agg_tok_per_cpu_s": tokens / cpu,
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in results], 50),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in results], 99),
            "tpot_p50_ms": 1e3 * pct([r["tpot"] for r in results], 50),
            "tpot_p99_ms": 1e3 * pct([r["tpot"] for r in results], 99)}


UPSTREAM_WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
model, tok, _ = load_model(sys.argv[2], torch.device("cpu"), phase="eval")
engine = Engine(model, tok)
prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>")] + tok.encode(sys.argv[3]) + \
         [tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
best = None
for r in range(int(sys.argv[5])):
    t, c = time.perf_counter(), time.process_time()
    n = sum(1 for _ in engine.generate(prompt, num_samples=1, max_tokens=int(sys.argv[4]), temperature=0.8,
                                       top_k=50, seed=r))
    res = {"tok_s": n / (time.perf_counter() - t), "tok_per_cpu_s": n / (time.process_time() - c), "tokens": n}
    if best is None or res["tok_s"] > best["tok_s"]:
        best = res
print(json.dumps(best))
"""


def run_upstream(path, base_dir, source, max_tokens, rounds):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", UPSTREAM_WORKER, os.path.abspath(path), source,
                          PROMPT[0]["content"], str(max_tokens), str(rounds)],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"upstream worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-dir", default=None, help="existing NANOCHAT_BASE_DIR (default: write a tiny checkpoint)")
    p.add_argument("-i", "--source", default="sft")
    p.add_argument("--depth", type=int, default=4, help="depth of the tiny checkpoint written when no --base-dir")
    p.add_argument("--sequence-len", type=int, default=512)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests-per-level", type=int, default=0, help="default: 3 x concurrency (at least 6)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-invariant", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--upstream", default=None, help="path of an upstream nanochat checkout to compare with")
    p.add_argument("--upstream-rounds", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve.app import ChatAppArgs, build_app
    from serve.tiny import make_tiny_checkpoint

    base = args.base_dir
    if base is None:
        base = tempfile.mkdtemp(prefix="bench_serve_")
        make_tiny_checkpoint(base, depth=args.depth, sequence_len=args.sequence_len, source=args.source)
    levels = [int(c) for c in args.concurrency.split(",")]
    invariant = {"auto": None, "on": True, "off": False}[args.batch_invariant]

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = ChatAppArgs(base_dir=base, source=args.source, num_replicas=1, num_cpus_per_replica=1, torch_threads=1,
                           max_batch_size=args.max_batch_size, max_waiting=256, max_queued_requests=-1, ui=False,
                           batch_invariant=invariant)
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        for i in range(3):  # warm-up (first forward passes, connection pools)
            one_request(url, i, 8)
        rows = [run_level(url, c, args.requests_per_level or max(6, 3 * c), args.max_tokens) for c in levels]
        stats = requests.get(url + "/stats").json()["engine"]
    finally:
        serve.shutdown()
        ray.shutdown()

    upstream = None
    if args.upstream:
        upstream = run_upstream(args.upstream, base, args.source, args.max_tokens, args.upstream_rounds)

    header = f"{'conc':>4} | {'reqs':>4} | {'agg tok/s':>9} | {'tok/cpu-s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8} | " \
             f"{'tok p50':>7} | {'tok p99':>7}   (latencies in ms)"
    print(f"model {stats['model_config']}, batch_invariant={stats['batch_invariant']}, max_tokens={args.max_tokens}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['concurrency']:>4} | {r['requests']:>4} | {r['agg_tok_s']:>9.1f} | {r['agg_tok_per_cpu_s']:>9.1f} | "
              f"{r['ttft_p50_ms']:>8.1f} | {r['ttft_p99_ms']:>8.1f} | {r['tpot_p50_ms']:>7.1f} | "
              f"{r['tpot_p99_ms']:>7.1f}")
    by = {r["concurrency"]: r for r in rows}
    result = {"benchmark": "serve_http", "model_config": stats["model_config"],
              "batch_invariant": stats["batch_invariant"], "max_tokens": args.max_tokens, "levels": rows}
    if 1 in by and 8 in by:
        result["speedup_8_vs_1"] = by[8]["agg_tok_s"] / by[1]["agg_tok_s"]
        result["speedup_8_vs_1_per_cpu_s"] = by[8]["agg_tok_per_cpu_s"] / by[1]["agg_tok_per_cpu_s"]
        print(f"aggregate tokens/s, 8 streams vs 1: {result['speedup_8_vs_1']:.2f}x wall, "
              f"{result['speedup_8_vs_1_per_cpu_s']:.2f}x per engine CPU-second (target >= 2.5x)")
    if upstream and 1 in by:
        result["upstream_engine"] = upstream
        result["one_stream_vs_upstream"] = by[1]["agg_tok_s"] / upstream["tok_s"]
        result["one_stream_vs_upstream_per_cpu_s"] = by[1]["agg_tok_per_cpu_s"] / upstream["tok_per_cpu_s"]
        print(f"upstream Engine in-process, 1 stream: {upstream['tok_s']:.1f} tok/s, "
              f"{upstream['tok_per_cpu_s']:.1f} tok/CPU-s; ours over HTTP: {result['one_stream_vs_upstream']:.2f}x "
              f"wall, {result['one_stream_vs_upstream_per_cpu_s']:.2f}x per CPU-second (target >= 1x)")
    print(json.dumps(result))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
