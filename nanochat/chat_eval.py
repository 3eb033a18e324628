"""
Chat-model evaluation: categorical tasks (ARC, MMLU) by restricting the answer logits to the choice letters,
generative tasks (GSM8K, HumanEval, SpellingBee) by sampling with the Engine and scoring the completion, and
ChatCORE = mean over tasks of (accuracy - baseline) / (1 - baseline).

    from nanochat.chat_eval import run_chat_eval
    acc = run_chat_eval("ARC-Easy", model, tokenizer, engine, batch_size=8)

The `*_counts` functions score an explicit subset (batches for categorical, problems for generative) and return
(passed, total) so a Ray fan-out can split one task into shards and merge them exactly; `run_*_eval` are the
upstream-shaped versions that stride over torch.distributed ranks and all-reduce.
"""

import sys

import torch
import torch.distributed as dist

from nanochat.common import NanochatError, get_dist_info, print0

# The five tasks of ChatCORE (upstream 92d63d4) plus SpellingBee (older trees), with their chance accuracy.
ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
TASK_NAMES = ALL_TASKS + ["SpellingBee"]
BASELINE_ACCURACIES = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}
CATEGORICAL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU"]
# The generated held-out tasks of the offline SFT mixture (nanochat/tasks/offline.py): SFT's in-loop chat eval
# with --mixture offline (make_task needs their size; not offered by the chat_eval CLI).
OFFLINE_TASKS = ["WordChoice", "Arithmetic"]


def parse_task_names(spec: str | None) -> list[str]:
    """'ARC-Easy|GSM8K' -> ['ARC-Easy', 'GSM8K']; None -> ALL_TASKS. Unknown names raise, listing valid ones."""
    names = ALL_TASKS if spec is None else [n.strip() for n in spec.split("|") if n.strip()]
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise NanochatError(f"unknown task name(s) {unknown or [spec]}; valid: {', '.join(TASK_NAMES)} (join with '|')")
    return names


def make_task(task_name: str, size: int | None = None):
    """The evaluation split of a chat task by name (data loads on first use). `size`: offline tasks only."""
    if task_name in OFFLINE_TASKS:
        from nanochat.tasks import offline

        if size is None:
            raise ValueError(f"offline task {task_name} needs its test split size")
        return getattr(offline, task_name)(size, "test")
    parse_task_names(task_name)
    if task_name in ("ARC-Easy", "ARC-Challenge"):
        from nanochat.tasks.arc import ARC

        return ARC(subset=task_name, split="test")
    if task_name == "MMLU":
        from nanochat.tasks.mmlu import MMLU

        return MMLU(subset="all", split="test")
    if task_name == "GSM8K":
        from nanochat.tasks.gsm8k import GSM8K

        return GSM8K(subset="main", split="test")
    if task_name == "HumanEval":
        from nanochat.tasks.humaneval import HumanEval

        return HumanEval()
    from nanochat.tasks.spellingbee import SpellingBee

    return SpellingBee(size=256, split="test")


def num_problems(task, max_problems: int | None) -> int:
    return len(task) if max_problems is None else min(len(task), max_problems)


def num_units(task, batch_size: int, max_problems: int | None) -> int:
    """Independent work units of a task: batches (categorical) or problems (generative)."""
    n = num_problems(task, max_problems)
    return -(-n // batch_size) if task.eval_type == "categorical" else n


# -----------------------------------------------------------------------------
# Categorical: one forward pass per batch, argmax over the allowed letters at the answer position


@torch.no_grad()
def categorical_counts(task, tokenizer, model, batch_size: int, max_problems=None, batches=None, progress=None):
    """(passed, total) over the given batch indices (default: all). `progress(k)` after each batch of k problems."""
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()  # right padding; padded positions come after the answer position
    n = num_problems(task, max_problems)
    batches = range(-(-n // batch_size)) if batches is None else batches
    letter_ids = {}
    passed = total = 0
    for b in batches:
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    encoded = tokenizer.encode(letter)
                    assert len(encoded) == 1, f"choice letter {letter!r} must be a single token, got {encoded}"
                    letter_ids[letter] = encoded[0]
            choice_logits = logits[row, len(prompt) - 1, [letter_ids[x] for x in letters]]
            predicted = letters[choice_logits.argmax(dim=-1).item()]
            passed += int(task.evaluate(conversation, predicted))
            total += 1
        if progress is not None:
            progress(len(conversations))
    return passed, total


# -----------------------------------------------------------------------------
# Generative: sample num_samples completions per problem; a problem passes if any sample does (pass@k)


@torch.no_grad()
def generative_counts(
    task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
    max_problems=None, problems=None, progress=None,
):  # fmt: skip
    """(passed, total) over the given problem indices (default: all); each problem is sampled with seed 42."""
    problems = range(num_problems(task, max_problems)) if problems is None else problems
    passed = total = 0
    for i in problems:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(
            prompt, num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k
        )
        completions = [tokenizer.decode(r[len(prompt) :]) for r in results]
        passed += int(any(task.evaluate(conversation, c) for c in completions))
        total += 1
        if progress is not None:
            progress(1)
    return passed, total


def _all_reduce_counts(passed: int, total: int, device) -> tuple[int, int]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([passed, total], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        passed, total = t.tolist()
    return passed, total


def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None) -> float:
    _, rank, _, world = get_dist_info()
    batches = range(rank, num_units(task_object, batch_size, max_problems), world)
    passed, total = categorical_counts(task_object, tokenizer, model, batch_size, max_problems, batches)
    passed, total = _all_reduce_counts(passed, total, model.get_device())
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


def _progress_printer(rank: int, total: int):
    """(tick(k), is_tty). On a terminal, upstream's per-rank line rewritten in place after every problem. Elsewhere
    (Ray task and job logs, files) a carriage return does not rewrite, so one line per tenth of the problems."""
    tty = sys.stdout.isatty()
    every = max(1, total // 10)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        before, done = done, done + k
        if tty:
            print(f"\r\033[KRank {rank} | {done} done", end="", flush=True)
        elif done // every > before // every or (done == total and before < total):
            print(f"Rank {rank} | {done}/{total} done", flush=True)

    return tick, tty


def run_generative_eval(
    task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=None
) -> float:
    _, rank, _, world = get_dist_info()
    problems = range(rank, num_problems(task_object, max_problems), world)
    live, tty = _progress_printer(rank, len(problems))
    passed, total = generative_counts(
        task_object, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k, max_problems, problems, live
    )
    if tty:
        print()
    passed, total = _all_reduce_counts(passed, total, model.get_device())
    print0("=" * 50)
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


def run_chat_eval(
    task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512, temperature=0.0,
    top_k=50, max_problems=None,
) -> float:  # fmt: skip
    """Accuracy of one named task (upstream's signature; SFT's in-loop ChatCORE calls this)."""
    task = make_task(task_name)
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems=max_problems)
    return run_generative_eval(
        task, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=max_problems
    )


def centered_mean(results: dict, tasks) -> float:
    return sum((results[t] - BASELINE_ACCURACIES[t]) / (1.0 - BASELINE_ACCURACIES[t]) for t in tasks) / len(tasks)


def chatcore(results: dict) -> float | None:
    """ChatCORE over every evaluated task, defined only once all of ALL_TASKS were evaluated (else None)."""
    if not all(t in results for t in ALL_TASKS):
        return None
    return centered_mean(results, list(results))
