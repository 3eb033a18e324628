"""
Held-out evaluation of the generated (offline) chat tasks (WordChoice, Arithmetic, ...), one Ray task per task; the
speedrun's chat_eval stage uses it for the tasks that ray_jobs.chat_eval does not know.
"""

import contextlib
import os
import sys

from nanochat import storage
from nanochat.common import NanochatError
from ray_jobs.speedrun_state import write_json

# -----------------------------------------------------------------------------
# Held-out evaluation of the generated (offline) chat tasks, one Ray task per chat task


def _generated_task(name: str, size: int):
    from nanochat.tasks import offline

    cls = getattr(offline, name, None)
    if cls is None or not isinstance(cls, type):
        from nanochat.chat_eval import TASK_NAMES

        raise NanochatError(f"unknown chat eval task {name!r}; valid: {', '.join(TASK_NAMES)}, WordChoice, Arithmetic")
    return cls(size, "test")


def _eval_generated_one(source: str, tag: str | None, step: int | None, name: str, size: int, cfg: dict) -> float:
    import torch

    from nanochat.chat_eval import run_categorical_eval, run_generative_eval
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()))
    model, tokenizer, _ = load_model(source, torch.device("cpu") if not torch.cuda.is_available() else
                                     torch.device("cuda"), phase="eval", model_tag=tag, step=step)  # fmt: skip
    task = _generated_task(name, size)
    max_problems = int(cfg["max_problems"]) if int(cfg["max_problems"]) > 0 else None
    with contextlib.redirect_stdout(sys.stderr):
        if task.eval_type == "categorical":
            return run_categorical_eval(task, tokenizer, model, int(cfg["batch_size"]), max_problems)
        return run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), int(cfg["num_samples"]),
                                   int(cfg["max_new_tokens"]), float(cfg["temperature"]), int(cfg["top_k"]),
                                   max_problems)  # fmt: skip


def eval_generated_tasks(source, tag, step, names, cfg, sft_cfg) -> dict:
    """Accuracy on the held-out split of each generated task (size = SFT's offline_size / 10, as nanochat.sft)."""
    import ray

    size = max(1, int(sft_cfg.get("offline_size", 20000)) // 10)
    for n in names:
        _generated_task(n, 1)  # unknown names fail before any work starts
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    env = {k: v for k, v in os.environ.items() if k.startswith(("NANOCHAT_", "AWS_"))}
    remote = ray.remote(_eval_generated_one).options(num_cpus=1, num_gpus=gpus, runtime_env={"env_vars": env},
                                                      max_retries=2)  # fmt: skip
    futures = {n: remote.remote(source, tag, step, n, size, cfg) for n in names}
    out = {n: float(ray.get(f)) for n, f in futures.items()}
    for n, acc in out.items():
        print(f"{n} accuracy: {100 * acc:.2f}%")
    return out


def _write_generated_eval(source, tag, step, results) -> None:
    from nanochat.common import get_base_dir

    out_dir = storage.join(get_base_dir(), "chat_eval")
    storage.makedirs(out_dir)
    body = {"source": source, "model_tag": tag, "step": step, "results": results}
    write_json(storage.join(out_dir, f"{source}_{tag}_{int(step or 0):06d}_generated.json"), body)
