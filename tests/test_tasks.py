"""Chat tasks: Task views and mixtures, the HF-parquet loader over loopback HTTP (manifest, lock, retries, offline
dir), every task's example format and scoring, and HumanEval's code execution (pass, fail, timeout, memory).

python -m pytest tests/test_tasks.py -q
"""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from nanochat.common import NanochatError
from nanochat.tasks.common import HubDataset, Task, TaskMixture, TaskSequence, load_hub_dataset, render_mc
from tests.eval_fixtures import serve_fixtures


class ToyTask(Task):
    def __init__(self, n=10, tag="a", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"i": index, "tag": self.tag}


# -----------------------------------------------------------------------------
# Views and combinators


def test_task_views():
    assert [ToyTask(10, start=5)[i]["i"] for i in range(len(ToyTask(10, start=5)))] == [5, 6, 7, 8, 9]
    view = ToyTask(10, start=0, stop=10, step=3)
    assert len(view) == 4 and [view[i]["i"] for i in range(4)] == [0, 3, 6, 9]
    assert len(ToyTask(10, start=1, stop=8, step=3)) == 3  # 1, 4, 7
    with pytest.raises(ValueError, match="step"):
        ToyTask(10, step=0)


def test_mixture_deterministic_complete_interleaved_and_oversampled():
    make = lambda: TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")])
    a, b = make(), make()
    examples = [a[i] for i in range(len(a))]
    assert sorted((e["tag"], e["i"]) for e in examples) == [("a", i) for i in range(3)] + [("b", i) for i in range(5)]
    assert examples == [b[i] for i in range(len(b))]
    assert [e["tag"] for e in examples] != ["a"] * 3 + ["b"] * 5
    assert len(TaskMixture([ToyTask(3), ToyTask(3)])) == 6


def test_sequence_concatenates_in_order():
    seq = TaskSequence([ToyTask(2, "a"), ToyTask(3, "b")])
    assert [(seq[i]["tag"], seq[i]["i"]) for i in range(5)] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]


def test_hub_dataset_shuffle_is_numpy_permutation():
    table = pa.table({"x": list(range(50)), "y": [str(i) for i in range(50)]})
    assert HubDataset(table)[7] == {"x": 7, "y": "7"}
    ds = HubDataset(table).shuffle(seed=42)
    assert [ds[i]["x"] for i in range(50)] == [int(p) for p in np.random.default_rng(42).permutation(50)]


def test_render_mc_exact():
    assert render_mc("What is 1+1?", ("A", "B"), ("1", "2")) == (
        "Multiple Choice question: What is 1+1?\n- 1=A\n- 2=B\n\nRespond only with the letter of the correct answer."
    )


# -----------------------------------------------------------------------------
# The parquet loader over a real loopback HTTP server


@pytest.fixture
def hub(tmp_path, base_dir, monkeypatch):
    root = tmp_path / "served"
    server = serve_fixtures(root)
    monkeypatch.setenv("NANOCHAT_TASK_DATA_URL", server.base_url)
    monkeypatch.setenv("NANOCHAT_WORD_LIST_URL", server.url("words_alpha.txt"))
    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    server.root_path = root
    yield server
    server.stop()


LISTING = "api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"
SHARDS = ["files/allenai/ai2_arc/ARC-Easy/test/0000.parquet", "files/allenai/ai2_arc/ARC-Easy/test/0001.parquet"]


def test_download_manifest_and_cache(hub, base_dir):
    ds = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    assert len(ds) == 24 and ds[14]["id"] == "easy_14"  # two shards, concatenated in order
    shards_dir = base_dir / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    assert json.loads((shards_dir / "manifest.json").read_text()) == ["00000.parquet", "00001.parquet"]
    assert (shards_dir / "manifest.json.lock").exists()
    assert dict(hub.requests) == {LISTING: 1, SHARDS[0]: 1, SHARDS[1]: 1}
    assert len(load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")) == 24
    assert sum(hub.requests.values()) == 3  # second load: no network


def test_transient_errors_are_retried_and_bad_shards_never_cached(hub, base_dir):
    hub.fail(LISTING, "500")
    hub.fail(SHARDS[0], "truncate", "garbage")
    ds = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    assert len(ds) == 24
    assert hub.requests[SHARDS[0]] == 3 and hub.requests[LISTING] == 2


def test_persistent_failure_is_a_clear_error(hub, base_dir):
    hub.fail(LISTING, "500*")
    with pytest.raises(NanochatError, match="NANOCHAT_TASK_DATA_DIR"):
        load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    assert not (base_dir / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test" / "manifest.json").exists()


def test_offline_task_data_dir(hub, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(hub.root_path / "task_data"))
    assert len(load_hub_dataset("cais/mmlu", "all", "test")) == 16
    assert sum(hub.requests.values()) == 0
    with pytest.raises(NanochatError, match="manifest.json not found"):
        load_hub_dataset("cais/mmlu", "all", "validation")


# -----------------------------------------------------------------------------
# Each task's examples and scoring


def test_arc(hub):
    from nanochat.tasks.arc import ARC

    task = ARC("ARC-Easy", "test")
    assert task.eval_type == "categorical" and len(task) == 24
    ex = task[0]
    user, assistant = ex["messages"]
    assert user["content"].startswith("Multiple Choice question: Which color is the ")
    assert assistant["content"] in ex["letters"] and task.evaluate(ex, assistant["content"])
    wrong = next(letter for letter in ex["letters"] if letter != assistant["content"])
    assert not task.evaluate(ex, wrong)
    assert any(task[i]["letters"] == ["1", "2", "3", "4"] for i in range(len(task)))  # digit-labelled rows survive
    with pytest.raises(ValueError, match="ARC-Easy or ARC-Challenge"):
        ARC("ARC-Hard", "test")


def test_mmlu(hub):
    from nanochat.tasks.mmlu import MMLU

    task = MMLU("all", "test")
    for i in range(len(task)):
        ex = task[i]
        question = ex["messages"][0]["content"].split("\n")[0]
        n = int(question.split("What is ")[1].split(" ")[0])
        correct_line = next(line for line in ex["messages"][0]["content"].split("\n") if line.startswith(f"- {2 * n}="))
        assert ex["messages"][1]["content"] == correct_line[-1]  # the letter after '=' is the answer
        assert task.evaluate(ex, correct_line[-1]) and ex["subject"].endswith("mathematics")


def test_gsm8k_parts_and_scoring(hub):
    from nanochat.tasks.gsm8k import GSM8K, answer_to_parts, extract_answer

    assert answer_to_parts("A <<2+3=5>>5 b <<x>>.\n#### 5") == [
        {"type": "text", "text": "A "},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "5 b "},
        {"type": "python", "text": "x"},
        {"type": "python_output", "text": ""},
        {"type": "text", "text": ".\n#### 5"},
    ]
    assert extract_answer("so #### 1,234 done") == "1234" and extract_answer("no marker") is None
    task = GSM8K("main", "test")
    ex = task[0]
    answer = extract_answer(ex["messages"][1]["content"][-1]["text"])
    assert task.evaluate(ex, f"blah #### {answer}") == 1 and task.reward(ex, "#### -1") == 0.0


def test_smoltalk_and_customjson(hub, tmp_path):
    from nanochat.tasks.customjson import CustomJSON
    from nanochat.tasks.smoltalk import SmolTalk

    talk = SmolTalk("train")
    assert len(talk) == 12 and all(talk[i]["messages"][-1]["role"] == "assistant" for i in range(12))
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) + "\n\n")
    assert len(CustomJSON(str(good))) == 1
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]) + "\n")
    with pytest.raises(ValueError, match="b.jsonl:1"):
        CustomJSON(str(bad))
    assert len(CustomJSON(str(tmp_path / "missing.jsonl"))) == 0


def test_spellingbee_reference_answers_score_correct(hub, base_dir):
    from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

    task = SpellingBee(size=20, split="test")
    assert (base_dir / "words_alpha.txt").exists()
    for i in range(20):
        ex = task[i]
        parts = ex["messages"][1]["content"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        assert parts[3]["text"] == str(word.count(letter))
        assert task.evaluate(ex, parts[-1]["text"]) == 1 and task.evaluate(ex, "#### 99") == 0
    assert task[5] == SpellingBee(size=20, split="test")[5] and task[5] != SpellingBee(size=20, split="train")[5]
    assert SimpleSpelling(size=3)[0]["messages"][1]["content"].count(",") >= 1


# -----------------------------------------------------------------------------
# HumanEval: real programs through the sandbox


def test_humaneval_reference_solutions_pass(hub):
    from nanochat.tasks.humaneval import HumanEval

    task = HumanEval()
    assert task.eval_type == "generative" and len(task) == 5
    for i in range(len(task)):
        ex = task[i]
        reference = ex["messages"][1]["content"]
        assert task.evaluate(ex, reference), ex["entry_point"]
        assert task.evaluate(ex, f"Here you go:\n```python\n{reference}\n```\nDone.")  # fenced block extracted


def test_humaneval_failing_programs_fail(hub):
    from nanochat.tasks.humaneval import HumanEval

    task = HumanEval()
    ex = next(task[i] for i in range(len(task)) if task[i]["entry_point"] == "add")
    assert not task.evaluate(ex, "def add(x, y):\n    return x - y")  # wrong answer
    assert not task.evaluate(ex, "def add(x, y) return")  # syntax error
    assert not task.evaluate(ex, "def add(x, y):\n    raise RuntimeError('no')")


def test_humaneval_timeout_and_memory_limit(hub):
    import time

    from nanochat.execution import execute_code
    from nanochat.tasks.humaneval import HumanEval

    task = HumanEval(timeout=1.0, maximum_memory_bytes=128 * 1024 * 1024)
    ex = next(task[i] for i in range(len(task)) if task[i]["entry_point"] == "add")
    t0 = time.time()
    assert not task.evaluate(ex, "def add(x, y):\n    while True:\n        pass")
    assert time.time() - t0 < 60  # does not hang: the 1 s timeout fired (without it this never returns)
    hog = "def add(x, y):\n    blob = bytearray(1024 * 1024 * 1024)\n    return x + y"
    assert not task.evaluate(ex, hog)
    looping = execute_code("while True:\n    pass", timeout=1.0)
    assert looping.timeout and not looping.success
    hogging = execute_code("x = bytearray(1024 * 1024 * 1024)", maximum_memory_bytes=128 * 1024 * 1024)
    assert hogging.memory_exceeded and not hogging.success
    assert execute_code("print(sum(range(10)))").stdout.strip() == "45"


def test_unknown_task_names_list_valid_ones():
    from nanochat.chat_eval import TASK_NAMES, parse_task_names

    assert parse_task_names(None) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
    assert parse_task_names("ARC-Easy|GSM8K") == ["ARC-Easy", "GSM8K"]
    with pytest.raises(NanochatError) as e:
        parse_task_names("ARC-Easy|Jeopardy")
    assert "Jeopardy" in str(e.value) and all(name in str(e.value) for name in TASK_NAMES)


def test_chat_eval_cli_bad_input(base_dir, capsys):
    from ray_jobs import chat_eval

    with pytest.raises(SystemExit) as e:
        chat_eval.main(["-i", "sft", "-a", "ARC-Easy|Nope", "--local"])
    assert e.value.code == 2 and "valid: ARC-Easy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        chat_eval.main(["-i", "sft", "-a", "ARC-Easy", "--local"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ray_jobs.chat_sft" in err and "Traceback" not in err
    assert not os.path.exists(base_dir / "chat_eval")


def test_generative_eval_progress_is_one_line_per_tenth_off_a_terminal(capsys, monkeypatch):
    """Ray task and job logs turn each '\\r' rewrite into a new line: 100 problems printed 100 progress lines."""
    from nanochat.chat_eval import _progress_printer

    tick, tty = _progress_printer(rank=0, total=25)
    for _ in range(25):
        tick(1)
    lines = capsys.readouterr().out.splitlines()
    assert not tty and lines == [f"Rank 0 | {n}/25 done" for n in (*range(2, 25, 2), 25)]

    tick, _ = _progress_printer(rank=1, total=7)
    tick(3), tick(4)  # several problems per call still print each milestone once
    assert capsys.readouterr().out.splitlines() == ["Rank 1 | 3/7 done", "Rank 1 | 7/7 done"]

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    tick, tty = _progress_printer(rank=0, total=3)
    for _ in range(3):
        tick(1)
    assert tty and capsys.readouterr().out == "".join(f"\r\033[KRank 0 | {n} done" for n in (1, 2, 3))
