"""
Build small evaluation fixtures in the exact upstream formats, for tests and offline demos.

    python dev/make_eval_fixtures.py OUT_DIR [--base-url http://127.0.0.1:PORT]

Writes (all deterministic):
    OUT_DIR/eval_bundle.zip            mini DCLM bundle: eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/...}
                                       with one task of every CORE type (multiple_choice, schema, language_modeling)
    OUT_DIR/words_alpha.txt            a short word list for SpellingBee
    OUT_DIR/files/<repo>/<subset>/<split>/NNNN.parquet      parquet shards with the Hub's column schemas
    OUT_DIR/api/datasets/<repo>/parquet/<subset>/<split>    the Hub listing (JSON list of shard URLs under base-url)
    OUT_DIR/task_data/<org--name>/<subset>/<split>/{00000.parquet, manifest.json}   offline layout for
                                                            NANOCHAT_TASK_DATA_DIR
Serve OUT_DIR over HTTP at base-url and point NANOCHAT_EVAL_BUNDLE_URL / NANOCHAT_TASK_DATA_URL /
NANOCHAT_WORD_LIST_URL at it to exercise the real download paths.
"""

import argparse
import io
import json
import os
import random
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq

# -----------------------------------------------------------------------------
# Mini CORE bundle: label -> (dataset_uri, num_fewshot, icl_task_type, continuation_delimiter, random baseline %)

CORE_TASKS = {
    "arc_easy": ("world_knowledge/arc_easy.jsonl", 10, "multiple_choice", "\nAnswer: ", 25.0),
    "copa": ("commonsense_reasoning/copa.jsonl", 0, "multiple_choice", " ", 50.0),
    "winograd": ("language_understanding/winograd_wsc.jsonl", 0, "schema", " ", 50.0),
    "lambada_openai": ("language_understanding/lambada_openai.jsonl", 0, "language_modeling", " ", 0.0),
    "bigbench_operators": ("symbolic_problem_solving/bigbench_operators.jsonl", 3, "language_modeling", " ", 0.0),
}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
ANIMALS = ["cat", "dog", "cow", "horse", "sheep", "goat", "duck", "mouse"]


def _mc_rows(rng, n):
    rows = []
    for i in range(n):
        animal = ANIMALS[i % len(ANIMALS)]
        choices = rng.sample(COLORS, 4)
        rows.append(
            {
                "query": f"Question: Which color is the {animal} number {i}?",
                "choices": choices,
                "gold": rng.randrange(4),
            }
        )
    return rows


def _copa_rows(rng, n):
    rows = []
    for i in range(n):
        a, b = rng.sample(ANIMALS, 2)
        rows.append(
            {
                "query": f"The {a} ran away from the {b} because",
                "choices": ["it was scared.", "it was hungry."],
                "gold": i % 2,
            }
        )
    return rows


def _schema_rows(rng, n):
    rows = []
    for _ in range(n):
        a, b = rng.sample(ANIMALS, 2)
        rows.append(
            {
                "context_options": [
                    f"The {a} chased the {b} because the {a}",
                    f"The {a} chased the {b} because the {b}",
                ],
                "continuation": "was fast.",
                "gold": rng.randrange(2),
            }
        )
    return rows


def _lm_rows(rng, n):
    rows = []
    for i in range(n):
        animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
        # trailing whitespace on purpose: real bundle contexts carry it and rendering must trim it
        rows.append({"context": f"The {animal} {i} was painted bright {color} and then the  ", "continuation": animal})
    return rows


def _operator_rows(rng, n):
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"context": f"{a} plus {b} =", "continuation": str(a + b)})
    return rows


def core_bundle_files(n_rows: int = 16) -> dict[str, bytes]:
    """{path inside the zip: content} of a mini bundle with every task type."""
    rng = random.Random(0)
    makers = {
        "arc_easy": _mc_rows, "copa": _copa_rows, "winograd": _schema_rows,
        "lambada_openai": _lm_rows, "bigbench_operators": _operator_rows,
    }  # fmt: skip
    files, icl_tasks, meta_rows = {}, [], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline"]
    for label, (uri, shots, kind, delim, baseline) in CORE_TASKS.items():
        rows = makers[label](rng, n_rows)
        files[f"eval_bundle/eval_data/{uri}"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        icl_tasks.append(
            f"- label: {label}\n  dataset_uri: {uri}\n  num_fewshot: [{shots}]\n  icl_task_type: {kind}\n"
            f"  continuation_delimiter: {json.dumps(delim)}\n"
        )
        meta_rows.append(f"{label},{uri.split('/')[0]},{kind},{shots},{n_rows},{baseline}")
    files["eval_bundle/core.yaml"] = ("icl_tasks:\n" + "".join(icl_tasks)).encode()
    files["eval_bundle/eval_meta_data.csv"] = ("\n".join(meta_rows) + "\n").encode()
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            zf.writestr(name, files[name])
    return buf.getvalue()


# -----------------------------------------------------------------------------
# Chat task tables with the Hub parquet export's schemas

HUMANEVAL_PROBLEMS = [
    # (entry_point, prompt, canonical_solution, test)
    (
        "add",
        'from typing import List\n\n\ndef add(x: int, y: int) -> int:\n    """Add two numbers.\n    >>> add(2, 3)\n    5\n    """\n',
        "    return x + y\n",
        "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    ),
    (
        "sum_list",
        'from typing import List\n\n\ndef sum_list(xs: List[int]) -> int:\n    """Sum of a list.\n    >>> sum_list([1, 2])\n    3\n    """\n',
        "    return sum(xs)\n",
        "\n\ndef check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
    ),
    (
        "is_palindrome",
        'def is_palindrome(text: str) -> bool:\n    """True if text reads the same backwards.\n    >>> is_palindrome("aba")\n    True\n    """\n',
        "    return text == text[::-1]\n",
        "\n\ndef check(candidate):\n    assert candidate('aba')\n    assert not candidate('ab')\n",
    ),
    (
        "sqrt_floor",
        'import math\n\n\ndef sqrt_floor(n: int) -> int:\n    """Integer square root.\n    >>> sqrt_floor(10)\n    3\n    """\n',
        "    return math.isqrt(n)\n",
        "\n\ndef check(candidate):\n    assert candidate(10) == 3\n    assert candidate(16) == 4\n",
    ),
    (
        "count_vowels",
        'def count_vowels(s: str) -> int:\n    """Number of vowels in s.\n    >>> count_vowels("hello")\n    2\n    """\n',
        "    return sum(c in 'aeiou' for c in s.lower())\n",
        "\n\ndef check(candidate):\n    assert candidate('hello') == 2\n    assert candidate('xyz') == 0\n",
    ),
]


def _arc_table(rng, n, prefix):
    rows = {"id": [], "question": [], "choices": [], "answerKey": []}
    for i in range(n):
        labels = ["A", "B", "C", "D"] if i % 5 else ["1", "2", "3", "4"]  # a few real ARC rows use digits
        rows["id"].append(f"{prefix}_{i}")
        rows["question"].append(f"Which color is the {ANIMALS[i % len(ANIMALS)]} in picture {i}?")
        rows["choices"].append({"text": rng.sample(COLORS, 4), "label": labels})
        rows["answerKey"].append(labels[rng.randrange(4)])
    return pa.table(rows)


def _mmlu_table(rng, n):
    rows = {"question": [], "subject": [], "choices": [], "answer": []}
    for i in range(n):
        rows["question"].append(f"What is {i} plus {i}?")
        rows["subject"].append(["elementary_mathematics", "high_school_mathematics"][i % 2])
        options = [str(2 * i + d) for d in (0, 1, 2, 3)]
        rng.shuffle(options)
        rows["choices"].append(options)
        rows["answer"].append(options.index(str(2 * i)))
    return pa.table(rows)


def _gsm8k_table(n, offset=0):
    rows = {"question": [], "answer": []}
    for i in range(offset, offset + n):
        a, b = 3 + i, 4 + 2 * i
        rows["question"].append(f"Tom has {a} apples and buys {b} more. How many apples does he have?")
        rows["answer"].append(f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}")
    return pa.table(rows)


def _humaneval_table():
    cols = {"task_id": [], "prompt": [], "canonical_solution": [], "test": [], "entry_point": []}
    for i, (entry, prompt, solution, test) in enumerate(HUMANEVAL_PROBLEMS):
        for key, value in zip(cols, (f"HumanEval/{i}", prompt, solution, test, entry)):
            cols[key].append(value)
    return pa.table(cols)


def _smoltalk_table(n):
    messages = []
    for i in range(n):
        convo = [{"content": f"Say hi number {i}", "role": "user"}, {"content": f"Hi {i}!", "role": "assistant"}]
        if i % 3 == 0:
            convo.insert(0, {"content": "You are terse.", "role": "system"})
        messages.append(convo)
    return pa.table({"messages": messages, "source": ["fixture"] * n})


def task_tables() -> dict[tuple[str, str, str], list[pa.Table]]:
    """(repo, subset, split) -> shards. ARC-Easy comes in two shards to exercise shard concatenation. The training
    splits (MMLU auxiliary_train, GSM8K train) feed upstream's SFT mixture and RL in make_upstream_fixtures_eval."""
    rng = random.Random(1)
    arc_easy = _arc_table(rng, 24, "easy")
    train_rng = random.Random(2)  # its own generator: the tables above stay what they were
    return {
        ("cais/mmlu", "all", "auxiliary_train"): [_mmlu_table(train_rng, 8)],
        ("openai/gsm8k", "main", "train"): [_gsm8k_table(4, offset=20)],
        ("allenai/ai2_arc", "ARC-Easy", "test"): [arc_easy.slice(0, 14), arc_easy.slice(14)],
        ("allenai/ai2_arc", "ARC-Challenge", "test"): [_arc_table(rng, 10, "challenge")],
        ("cais/mmlu", "all", "test"): [_mmlu_table(rng, 16)],
        ("openai/gsm8k", "main", "test"): [_gsm8k_table(8)],
        ("openai/openai_humaneval", "openai_humaneval", "test"): [_humaneval_table()],
        ("HuggingFaceTB/smol-smoltalk", "default", "train"): [_smoltalk_table(12)],
        ("HuggingFaceTB/smol-smoltalk", "default", "test"): [_smoltalk_table(6)],
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


WORDS = ["apple", "banana", "strawberry", "letter", "mississippi", "bookkeeper", "rhythm", "queue", "level", "tree"]


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def build(out_dir: str, base_url: str = "http://127.0.0.1:8000", n_core_rows: int = 16) -> dict:
    """Write every fixture under out_dir; returns {"bundle_zip", "task_data_dir", "core_files"}."""
    core_files = core_bundle_files(n_core_rows)
    _write(os.path.join(out_dir, "eval_bundle.zip"), zip_bytes(core_files))
    _write(os.path.join(out_dir, "words_alpha.txt"), ("\n".join(WORDS) + "\n").encode())
    for (repo, subset, split), shards in task_tables().items():
        urls, names = [], []
        for i, table in enumerate(shards):
            data = _parquet_bytes(table)
            rel = f"files/{repo}/{subset}/{split}/{i:04d}.parquet"
            _write(os.path.join(out_dir, rel), data)
            urls.append(f"{base_url.rstrip('/')}/{rel}")
            names.append(f"{i:05d}.parquet")
            _write(os.path.join(out_dir, "task_data", repo.replace("/", "--"), subset, split, names[-1]), data)
        _write(os.path.join(out_dir, f"api/datasets/{repo}/parquet/{subset}/{split}"), json.dumps(urls).encode())
        manifest = os.path.join(out_dir, "task_data", repo.replace("/", "--"), subset, split, "manifest.json")
        _write(manifest, json.dumps(names).encode())
    return {
        "bundle_zip": os.path.join(out_dir, "eval_bundle.zip"),
        "task_data_dir": os.path.join(out_dir, "task_data"),
        "core_files": core_files,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="where OUT_DIR will be served")
    args = parser.parse_args()
    build(args.out_dir, args.base_url)
    print(f"wrote eval fixtures to {args.out_dir}")
