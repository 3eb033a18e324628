"""
Evaluation wall time with 1 vs 2 Ray workers (and in-process sequential) for the same CORE + chat tasks.

    python bench/bench_eval.py                      # tiny d4 model, mini fixtures, local Ray cluster
    python bench/bench_eval.py --depth 6 --rows 32 --repeats 2

Builds the mini eval bundle and task parquet files of dev/make_eval_fixtures.py (read offline: file:// bundle URL
and NANOCHAT_TASK_DATA_DIR), saves a randomly initialised GPT checkpoint in a temporary base dir, warms the workers
up, then times the identical unit list with --num-workers 1 and 2. Checks that every run gives the same numbers.
Prints a markdown table, then a JSON object as the last line.
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    parser = argparse.ArgumentParser(description="eval fan-out benchmark")
    parser.add_argument("--depth", type=int, default=4, help="GPT layers of the random model")
    parser.add_argument("--width", type=int, default=128, help="model dim")
    parser.add_argument("--rows", type=int, default=24, help="rows per CORE task in the mini bundle")
    parser.add_argument("--shards-per-task", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (best is reported)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    os.environ["NANOCHAT_BASE_DIR"] = os.path.join(tmp, "base")
    os.environ["NANOCHAT_DTYPE"] = "float32"
    from tests.eval_fixtures import load_fixture_builder, make_tiny_checkpoint

    load_fixture_builder().build(os.path.join(tmp, "served"), n_core_rows=args.rows)
    os.environ["NANOCHAT_EVAL_BUNDLE_URL"] = "file://" + os.path.join(tmp, "served", "eval_bundle.zip")
    os.environ["NANOCHAT_TASK_DATA_DIR"] = os.path.join(tmp, "served", "task_data")
    os.makedirs(os.environ["NANOCHAT_BASE_DIR"])
    make_tiny_checkpoint(os.environ["NANOCHAT_BASE_DIR"], step=1, n_layer=args.depth)
    if args.width != 64:  # re-save wider (make_tiny_checkpoint's default is 64)
        _rewiden(args)

    import ray
    import torch

    from ray_jobs import eval_fanout as fan

    torch.set_num_threads(1)
    ref = fan.ModelRef.from_source("base")
    core, tasks = fan.core_units(max_per_task=-1, shards_per_task=args.shards_per_task)
    chat = fan.chat_units(["ARC-Easy", "ARC-Challenge", "MMLU"], shards_per_task=args.shards_per_task, batch_size=4)
    units = core + chat
    merge = lambda res: (fan.merge_core(units, res, tasks), fan.merge_chat(units, res))

    timings, answers = {}, {}
    fan.run_units_local(ref, units[:2], torch.device("cpu"))  # warm-up: imports, model load, task data
    t0 = time.perf_counter()
    answers["sequential"] = merge(fan.run_units_local(ref, units, torch.device("cpu")))
    timings["sequential (no Ray)"] = time.perf_counter() - t0

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    fan.run_units(ref, units[:2], num_workers=2, show_progress=False)  # warm-up: start workers, load the model
    for workers in (1, 2):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            answers[workers] = merge(fan.run_units(ref, units, num_workers=workers, show_progress=False))
            best = min(best, time.perf_counter() - t0)
        timings[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = best
    ray.shutdown()
    same = answers[1] == answers[2] == answers["sequential"]

    print(f"{len(units)} units: {len(tasks)} CORE tasks + 3 chat tasks, {args.shards_per_task} shards each; "
          f"d{args.depth} w{args.width}, {os.cpu_count()} CPUs")  # fmt: skip
    print("| setting | wall s | speed-up vs 1 worker |")
    print("|---|---|---|")
    one = timings["ray, 1 worker"]
    for name, secs in timings.items():
        print(f"| {name} | {secs:.2f} | {one / secs:.2f}x |")
    print(f"identical results: {same}; CORE {answers[2][0]['core_metric']:.4f}")
    result = {
        "benchmark": "eval_fanout",
        "units": len(units),
        "cpus": os.cpu_count(),
        "wall_s": {k: round(v, 3) for k, v in timings.items()},
        "speedup_2_vs_1": round(one / timings["ray, 2 workers"], 3),
        "identical_results": same,
        "core_metric": answers[2][0]["core_metric"],
    }
    print(json.dumps(result))


def _rewiden(args):
    """Replace the checkpoint with a wider random GPT of the same depth (same tokenizer)."""
    import dataclasses

    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    vocab = get_tokenizer().get_vocab_size()
    config = GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=args.depth, n_head=args.width // 64,
                       n_kv_head=args.width // 64, n_embd=args.width, window_pattern="L")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ckpt = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_checkpoints", "d2")
    meta = {"step": 1, "model_config": dataclasses.asdict(config), "user_config": {}}
    save_checkpoint(ckpt, 1, model.state_dict(), None, meta)


if __name__ == "__main__":
    main()
