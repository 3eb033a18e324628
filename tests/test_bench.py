"""python -m pytest tests/test_bench.py -q

Every benchmark in bench/ runs at toy sizes, as a user runs it (`python bench/NAME.py ...`), exits 0 and prints a
JSON object as its last line. The numbers are not checked (benchmarks measure, tests do not); the point is that
each documented command still works end to end. A new bench script needs an entry in TOY_FLAGS. bench_gpu.py runs
its CPU smoke plan on a tiny base dir (shards + tokenizer), and on a machine without CUDA it says so and measures
nothing (exit 0, a JSON line) instead of failing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.ray]  # bench_data, bench_eval, bench_train (and serve --http) start Ray

TOY_FLAGS = {  # the smallest sizes each benchmark accepts (no --upstream: that needs a checkout)
    "bench_checkpoint.py": ["--depth", "1", "--seq", "32", "--batch", "2", "--total", "64", "--vocab", "256",
                            "--steps", "4", "--save-every", "2"],
    "bench_data.py": ["--vocab-size", "300", "-B", "2", "-T", "64", "--batches", "4", "--copies", "1", "--cpus", "2",
                      "--actors", "1"],
    "bench_engine.py": ["--depth", "1", "--vocab-size", "512", "--sequence-len", "128", "--prompt-len", "8",
                        "--decode-tokens", "4", "--batch-sizes", "1", "--repeats", "1", "--rounds", "1"],
    "bench_eval.py": ["--depth", "1", "--width", "64", "--rows", "4", "--shards-per-task", "1"],
    "bench_gpu.py": ["--device", "cpu", "--smoke"],  # its own toy plan: d2, T 128, 6 steps, ours only
    "bench_model.py": ["--depth", "1", "--seq-len", "64", "--vocab", "512", "--batch-size", "1", "--steps", "1",
                       "--warmup", "0", "--window-pattern", "L"],
    "bench_serve.py": ["--depth", "1", "--sequence-len", "64", "--prompt-len", "8", "--concurrency", "1",
                       "--requests-per-level", "2", "--max-tokens", "4", "--conversations", "0"],  # prompt < context
    "bench_tokenizer.py": ["--max-chars", "20000", "--vocab-size", "300", "--repeats", "1"],
    "bench_train.py": ["--steps", "3", "--depth", "1", "--seq", "32", "--batch", "2", "--total", "128",
                       "--compile", "0"],  # its rate is the median step time after 2 warm-up steps: 3 steps at least
}  # fmt: skip


def run_bench(script, args, base_dir, timeout=900, **env_extra):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(ROOT), **env_extra}
    env.pop("RAY_ADDRESS", None)  # embedded Ray, never a cluster someone else started
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict) and result, last
    return result


@pytest.fixture(scope="module")
def shards_base(tmp_path_factory):
    """A base dir as bench_gpu expects one: pretraining shards and a trained tokenizer (tiny)."""
    from nanochat.dataset import write_shards
    from tests.eval_fixtures import make_tiny_checkpoint

    base = tmp_path_factory.mktemp("bench_base")
    make_tiny_checkpoint(str(base))  # its tokenizer (the checkpoint is not used)
    docs = [
        f"Document {i}: the {['cat', 'dog', 'cow'][i % 3]} sat on mat number {i}. " * (1 + i % 4) for i in range(400)
    ]
    write_shards(docs, str(base / "base_data_climbmix"), docs_per_shard=128, val_docs=64, row_group_size=16)
    return base


def test_every_benchmark_has_toy_flags():
    scripts = {p.name for p in (ROOT / "bench").glob("bench_*.py")}
    assert scripts <= set(TOY_FLAGS), f"add toy-size flags for {sorted(scripts - set(TOY_FLAGS))} to TOY_FLAGS"


@pytest.mark.parametrize("script", sorted(TOY_FLAGS))
def test_benchmark_runs_at_toy_size_and_prints_json_last(script, tmp_path, shards_base):
    assert (ROOT / "bench" / script).exists(), f"bench/{script} is gone: update TOY_FLAGS"
    args = [*TOY_FLAGS[script], *(["--base-dir", str(tmp_path / "base")] if script == "bench_train.py" else [])]
    result = last_json(run_bench(script, args, shards_base if script == "bench_gpu.py" else tmp_path / "nanochat"))
    if script == "bench_gpu.py":  # a failed run is a row with an error, not an exit code: it must have measured
        (row,) = result["results"]
        assert "error" not in row and row["tok_per_sec"] > 0 and row["steps_seen"] == 6, row


def test_bench_gpu_without_cuda_measures_nothing_and_says_so(shards_base):
    proc = run_bench("bench_gpu.py", [], shards_base, timeout=300, CUDA_VISIBLE_DEVICES="")
    assert last_json(proc) == {"skipped": "no CUDA device", "results": []}
    assert "no CUDA device here" in proc.stdout and "--device cpu --smoke" in proc.stdout


def test_bench_gpu_without_shards_names_the_fix(tmp_path):
    proc = run_bench("bench_gpu.py", ["--device", "cpu", "--smoke"], tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "set NANOCHAT_BASE_DIR" in proc.stderr and "base_data_climbmix" in proc.stderr


@pytest.mark.parametrize("script,args,fix", [
    ("bench_train.py", ["--steps", "2"], "--steps must be at least 3"),
    ("bench_serve.py", ["--sequence-len", "64", "--prompt-len", "64"], "raise --sequence-len"),
])  # fmt: skip
def test_bad_sizes_name_the_fix_in_one_line(script, args, fix, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fix in proc.stderr, proc.stderr
