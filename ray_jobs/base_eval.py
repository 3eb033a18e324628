"""
Base-model evaluation (upstream `scripts.base_eval`), fanned out as Ray tasks: CORE, bits per byte, samples.

    python -m ray_jobs.base_eval                                   # core,bpb,sample on the largest/last base model
    python -m ray_jobs.base_eval --eval core --max-per-task 100 --shards-per-task 2
    python -m ray_jobs.base_eval --local ...                       # same numbers, one process, no Ray

Writes `<base dir>/base_eval/base_model_<step:06d>.csv` (upstream's format) and `.json`, prints
`CORE metric: x.xxxx`, a markdown table, and the JSON results as the last line. The base dir may be s3://.
Downloads: the eval bundle (NANOCHAT_EVAL_BUNDLE_URL or --bundle-url overrides upstream's URL).
"""

import argparse
import json

from nanochat import storage
from nanochat.common import NanochatError, get_base_dir, print0
from nanochat.core_eval import format_core_csv
from ray_jobs.eval_fanout import (
    ModelRef,
    add_fanout_args,
    core_units,
    execute,
    make_unit,
    markdown_table,
    merge_core,
    user_errors_exit,
)

VALID_MODES = ("core", "bpb", "sample")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Base model evaluation (CORE, bpb, samples) on Ray")
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated: core,bpb,sample")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: largest d<N>)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="max examples per CORE task (-1 = all)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="batch rows for bpb")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--bundle-url", type=str, default=None, help="eval_bundle.zip URL (default: upstream's)")
    parser.add_argument(
        "--max-shard-examples", type=int, default=1000, help="CORE tasks with more examples are split (0 = never)"
    )
    add_fanout_args(parser)
    args = parser.parse_args(argv)
    modes = {m.strip() for m in args.eval.split(",") if m.strip()}
    if not modes or modes - set(VALID_MODES):
        parser.error(f"Invalid eval modes: {sorted(modes - set(VALID_MODES))}. Valid: {', '.join(VALID_MODES)}")
    args.modes = modes
    return args


def read_meta(ref: ModelRef) -> dict:
    from nanochat.checkpoint_manager import load_meta

    return load_meta(ref.checkpoint_dir, ref.step)


def plan(args, meta: dict) -> tuple[list, list]:
    units, tasks = [], []
    if "sample" in args.modes:
        units.append(make_unit("sample", "sample"))
    if "bpb" in args.modes:
        seq_len = meta["model_config"]["sequence_len"]
        tokens_per_step = args.device_batch_size * seq_len
        steps = args.split_tokens // tokens_per_step  # rounded down to whole batches, as upstream
        if steps < 1:
            raise NanochatError(f"--split-tokens {args.split_tokens} is less than one batch ({tokens_per_step} tokens)")
        if args.split_tokens % tokens_per_step:
            print0(f"Adjusted split_tokens to {steps * tokens_per_step} (must be divisible by {tokens_per_step})")
        for split in ("train", "val"):
            units.append(
                make_unit("bpb", split, steps=steps, device_batch_size=args.device_batch_size, sequence_len=seq_len)
            )
    if "core" in args.modes:
        core, tasks = core_units(args.max_per_task, args.shards_per_task, args.max_shard_examples)
        units += core
    return units, tasks


def report(args, ref, meta, units, results, tasks) -> dict:
    out = {"model": f"base_model (step {ref.step})", "step": ref.step}
    by_kind = {}
    for unit, res in zip(units, results):
        by_kind.setdefault(unit.kind, []).append((unit, res))
    for _, res in by_kind.get("sample", []):
        print0("\nConditioned samples:")
        for s in res["samples"]:
            print0("-" * 80 + "\n" + s)
        print0("\nUnconditioned samples:")
        for s in res["unconditioned"]:
            print0("-" * 80 + "\n" + s)
        out["samples"], out["unconditioned_samples"] = res["samples"], res["unconditioned"]
    if "bpb" in by_kind:
        out["bpb"] = {unit.name: res["bpb"] for unit, res in by_kind["bpb"]}
        for split, bpb in out["bpb"].items():
            print0(f"{split} bpb: {bpb:.6f}")
    if "core" in by_kind:
        core = merge_core(units, results, tasks)
        out["core"] = core
        print0(markdown_table(["Task", "Shots", "Type", "Accuracy", "Centered"], [
            [t["label"], t["num_fewshot"], t["task_type"], core["results"][t["label"]], core["centered_results"][t["label"]]]
            for t in tasks
        ]))  # fmt: skip
        storage.makedirs(storage.join(get_base_dir(), "base_eval"))
        csv_path = storage.join(get_base_dir(), "base_eval", f"base_model_{ref.step:06d}.csv")
        storage.write_bytes(csv_path, format_core_csv(core).encode("utf-8"))
        print0(f"\nResults written to: {csv_path}")
        print0(f"CORE metric: {core['core_metric']:.4f}")
    out_dir = storage.join(get_base_dir(), "base_eval")
    storage.makedirs(out_dir)
    storage.write_bytes(storage.join(out_dir, f"base_model_{ref.step:06d}.json"), json.dumps(out, indent=2).encode())
    return out


@user_errors_exit
def main(argv=None) -> dict:
    import os

    args = parse_args(argv)
    if args.bundle_url:
        os.environ["NANOCHAT_EVAL_BUNDLE_URL"] = args.bundle_url  # forwarded to the Ray workers
    ref = ModelRef.from_source("base", args.model_tag, args.step)
    meta = read_meta(ref)
    print0(f"Evaluating model: base_model (step {ref.step}) from {ref.checkpoint_dir}")
    print0(f"Eval modes: {', '.join(sorted(args.modes))}")
    units, tasks = plan(args, meta)
    results = execute(args, ref, units)
    out = report(args, ref, meta, units, results, tasks)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
