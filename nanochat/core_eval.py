"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794): 22 in-context-learning tasks scored by
per-token loss, each centred against its random baseline, averaged. GPT-2 (1.5B) scores 0.2565.

    from nanochat.core_eval import evaluate_core
    out = evaluate_core(model, tokenizer, device, max_per_task=500)   # {"results", "centered_results", "core_metric"}

Layout of the DCLM eval bundle (downloaded once from EVAL_BUNDLE_URL into `<local cache>/eval_bundle/`):
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter?}]
    eval_meta_data.csv   columns "Eval Task" and "Random baseline" (in percent)
    eval_data/<dataset_uri>   one JSON object per line
Set NANOCHAT_EVAL_BUNDLE_URL to download it from elsewhere (tests serve a mini bundle on loopback).

Task types and how one example is scored (every prompt starts with BOS; answer spans in token space):
    multiple_choice  one prompt per choice, shared context  -> span = tokens after the common prefix
    schema           one prompt per context, shared ending   -> span = the common suffix
    language_modeling  context alone and context+continuation -> span = the continuation; correct iff greedy
                       argmax reproduces every continuation token
For the first two the prediction is the option with the lowest mean loss over its span.

One deliberate difference from upstream: when --max-per-task leaves fewer than k+1 examples for a k-shot task,
upstream crashes (random.sample of a too-small population). We then draw the few-shot examples from the whole
shuffled task instead; with enough examples the draw is exactly upstream's.
"""

import csv
import http.client
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from filelock import FileLock
from jinja2 import Template

from nanochat.common import NanochatError, get_local_cache_dir, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt rendering. Few-shot examples come first, each followed by a blank line.

_FEWSHOT_MC = "{% for ex in fewshot %}{{ ex.query }}{{ delim }}{{ ex.choices[ex.gold] }}\n\n{% endfor %}"
_FEWSHOT_SCHEMA = (
    "{% for ex in fewshot %}{{ ex.context_options[ex.gold] }}{{ delim }}{{ ex.continuation }}\n\n{% endfor %}"
)
_FEWSHOT_LM = "{% for ex in fewshot %}{{ ex.context | trim }}{{ delim }}{{ ex.continuation }}\n\n{% endfor %}"

_MC = Template(_FEWSHOT_MC + "{{ item.query }}{{ delim }}{{ choice }}", keep_trailing_newline=True)
_SCHEMA = Template(_FEWSHOT_SCHEMA + "{{ context }}{{ delim }}{{ item.continuation }}", keep_trailing_newline=True)
_LM = Template(
    _FEWSHOT_LM + "{{ item.context | trim }}{{ delim }}{% if with_continuation %}{{ item.continuation }}{% endif %}",
    keep_trailing_newline=True,
)


def render_prompts_mc(item: dict, continuation_delimiter: str, fewshot_examples: list | None = None) -> list[str]:
    """One full prompt per answer choice."""
    ctx = {"fewshot": fewshot_examples or [], "delim": continuation_delimiter, "item": item}
    return [_MC.render(choice=choice, **ctx) for choice in item["choices"]]


def render_prompts_schema(item: dict, continuation_delimiter: str, fewshot_examples: list | None = None) -> list[str]:
    """One full prompt per context option; the continuation is shared."""
    ctx = {"fewshot": fewshot_examples or [], "delim": continuation_delimiter, "item": item}
    return [_SCHEMA.render(context=option, **ctx) for option in item["context_options"]]


def render_prompts_lm(item: dict, continuation_delimiter: str, fewshot_examples: list | None = None) -> list[str]:
    """[prompt without continuation, prompt with it]. Contexts are trimmed (some datasets carry trailing spaces),
    and the first prompt is stripped so that it stays a token prefix of the second (a trailing space would merge
    into the continuation's first token)."""
    ctx = {"fewshot": fewshot_examples or [], "delim": continuation_delimiter, "item": item}
    return [_LM.render(with_continuation=False, **ctx).strip(), _LM.render(with_continuation=True, **ctx)]


# -----------------------------------------------------------------------------
# Tokenization and answer spans


def find_common_length(token_sequences: list[list[int]], direction: str = "left") -> int:
    """Length of the prefix ('left') or suffix ('right') shared by all sequences."""
    shortest = min(len(seq) for seq in token_sequences)
    for n in range(shortest):
        pos = n if direction == "left" else -1 - n
        if any(seq[pos] != token_sequences[0][pos] for seq in token_sequences):
            return n
    return shortest


def stack_sequences(tokens: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """(B, T_max) long tensor, right-padded with pad_token_id."""
    out = torch.full((len(tokens), max(len(t) for t in tokens)), pad_token_id, dtype=torch.long)
    for row, seq in enumerate(tokens):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def batch_sequences_mc(tokenizer, prompts: list[str]):
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start = find_common_length(tokens, direction="left")  # choices differ only after the shared context
    return tokens, [start] * len(tokens), [len(t) for t in tokens]


def batch_sequences_schema(tokenizer, prompts: list[str]):
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = find_common_length(tokens, direction="right")  # contexts differ, the continuation is shared
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]


def batch_sequences_lm(tokenizer, prompts: list[str]):
    without, with_ = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(without), len(with_)
    if not (start < end and with_[:start] == without):
        raise ValueError("language_modeling prompt without the continuation is not a token prefix of the full prompt")
    return [with_], [start], [end]  # only the full prompt needs a forward pass


@torch.no_grad()
def forward_model(model, input_ids: torch.Tensor):
    """(B, T) ids -> per-position next-token losses (B, T) and argmax predictions (B, T).

    Position t is scored against token t+1; the last column has no target and is NaN.
    """
    logits = model(input_ids)  # (B, T, V)
    B, T = input_ids.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


# -----------------------------------------------------------------------------
# Scoring one example / one task


def sample_fewshot(idx: int, num_fewshot: int, pool_size: int) -> list[int]:
    """Upstream's few-shot draw: Random(1234 + idx).sample of every pool index except idx."""
    if num_fewshot <= 0:
        return []
    candidates = [i for i in range(pool_size) if i != idx]
    return random.Random(1234 + idx).sample(candidates, num_fewshot)


@torch.no_grad()
def evaluate_example(idx: int, model, tokenizer, data: list[dict], device, task_meta: dict, pool=None) -> bool:
    """Score data[idx]. Few-shot examples are drawn from `pool` (default: data), whose first items are data's."""
    pool = data if pool is None else pool
    item, task_type, delim = data[idx], task_meta["task_type"], task_meta["continuation_delimiter"]
    fewshot = [pool[i] for i in sample_fewshot(idx, task_meta["num_fewshot"], len(pool))]

    if task_type == "multiple_choice":
        tokens, starts, ends = batch_sequences_mc(tokenizer, render_prompts_mc(item, delim, fewshot))
    elif task_type == "schema":
        tokens, starts, ends = batch_sequences_schema(tokenizer, render_prompts_schema(item, delim, fewshot))
    elif task_type == "language_modeling":
        tokens, starts, ends = batch_sequences_lm(tokenizer, render_prompts_lm(item, delim, fewshot))
    else:
        raise ValueError(f"unsupported CORE task type {task_type!r}; expected one of {TASK_TYPES}")

    # Models with a hard context limit keep the last max_seq_len tokens (nanochat's GPT has none; its rotary
    # cache covers 10x the training length).
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None:
        crops = [max(0, len(t) - max_len) for t in tokens]
        assert all(s - c >= 0 for s, c in zip(starts, crops)), "answer span cropped away"
        tokens = [t[c:] for t, c in zip(tokens, crops)]
        starts = [s - c for s, c in zip(starts, crops)]
        ends = [e - c for e, c in zip(ends, crops)]

    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)  # BOS is a harmless pad
    losses, predictions = forward_model(model, input_ids)

    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.all(predictions[0, s - 1 : e - 1] == input_ids[0, s:e]).item())
    mean_losses = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_examples(model, tokenizer, data, device, task_meta, indices, pool=None, progress=None) -> list[float]:
    """1.0/0.0 per index in `indices`; `progress(1)` after each (for progress bars)."""
    out = []
    for idx in indices:
        out.append(float(evaluate_example(idx, model, tokenizer, data, device, task_meta, pool=pool)))
        if progress is not None:
            progress(1)
    return out


def evaluate_task(model, tokenizer, data, device, task_meta, pool=None, progress=None) -> float:
    """Mean accuracy over data. Under torch.distributed each rank takes every world_size-th example."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    indices = list(range(rank, len(data), world))
    for idx, value in zip(
        indices, evaluate_examples(model, tokenizer, data, device, task_meta, indices, pool, progress)
    ):
        correct[idx] = value
    if world > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def mean_accuracy(values: list[float]) -> float:
    """The same float32 mean evaluate_task computes, for results merged from shards."""
    return torch.tensor(values, dtype=torch.float32).mean().item()


def centered_result(accuracy: float, random_baseline_percent: float) -> float:
    """0 at the random baseline, 1 at perfect accuracy (the baseline is given in percent)."""
    rb = 0.01 * random_baseline_percent
    return (accuracy - rb) / (1.0 - rb)


# -----------------------------------------------------------------------------
# The eval bundle: download once under a file lock, verify, unzip atomically


def eval_bundle_dir() -> str:
    return os.path.join(get_local_cache_dir(), "eval_bundle")


def _bundle_problem(bundle_dir: str) -> str | None:
    """None if the unzipped bundle is usable, else what is wrong with it."""
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            return f"missing {os.path.basename(path)}"
    try:
        with open(config_path, encoding="utf-8") as f:
            tasks = yaml.safe_load(f)["icl_tasks"]
        missing = [
            t["dataset_uri"]
            for t in tasks
            if not os.path.isfile(os.path.join(bundle_dir, "eval_data", t["dataset_uri"]))
        ]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        return f"unreadable core.yaml ({e})"
    return f"missing eval_data files {missing}" if missing else None


def _zip_problem(zip_path: str) -> str | None:
    """None if zip_path is a complete eval bundle archive (CRC of every member checked)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return f"CRC error in {bad}"
            if "eval_bundle/core.yaml" not in zf.namelist():
                return "no eval_bundle/core.yaml inside"
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        return f"not a valid zip ({e})"
    return None


def _place_bundle(zip_path: str, bundle_dir: str) -> None:
    """Unzip next to the final location, check it, then swap it in (readers never see a half-written bundle)."""
    parent = os.path.dirname(bundle_dir)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".eval_bundle_") as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        extracted = os.path.join(tmp, "eval_bundle")
        problem = _bundle_problem(extracted)
        if problem:
            raise NanochatError(f"the eval bundle archive {zip_path} is incomplete: {problem}")
        if os.path.exists(bundle_dir):
            shutil.rmtree(bundle_dir)
        os.replace(extracted, bundle_dir)
    print0(f"Placed eval_bundle directory at {bundle_dir}")


def _download(url: str, path: str) -> None:
    print0(f"Downloading {url}...")
    with urllib.request.urlopen(url, timeout=120) as response, open(path + ".tmp", "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)
    os.replace(path + ".tmp", path)


def ensure_eval_bundle(url: str | None = None, attempts: int = 3) -> str:
    """Path of a verified `eval_bundle/` directory, downloading and unzipping it if needed.

    A corrupt or truncated eval_bundle.zip (or a half-extracted directory) is deleted and fetched again rather
    than used; after `attempts` bad downloads a NanochatError says so.
    """
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL)
    bundle_dir = eval_bundle_dir()
    if _bundle_problem(bundle_dir) is None:
        return bundle_dir
    zip_path = os.path.join(get_local_cache_dir(), "eval_bundle.zip")
    with FileLock(zip_path + ".lock"):
        if _bundle_problem(bundle_dir) is None:  # another process placed it while we waited
            return bundle_dir
        for attempt in range(attempts):
            if os.path.exists(zip_path):
                problem = _zip_problem(zip_path)
                if problem is None:
                    _place_bundle(zip_path, bundle_dir)
                    return bundle_dir
                print0(f"eval_bundle.zip is corrupt ({problem}); deleting it and downloading again")
                os.remove(zip_path)
            try:
                _download(url, zip_path)
            except (OSError, http.client.HTTPException) as e:  # URLError/HTTPError are OSErrors
                print0(f"download of {url} failed ({e}), attempt {attempt + 1}/{attempts}")
        if os.path.exists(zip_path) and _zip_problem(zip_path) is None:
            _place_bundle(zip_path, bundle_dir)
            return bundle_dir
    raise NanochatError(
        f"could not get a valid eval bundle from {url} after {attempts} attempts. Check the network, or set "
        "NANOCHAT_EVAL_BUNDLE_URL, or unzip the bundle yourself into " + bundle_dir
    )


# -----------------------------------------------------------------------------
# CORE over the bundle


def load_core_tasks(bundle_dir: str) -> list[dict]:
    """Task metadata from core.yaml joined with the random baselines of eval_meta_data.csv."""
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        tasks.append(
            {
                "label": t["label"],
                "task_type": t["icl_task_type"],
                "dataset_uri": t["dataset_uri"],
                "num_fewshot": t["num_fewshot"][0],
                "continuation_delimiter": t.get("continuation_delimiter", " "),
                "random_baseline": baselines[t["label"]],
            }
        )
    return tasks


def load_task_examples(bundle_dir: str, task_meta: dict, max_per_task: int = -1) -> tuple[list, list, dict]:
    """(data, fewshot pool, task_meta) for one task: rows shuffled with Random(1337), truncated to max_per_task.

    The pool is `data` itself (upstream) unless truncation left fewer than k+1 rows for k-shot prompts; then it
    is the whole shuffled file. If even that is too small, k is lowered to rows - 1 (with a note).
    """
    path = os.path.join(bundle_dir, "eval_data", task_meta["dataset_uri"])
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(rows)
    data = rows[:max_per_task] if max_per_task > 0 else rows
    k = task_meta["num_fewshot"]
    pool = data if len(data) > k else rows
    if len(pool) <= k:
        print0(f"note: {task_meta['label']} has {len(pool)} rows, too few for {k}-shot; using {len(pool) - 1}-shot")
        task_meta = {**task_meta, "num_fewshot": max(0, len(pool) - 1)}
    return data, pool, task_meta


def select_tasks(tasks: list[dict], labels: list[str] | None) -> list[dict]:
    if not labels:
        return tasks
    known = [t["label"] for t in tasks]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise NanochatError(f"unknown CORE task(s) {unknown}; valid: {', '.join(known)}")
    return [t for t in tasks if t["label"] in labels]


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, labels=None, bundle_url=None) -> dict:
    """CORE over every bundle task (or `labels`), in this process. Same printout and result as upstream."""
    bundle_dir = ensure_eval_bundle(bundle_url)
    results, centered = {}, {}
    for task in select_tasks(load_core_tasks(bundle_dir), labels):
        t0 = time.time()
        print0(f"Evaluating: {task['label']} ({task['num_fewshot']}-shot, type: {task['task_type']})... ", end="")
        data, pool, meta = load_task_examples(bundle_dir, task, max_per_task)
        acc = evaluate_task(model, tokenizer, data, device, meta, pool=pool)
        results[task["label"]] = acc
        centered[task["label"]] = centered_result(acc, task["random_baseline"])
        print0(f"accuracy: {acc:.4f} | centered: {centered[task['label']]:.4f} | time: {time.time() - t0:.2f}s")
    return core_summary(results, centered)


def core_summary(results: dict, centered: dict) -> dict:
    return {"results": results, "centered_results": centered, "core_metric": sum(centered.values()) / len(centered)}


def format_core_csv(core: dict) -> str:
    """The text of upstream's base_eval/base_model_XXXXXX.csv (padded columns, final CORE row)."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, acc in core["results"].items():
        lines.append(f"{label:<35}, {acc:<10.6f}, {core['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {core['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"
