"""
Serving benchmarks of serve.batching.BatchScheduler: in-process (default) or over HTTP through the Ray Serve app.

    python bench/bench_serve.py                                  # in-process, CPU: d4, concurrency 1,8,32 + multi-turn
    python bench/bench_serve.py --device cuda --dtype bfloat16 --depth 12 --concurrency 1,8,32,64   # GPU (d12/d20)
    python bench/bench_serve.py --http                           # the chat app on a local Ray cluster, HTTP streams
    python bench/bench_serve.py --http --upstream /work/upstream # + upstream nanochat's Engine on the same weights

In-process (needs only torch + nanochat: no Ray, no HTTP): the scheduler thread on a model with seeded random weights
(bench_engine's shapes: --depth, vocab 32768) and a tokenizer whose special tokens lie outside the vocabulary, so
every reply runs to max_tokens. Per concurrency level C, C client threads each submit requests (a distinct random
prompt of --prompt-len tokens, --max-tokens new tokens, temperature 0.8, top-k 50, a seed per request) until
--requests-per-level have finished. Reported: aggregate tokens/s (all tokens / wall time of the level), the same per
CPU-second of the process (robust on a shared machine with 1 thread), time to first token (submit -> first token)
p50/p99, and time per output token p50/p99 (each request's (last - first token time) / (tokens - 1)). Headline: 8
streams vs 1 (CPU target >= 2.5x). Then the multi-turn workload: --conversations conversations x --turns turns, run
concurrently, sharing a --system-len token system prompt; each turn appends the reply and a --user-len token message.
Run once with the prefix cache and once without: prefill tokens computed and saved, TTFT of turn 1 and of later turns
(target: later-turn TTFT cut by at least half), and whether the replies are identical.

Over HTTP (--http): one CPU engine replica, streaming /v1/chat/completions requests, the same latency metrics; the
headline ratios are 8 streams vs 1 and one stream vs upstream's Engine in-process (--upstream).
Prints a table, then one JSON object as the last line.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = [{"role": "user", "content": "hello world, how are you today? tell me about the model and the numbers."}]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def one_request(url, seed, max_tokens):
    import requests  # HTTP mode only (the in-process benchmark needs nothing but torch)

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
    import requests

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


def main_http(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", action="store_true")
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
        stats = __import__("requests").get(url + "/stats").json()["engine"]
    finally:
        serve.shutdown()
        ray.shutdown()

    upstream = None
    if args.upstream:
        upstream = run_upstream(args.upstream, base, args.source, args.max_tokens, args.upstream_rounds)

    print(f"model {stats['model_config']}, batch_invariant={stats['batch_invariant']}, max_tokens={args.max_tokens}")
    print_levels(rows)
    result = {"benchmark": "serve_http", "model_config": stats["model_config"],
              "batch_invariant": stats["batch_invariant"], "max_tokens": args.max_tokens, "levels": rows}
    by = speedup(result, rows)
    if upstream and 1 in by:
        result["upstream_engine"] = upstream
        result["one_stream_vs_upstream"] = by[1]["agg_tok_s"] / upstream["tok_s"]
        result["one_stream_vs_upstream_per_cpu_s"] = by[1]["agg_tok_per_cpu_s"] / upstream["tok_per_cpu_s"]
        print(f"upstream Engine in-process, 1 stream: {upstream['tok_s']:.1f} tok/s, "
              f"{upstream['tok_per_cpu_s']:.1f} tok/CPU-s; ours over HTTP: {result['one_stream_vs_upstream']:.2f}x "
              f"wall, {result['one_stream_vs_upstream_per_cpu_s']:.2f}x per CPU-second (target >= 1x)")
    print(json.dumps(result))


# -----------------------------------------------------------------------------
# In-process


def pct_ms(xs, q):
    return 1e3 * pct(xs, q)


def inproc_model(args):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_engine import BenchTokenizer, model_config, random_model

    import nanochat.gpt as gpt_mod

    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    return random_model(gpt_mod, cfg, torch.device(args.device)), BenchTokenizer(args.vocab_size), cfg


class Timed:
    """Collects one request's events with their times; wait() blocks until its last event."""

    def __init__(self):
        self.times, self.tokens, self.done = [], [], threading.Event()
        self.t0 = time.perf_counter()

    def __call__(self, ev):
        self.times.append(time.perf_counter())
        self.tokens.append(ev.token)
        if ev.finish_reason is not None:
            self.finish = ev.finish_reason
            self.done.set()

    def ttft(self):
        return self.times[0] - self.t0

    def tpot(self):
        n = len(self.times)
        return (self.times[-1] - self.times[0]) / (n - 1) if n > 1 else float("nan")


def run_requests(sched, concurrency, prompts, params):
    """C client threads submit the requests in order; returns the Timed record of each."""
    from serve.batching import QueueFull

    records, lock, nxt = [None] * len(prompts), threading.Lock(), [0]

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(prompts):
                return
            rec = Timed()
            while True:
                try:
                    sched.submit(prompts[i], params[i], rec)
                    break
                except QueueFull:  # not expected with the benchmark's queue size; back off like a client would
                    time.sleep(0.01)
            rec.done.wait()
            records[i] = rec

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return records


def inproc_level(sched, concurrency, n_requests, args, seed0):
    import torch

    from serve.batching import SamplingParams

    g = torch.Generator().manual_seed(seed0)
    prompts = [torch.randint(0, args.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(n_requests)]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_k=50, seed=seed0 + i)
              for i in range(n_requests)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    recs = run_requests(sched, concurrency, prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(len(r.tokens) for r in recs)
    return {"concurrency": concurrency, "requests": n_requests, "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "agg_tok_per_cpu_s": tokens / cpu,
            "ttft_p50_ms": pct_ms([r.ttft() for r in recs], 50), "ttft_p99_ms": pct_ms([r.ttft() for r in recs], 99),
            "tpot_p50_ms": pct_ms([r.tpot() for r in recs], 50), "tpot_p99_ms": pct_ms([r.tpot() for r in recs], 99)}


def multiturn(model, tok, args, reuse):
    """args.conversations concurrent chats of args.turns turns sharing a system prompt; returns TTFTs and counts."""
    import torch

    from serve.batching import BatchScheduler, SamplingParams

    sched = BatchScheduler(model, tok, max_batch_size=args.max_batch_size, max_waiting=1024,
                           prefix_cache_tokens=None if reuse else 0).start()
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, args.vocab_size, (n,), generator=g).tolist()
    system = rand(args.system_len)
    users = [[rand(args.user_len) for _ in range(args.turns)] for _ in range(args.conversations)]
    ttft = [[None] * args.turns for _ in range(args.conversations)]
    replies = [[None] * args.turns for _ in range(args.conversations)]

    def chat(c):
        prompt = list(system)
        for t in range(args.turns):
            prompt += users[c][t]
            rec = Timed()
            sched.submit(list(prompt), SamplingParams(max_tokens=args.reply_len, temperature=0.8, top_k=50,
                                                      seed=100 * c + t), rec)
            rec.done.wait()
            ttft[c][t], replies[c][t] = rec.ttft(), rec.tokens
            prompt += rec.tokens

    before = sched.snapshot()
    threads = [threading.Thread(target=chat, args=(c,)) for c in range(args.conversations)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    snap = sched.snapshot()
    sched.stop()
    later = [x for row in ttft for x in row[1:]]
    return {"prefix_reuse": reuse, "prefill_tokens": snap["prefill_tokens"] - before["prefill_tokens"],
            "prefix_hit_tokens": snap["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
            "prompt_tokens": snap["prefix_cache_lookup_tokens"] - before["prefix_cache_lookup_tokens"],
            "ttft_turn1_p50_ms": pct_ms([row[0] for row in ttft], 50),
            "ttft_later_p50_ms": pct_ms(later, 50), "ttft_later_p99_ms": pct_ms(later, 99),
            "ttft_later_mean_ms": 1e3 * sum(later) / len(later),
            "ttft_by_turn_p50_ms": [pct_ms([row[t] for row in ttft], 50) for t in range(args.turns)],
            "replies": replies}


def main_inproc(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="NANOCHAT_DTYPE (bfloat16 on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--sequence-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-level", type=int, default=0, help="default: 3 x concurrency (at least 6)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=0, help="default: the largest concurrency level")
    p.add_argument("--static", choices=["auto", "on", "off"], default="auto",
                   help="fixed-shape decode + CUDA graphs (auto: on CUDA)")
    p.add_argument("--conversations", type=int, default=8, help="multi-turn workload (0 = skip it)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=256)
    p.add_argument("--user-len", type=int, default=64)
    p.add_argument("--reply-len", type=int, default=32)
    args = p.parse_args(argv)
    if args.prompt_len + args.max_tokens > args.sequence_len:
        p.error(f"--prompt-len {args.prompt_len} + --max-tokens {args.max_tokens} must fit in --sequence-len "
                f"{args.sequence_len}: lower them or raise --sequence-len")
    os.environ["NANOCHAT_DTYPE"] = args.dtype  # before nanochat is imported
    from serve.batching import BatchScheduler

    levels = [int(c) for c in args.concurrency.split(",")]
    args.max_batch_size = args.max_batch_size or max(levels)
    model, tok, cfg = inproc_model(args)
    static = {"auto": None, "on": True, "off": False}[args.static]
    sched = BatchScheduler(model, tok, max_batch_size=args.max_batch_size, max_waiting=1024, static=static).start()
    try:
        # warm-up: every row bucket of the static decoder (CUDA graphs are captured on first use), allocator
        for c in sched.decoder.buckets if sched.decoder else levels:
            inproc_level(sched, c, c, argparse.Namespace(**{**vars(args), "max_tokens": 8}), seed0=10_000)
        rows = [inproc_level(sched, c, args.requests_per_level or max(6, 3 * c), args, seed0=1000 * (i + 1))
                for i, c in enumerate(levels)]
        snap = sched.snapshot()
    finally:
        sched.stop()
    print(f"in-process BatchScheduler: model {cfg}, {args.device} {args.dtype}, {args.threads} thread(s), "
          f"static decode {snap['static_decode']} (CUDA graphs {snap['cuda_graphs']}), batch-invariant "
          f"{snap['batch_invariant']}, prompt {args.prompt_len}, {args.max_tokens} new tokens, max_batch_size "
          f"{args.max_batch_size}")
    print_levels(rows)
    result = {"benchmark": "serve_inproc", "model_config": cfg, "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "static_decode": snap["static_decode"], "cuda_graphs": snap["cuda_graphs"],
              "batch_invariant": snap["batch_invariant"], "prompt_tokens": args.prompt_len,
              "max_tokens": args.max_tokens, "levels": rows}
    speedup(result, rows)
    if args.conversations:
        runs = [multiturn(model, tok, args, reuse) for reuse in (True, False)]
        same = runs[0].pop("replies") == runs[1].pop("replies")
        print(f"\nmulti-turn: {args.conversations} conversations x {args.turns} turns, system prompt "
              f"{args.system_len}, user messages {args.user_len}, replies {args.reply_len} tokens (concurrent)")
        header = f"{'prefix reuse':>12} | {'prefilled':>9} | {'saved':>6} | {'TTFT turn1 p50':>14} | " \
                 f"{'later p50':>9} | {'later p99':>9} | TTFT p50 by turn (ms)"
        print(header)
        print("-" * len(header))
        for r in runs:
            print(f"{str(r['prefix_reuse']):>12} | {r['prefill_tokens']:>9} | {r['prefix_hit_tokens']:>6} | "
                  f"{r['ttft_turn1_p50_ms']:>14.1f} | {r['ttft_later_p50_ms']:>9.1f} | {r['ttft_later_p99_ms']:>9.1f} | "
                  + " ".join(f"{x:.0f}" for x in r["ttft_by_turn_p50_ms"]))
        cut = runs[1]["ttft_later_p50_ms"] / runs[0]["ttft_later_p50_ms"]
        print(f"later-turn TTFT p50 without / with reuse: {cut:.2f}x (target >= 2x); replies identical: {same}")
        result["multiturn"] = {"runs": runs, "later_ttft_cut": cut, "replies_identical": same,
                               "prefill_tokens_saved": runs[0]["prefix_hit_tokens"]}
    print(json.dumps(result))


def print_levels(rows):
    header = f"{'conc':>4} | {'reqs':>4} | {'agg tok/s':>9} | {'tok/cpu-s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8} | " \
             f"{'TPOT p50':>8} | {'TPOT p99':>8}   (latencies in ms)"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['concurrency']:>4} | {r['requests']:>4} | {r['agg_tok_s']:>9.1f} | {r['agg_tok_per_cpu_s']:>9.1f} | "
              f"{r['ttft_p50_ms']:>8.1f} | {r['ttft_p99_ms']:>8.1f} | {r['tpot_p50_ms']:>8.1f} | "
              f"{r['tpot_p99_ms']:>8.1f}")


def speedup(result, rows):
    by = {r["concurrency"]: r for r in rows}
    if 1 in by and 8 in by:
        result["speedup_8_vs_1"] = by[8]["agg_tok_s"] / by[1]["agg_tok_s"]
        result["speedup_8_vs_1_per_cpu_s"] = by[8]["agg_tok_per_cpu_s"] / by[1]["agg_tok_per_cpu_s"]
        print(f"aggregate tokens/s, 8 streams vs 1: {result['speedup_8_vs_1']:.2f}x wall, "
              f"{result['speedup_8_vs_1_per_cpu_s']:.2f}x per CPU-second (target >= 2.5x)")
    return by


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    if "--http" in sys.argv[1:]:
        main_http()
    else:
        main_inproc()
