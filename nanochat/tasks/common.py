"""
Task containers and the HuggingFace-parquet dataset loader shared by every chat task.

A Task is an indexable collection of conversations (`{"messages": [...], ...}`), optionally with an
evaluation rule. `TaskMixture` interleaves tasks for SFT, `TaskSequence` concatenates them for curricula.

Datasets come from the Hub's auto-generated parquet export, exactly as upstream nanochat does it:
    GET {endpoint}/api/datasets/{repo}/parquet/{subset}/{split}  -> JSON list of shard URLs
and each shard is cached under `<local cache>/task_data/<org--name>/<subset>/<split>/{00000.parquet, ...}`.
`manifest.json` (a JSON list of shard file names) is written last, under a file lock, so its presence means
"download complete" and concurrent processes on one machine download only once.

Offline / test overrides (read at call time, so Ray workers see what the driver forwards):
    NANOCHAT_TASK_DATA_DIR=/path   read `<path>/<org--name>/<subset>/<split>/manifest.json` + shards, no network
    NANOCHAT_TASK_DATA_URL=http://127.0.0.1:PORT   use this instead of https://huggingface.co for the listing
"""

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat.common import NanochatError, get_local_cache_dir

HF_ENDPOINT = "https://huggingface.co"
DOWNLOAD_ATTEMPTS = 4  # per shard / listing; transient HTTP errors and truncated bodies are retried


# -----------------------------------------------------------------------------
# HubDataset: a pyarrow table with lazy row access and a datasets-compatible seeded shuffle


class HubDataset:
    """Rows of a pyarrow Table as dicts; `shuffle(seed)` reproduces `datasets.Dataset.shuffle(seed=seed)`."""

    def __init__(self, table: pa.Table, permutation: np.ndarray | None = None):
        self.table = table
        self.permutation = permutation

    def __len__(self) -> int:
        return self.table.num_rows

    def shuffle(self, seed: int) -> "HubDataset":
        # HF datasets draws its index permutation from np.random.default_rng(seed); same generator, same order
        return HubDataset(self.table, np.random.default_rng(seed).permutation(len(self)))

    def __getitem__(self, index: int) -> dict:
        row = index if self.permutation is None else int(self.permutation[index])
        return {name: self.table.column(name)[row].as_py() for name in self.table.column_names}


def _http_get(url: str) -> bytes:
    """GET with retries; a body shorter than Content-Length counts as a failed attempt."""
    last_error = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
                expected = response.headers.get("Content-Length")
                if expected is not None and int(expected) != len(body):
                    raise OSError(f"truncated body: {len(body)} of {expected} bytes")
                return body
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            last_error = e
            time.sleep(0.2 * 2**attempt)
    raise NanochatError(
        f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts ({last_error}). Check the network, or set "
        "NANOCHAT_TASK_DATA_DIR to a local task_data directory (same layout) to work offline."
    )


def _download_shards(repo_id: str, subset: str, split: str, shards_dir: str) -> list[str]:
    endpoint = os.environ.get("NANOCHAT_TASK_DATA_URL", HF_ENDPOINT).rstrip("/")
    listing_url = f"{endpoint}/api/datasets/{repo_id}/parquet/{subset}/{split}"
    shard_urls = json.loads(_http_get(listing_url))
    if not isinstance(shard_urls, list) or not shard_urls:
        raise NanochatError(f"{listing_url} did not return a list of parquet shard URLs: {shard_urls!r}")
    filenames = []
    for i, url in enumerate(shard_urls):
        filename = f"{i:05d}.parquet"
        path = os.path.join(shards_dir, filename)
        print(f"Downloading {url} ...")
        for attempt in range(DOWNLOAD_ATTEMPTS):
            data = _http_get(url)
            try:
                pq.read_metadata(pa.BufferReader(data))  # a corrupt shard must never be cached
                break
            except (pa.ArrowInvalid, OSError):
                if attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise NanochatError(
                        f"{url} is not a valid parquet file (tried {DOWNLOAD_ATTEMPTS} times)"
                    ) from None
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        filenames.append(filename)
    return filenames


def task_data_dir(repo_id: str, subset: str, split: str) -> str:
    """Where the shards of one (repo, subset, split) live: the offline dir if set, else the local cache."""
    root = os.environ.get("NANOCHAT_TASK_DATA_DIR") or os.path.join(get_local_cache_dir(), "task_data")
    return os.path.join(root, repo_id.replace("/", "--"), subset, split)


def load_hub_dataset(repo_id: str, subset: str = "default", split: str = "train") -> HubDataset:
    """Stand-in for `datasets.load_dataset(repo_id, subset, split=split)` built on the Hub's parquet export."""
    shards_dir = task_data_dir(repo_id, subset, split)
    manifest_path = os.path.join(shards_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        if os.environ.get("NANOCHAT_TASK_DATA_DIR"):
            raise NanochatError(
                f"{manifest_path} not found. NANOCHAT_TASK_DATA_DIR must hold <org--name>/<subset>/<split>/"
                f"manifest.json + NNNNN.parquet; unset it to download {repo_id} ({subset}/{split}) from the Hub."
            )
        os.makedirs(shards_dir, exist_ok=True)
        with FileLock(manifest_path + ".lock"):
            if not os.path.exists(manifest_path):  # whoever held the lock before us may have finished the job
                filenames = _download_shards(repo_id, subset, split, shards_dir)
                with open(manifest_path + ".tmp", "w") as f:
                    json.dump(filenames, f)
                os.replace(manifest_path + ".tmp", manifest_path)
    with open(manifest_path) as f:
        filenames = json.load(f)
    tables = [pq.read_table(os.path.join(shards_dir, name)) for name in filenames]
    return HubDataset(pa.concat_tables(tables))


# -----------------------------------------------------------------------------
# Task views and combinators


class Task:
    """A dataset of conversations with a lightweight `start:stop:step` view over it."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(
                f"invalid task view start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1"
            )
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self) -> str:
        """'generative' or 'categorical'."""
        raise NotImplementedError

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str):
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else self.stop
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, index: int) -> dict:
        assert isinstance(index, int), f"task indices are ints, got {type(index)}"
        return self.get_example(self.start + index * self.step)


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (seed 42). Repeat a task to oversample it."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(t) for t in tasks]
        self.index_map = [(ti, li) for ti, n in enumerate(self.lengths) for li in range(n)]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        assert 0 <= index < len(self.index_map), f"index {index} outside mixture of {len(self.index_map)}"
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """Tasks one after another (curriculum order)."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(t) for t in tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        assert 0 <= index < self.num_examples(), f"index {index} outside sequence of {self.num_examples()}"
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise AssertionError("unreachable")


def render_mc(question: str, letters, choices) -> str:
    """Multiple-choice prompt with each letter right after its choice and '=' (no space), e.g. `- Paris=A`.

    Small models bind the answer better when the letter follows the choice, and the prompt's "A" must be the
    same token as the bare "A" the assistant answers with (" A" is a different token).
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."
