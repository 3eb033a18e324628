"""
Chat-model evaluation (upstream `scripts.chat_eval`) fanned out as Ray tasks: ARC-Easy, ARC-Challenge, MMLU
(categorical), GSM8K, HumanEval, SpellingBee (generative), and ChatCORE when all five upstream tasks ran.

    python -m ray_jobs.chat_eval -i sft                              # all five tasks -> ChatCORE
    python -m ray_jobs.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100 --shards-per-task 2
    python -m ray_jobs.chat_eval -i sft --local                      # one process, no Ray, same numbers

Prints `<task> accuracy: xx.xx%`, `ChatCORE metric: x.xxxx`, a markdown table, and JSON as the last line; the JSON
is also written to `<base dir>/chat_eval/<source>_<tag>_<step:06d>.json`.
Task data: HF parquet export cached in task_data/ (--task-data-url or NANOCHAT_TASK_DATA_URL replaces
https://huggingface.co; --task-data-dir or NANOCHAT_TASK_DATA_DIR reads a local task_data/ copy, no network).
"""

import argparse
import json
import os

from nanochat import storage
from nanochat.chat_eval import ALL_TASKS, BASELINE_ACCURACIES, chatcore, parse_task_names
from nanochat.common import get_base_dir, print0
from ray_jobs.eval_fanout import (
    ModelRef,
    add_fanout_args,
    chat_units,
    execute,
    markdown_table,
    merge_chat,
    user_errors_exit,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat model evaluation on Ray")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "sft", "rl"], help="model source")
    parser.add_argument(
        "-a", "--task-name", type=str, default=None, help=f"tasks joined by | (default: {'|'.join(ALL_TASKS)})"
    )
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
    parser.add_argument("-n", "--num-samples", type=int, default=1)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical evaluation")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load")
    parser.add_argument("-s", "--step", type=int, default=None, help="step to load")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="max problems per task")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"])
    parser.add_argument("--task-data-url", type=str, default=None, help="Hub endpoint replacing https://huggingface.co")
    parser.add_argument("--task-data-dir", type=str, default=None, help="local task_data/ directory (offline)")
    parser.add_argument(
        "--max-shard-problems", type=int, default=1000, help="tasks with more problems are split (0 = never)"
    )
    add_fanout_args(parser)
    return parser.parse_args(argv)


@user_errors_exit
def main(argv=None) -> dict:
    args = parse_args(argv)
    task_names = parse_task_names(args.task_name)  # unknown names fail here, before any model loads
    if args.task_data_url:
        os.environ["NANOCHAT_TASK_DATA_URL"] = args.task_data_url  # forwarded to the Ray workers
    if args.task_data_dir:
        os.environ["NANOCHAT_TASK_DATA_DIR"] = os.path.abspath(args.task_data_dir)
    ref = ModelRef.from_source(args.source, args.model_tag, args.step)
    print0(f"Evaluating {args.source} model {ref.checkpoint_dir} step {ref.step} on {', '.join(task_names)}")
    units = chat_units(
        task_names, args.shards_per_task, max_problems=args.max_problems, batch_size=args.batch_size,
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, max_shard_problems=args.max_shard_problems,
    )  # fmt: skip
    results = merge_chat(units, execute(args, ref, units))
    for name, acc in results.items():
        print0(f"{name} accuracy: {100 * acc:.2f}%")
    score = chatcore(results)
    if score is not None:
        print0(f"ChatCORE metric: {score:.4f}")
    rows = [
        [n, f"{100 * a:.2f}%", (a - BASELINE_ACCURACIES[n]) / (1 - BASELINE_ACCURACIES[n])] for n, a in results.items()
    ]
    print0(markdown_table(["Task", "Accuracy", "Centered"], rows))
    out = {
        "source": args.source,
        "checkpoint_dir": ref.checkpoint_dir,
        "step": ref.step,
        "results": results,
        "chatcore": score,
    }
    out_dir = storage.join(get_base_dir(), "chat_eval")
    storage.makedirs(out_dir)
    tag = ref.checkpoint_dir.rstrip("/").rsplit("/", 1)[-1]
    storage.write_bytes(
        storage.join(out_dir, f"{args.source}_{tag}_{ref.step:06d}.json"), json.dumps(out, indent=2).encode()
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
