"""Evaluation fan-out on a real local Ray cluster: 2 workers give exactly the sequential numbers (CORE, chat,
bpb) and upstream's own numbers on its fixture, a worker SIGKILLed mid-evaluation is retried without changing them,
the entry points and the async launch used by training work (it returns while no task can start), and workers load
checkpoints from an S3 base dir.

python -m pytest tests/test_eval_fanout.py -q
"""

import json
import os

import pytest
import ray
import torch

from nanochat.chat_eval import categorical_counts, make_task, run_chat_eval
from nanochat.core_eval import evaluate_core
from ray_jobs import eval_fanout as fan
from tests.eval_fixtures import fixture_env, make_tiny_checkpoint, serve_fixtures

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fixture server + a base dir with a tiny base and SFT checkpoint + pretraining shards; one Ray cluster."""
    root = tmp_path_factory.mktemp("eval_fanout")
    server = serve_fixtures(root / "served")
    base = root / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        for k, v in fixture_env(server).items():
            mp.setenv(k, v)
        mp.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        model, tokenizer, ckpt = make_tiny_checkpoint(str(base), step=3)
        sft_model, _, _ = make_tiny_checkpoint(str(base), "chatsft_checkpoints", "d2", step=4, seed=1)
        from nanochat.dataset import get_data_dir, write_shards

        docs = [f"Document {i}: the {['cat', 'dog', 'cow'][i % 3]} sat on mat number {i}. " * 3 for i in range(300)]
        os.makedirs(get_data_dir(), exist_ok=True)
        write_shards(docs, get_data_dir(), docs_per_shard=128, val_docs=64, row_group_size=32)
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        try:
            yield {"root": root, "base": base, "model": model, "tokenizer": tokenizer, "sft": sft_model, "ckpt": ckpt}
        finally:
            ray.shutdown()
            server.stop()
            torch.set_num_threads(previous_threads)


CHAT = dict(max_problems=6, batch_size=4, max_new_tokens=12)


def _units():
    # size-based sharding on top of 2 shards per task: 8 CORE rows / 3 -> 3 shards; 6 problems / 2 -> 3 shards
    # (categorical tasks then have an empty third shard: 2 batches of 4)
    core, tasks = fan.core_units(max_per_task=8, shards_per_task=2, max_shard_examples=3)
    chat = fan.chat_units(["ARC-Easy", "MMLU", "GSM8K", "HumanEval"], shards_per_task=2, max_shard_problems=2, **CHAT)
    assert {u.num_shards for u in core + chat} == {3}
    return core + chat, tasks


def _merged(units, results, tasks):
    return fan.merge_core(units, results, tasks), fan.merge_chat(units, results)


@pytest.fixture(scope="module")
def sequential(env):
    """The reference: upstream-shaped single-process evaluation (no shards, no Ray)."""
    model, tokenizer = env["model"], env["tokenizer"]
    core = evaluate_core(model, tokenizer, "cpu", max_per_task=8)
    chat = {}
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    for name in ["ARC-Easy", "MMLU", "GSM8K", "HumanEval"]:
        chat[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=4, max_new_tokens=12, max_problems=6)
    return core, chat


def test_two_workers_equal_sequential(env, sequential):
    units, tasks = _units()
    ref = fan.ModelRef.from_source("base")
    assert (ref.step, ref.checkpoint_dir) == (3, env["ckpt"])
    seen = {}
    results = fan.run_units(ref, units, num_workers=2, show_progress=True, on_progress=seen.update)
    assert _merged(units, results, tasks) == sequential
    assert _merged(units, fan.run_units_local(ref, units), tasks) == sequential  # shards in-process, too
    assert set(seen) == {u.key for u in units}
    assert all(done == total for done, total, _ in seen.values())  # every unit reported full progress
    assert (
        sum(total for _, total, _ in seen.values()) == 5 * 8 + 3 * 6 + 5
    )  # CORE examples + chat problems (HumanEval has 5)


def test_killed_worker_is_retried_without_changing_results(env, sequential, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("NANOCHAT_EVAL_CRASH_ONCE", str(marker))
    units, tasks = _units()
    seen = {}
    results = fan.run_units(fan.ModelRef.from_source("base"), units, num_workers=2, on_progress=seen.update)
    assert marker.exists()  # a worker really died mid-unit
    assert any(len(pids) >= 2 for _, _, pids in seen.values())  # ...and its unit ran again in a new worker
    assert _merged(units, results, tasks) == sequential


def test_bpb_unit_equals_direct_evaluation(env):
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    model, tokenizer = env["model"], env["tokenizer"]
    units = [fan.make_unit("bpb", s, steps=2, device_batch_size=2, sequence_len=128) for s in ("train", "val")]
    results = fan.run_units(fan.ModelRef.from_source("base"), units, num_workers=2, show_progress=False)
    for unit, res in zip(units, results):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 2, 128, unit.name, device="cpu")
        assert res["bpb"] == evaluate_bpb(model, loader, 2, get_token_bytes("cpu"))
        assert 0 < res["bpb"] < 20


def test_base_eval_entry_point(env, sequential, capsys):
    from nanochat.core_eval import format_core_csv
    from ray_jobs import base_eval

    out = base_eval.main(["--eval", "core,sample", "--max-per-task", "8", "--num-workers", "2",
                          "--shards-per-task", "2", "--no-progress"])  # fmt: skip
    assert out["core"] == sequential[0]
    assert len(out["samples"]) == 7 and len(out["unconditioned_samples"]) == 8
    printed = capsys.readouterr().out
    assert f"CORE metric: {sequential[0]['core_metric']:.4f}" in printed and "| arc_easy | 10 |" in printed
    assert json.loads(printed.strip().splitlines()[-1])["core"] == sequential[0]
    assert (env["base"] / "base_eval" / "base_model_000003.csv").read_text() == format_core_csv(sequential[0])


def test_chat_eval_entry_point(env, capsys):
    from nanochat.engine import Engine
    from ray_jobs import chat_eval

    out = chat_eval.main(["-i", "sft", "-a", "ARC-Challenge|GSM8K", "-x", "5", "-m", "12", "-b", "2",
                          "--num-workers", "2", "--shards-per-task", "2", "--no-progress"])  # fmt: skip
    model, tokenizer = env["sft"], env["tokenizer"]
    engine = Engine(model, tokenizer)
    expected = {n: run_chat_eval(n, model, tokenizer, engine, batch_size=2, max_new_tokens=12, max_problems=5)
                for n in ("ARC-Challenge", "GSM8K")}  # fmt: skip
    assert out["results"] == expected and out["step"] == 4 and out["chatcore"] is None
    printed = capsys.readouterr().out
    assert f"ARC-Challenge accuracy: {100 * expected['ARC-Challenge']:.2f}%" in printed
    assert json.loads((env["base"] / "chat_eval" / "sft_d2_000004.json").read_text())["results"] == expected


def _cpu_gate():
    """An actor holding every free CPU until killed: 1-CPU eval tasks cannot start while it lives."""

    @ray.remote
    class Gate:
        def ready(self):
            return True

    gate = Gate.options(num_cpus=ray.available_resources().get("CPU", 0)).remote()
    ray.get(gate.ready.remote())
    return gate


def test_async_launch_for_training(env, sequential):
    model, tokenizer = env["model"], env["tokenizer"]
    gate = _cpu_gate()
    try:  # launching returns while no evaluation task can even start: it does not wait for them
        core = fan.launch_core_async(fan.ModelRef.from_model(model), max_per_task=8, shards_per_task=2)
        chat = fan.launch_chatcore_async(fan.ModelRef.from_model(model), max_cat=4, max_sample=2, batch_size=4,
                                         max_new_tokens=12)  # fmt: skip
        assert not core.done() and not chat.done()
    finally:
        ray.kill(gate)
    assert core.result(timeout=300) == sequential[0] and core.done()
    got = chat.result(timeout=300)
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    expected = {}
    for name in ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]:
        limit = 4 if name in ("ARC-Easy", "ARC-Challenge", "MMLU") else 2
        expected[name] = run_chat_eval(
            name, model, tokenizer, engine, batch_size=4, max_new_tokens=12, max_problems=limit
        )
    assert got["results"] == expected
    base = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
    assert got["chatcore"] == pytest.approx(sum((expected[t] - b) / (1 - b) for t, b in base.items()) / 5)


def test_fanout_matches_upstream_pipeline_fixture(env, tmp_path, monkeypatch):
    """Sharded Ray evaluation of the base model that upstream evaluated (tests/fixtures/upstream_eval, see
    tests/test_upstream_pipeline.py): CORE and chat accuracies equal upstream's own numbers."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "upstream_eval"
    expected = json.loads((fixture / "expected.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(fixture / "base", base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))  # forwarded to the eval tasks
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(base / "task_data"))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    core, tasks = fan.core_units(shards_per_task=2)
    units = core + fan.chat_units(["ARC-Easy", "ARC-Challenge", "MMLU"], shards_per_task=2, max_problems=24,
                                  batch_size=4) + fan.chat_units(["GSM8K"], shards_per_task=2, max_problems=8,
                                                                 max_new_tokens=24)  # fmt: skip
    results = fan.run_units(fan.ModelRef.from_source("base", "d2", 4), units, num_workers=2, show_progress=False)
    got_core, got_chat = fan.merge_core(units, results, tasks), fan.merge_chat(units, results)
    assert got_core["results"] == expected["core"]["results"]
    assert got_core["core_metric"] == pytest.approx(expected["core"]["core_metric"], abs=1e-12)
    assert got_chat == {name: expected["chat_eval"][name]["accuracy"] for name in got_chat}
    assert set(got_chat) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K"}


def test_workers_load_checkpoint_from_s3(env, monkeypatch):
    from nanochat import storage
    from nanochat.checkpoint_manager import save_checkpoint
    from tests.s3server import S3Server

    with S3Server() as s3:
        s3.apply_env(monkeypatch)
        base = s3.uri("base")
        for name in ("tokenizer.pkl", "token_bytes.pt"):
            storage.write_bytes(storage.join(base, "tokenizer", name), (env["base"] / "tokenizer" / name).read_bytes())
        meta = json.loads((env["base"] / "base_checkpoints" / "d2" / "meta_000003.json").read_text())
        save_checkpoint(storage.join(base, "base_checkpoints", "d2"), 3, env["model"].state_dict(), None, meta)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
        # offline task data (same layout as task_data/): nothing is cached under the S3 base dir's local mirror
        monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(env["root"] / "served" / "task_data"))
        ref = fan.ModelRef.from_source("base")
        assert ref.checkpoint_dir.startswith("s3://")
        units = fan.chat_units(["ARC-Easy"], shards_per_task=2, max_problems=6, batch_size=4)
        results = fan.run_units(ref, units, num_workers=2, show_progress=False)
        task = make_task("ARC-Easy")
        passed, total = categorical_counts(task, env["tokenizer"], env["model"], 4, 6)
        assert fan.merge_chat(units, results) == {"ARC-Easy": passed / total}
