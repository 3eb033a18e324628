"""python -m pytest tests/test_speedrun.py -q

The whole pipeline end to end: `python -m ray_jobs.speedrun --preset cpu-tiny` on embedded Ray in a temp base dir,
then the artifacts (tokenizer, checkpoints in nanochat's layout, eval CSV/JSON, report.md + PNGs), a re-run that
skips every finished stage, and `python -m ray_jobs.report`. Plus the fast checks: presets and overrides, and bad
input (unknown preset, unreachable cluster, unreachable storage) failing in seconds with a clear message.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.common import NanochatError
from ray_jobs import cluster_utils, presets, report, speedrun

ROOT = Path(__file__).resolve().parent.parent


def run_speedrun(args, env_extra=None, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.speedrun", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    return proc, time.time() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# Fast: presets, overrides, addresses, report rendering


def test_presets_resolve_and_override():
    for name in presets.list_presets():
        p = presets.get_preset(name)
        assert set(presets.SECTIONS) <= set(p)
    args = speedrun.parse_args(["--preset", "cpu", "--depth", "6", "--set", "base_train.num_iterations=77",
                                "--set", "tokenizer.eval=false", "--set", "chat_eval.tasks=GSM8K"])  # fmt: skip
    p = speedrun.resolve_config(args)
    assert p["base_train"]["depth"] == 6 and p["base_train"]["num_iterations"] == 77
    assert p["tokenizer"]["eval"] is False and p["chat_eval"]["tasks"] == "GSM8K"
    # a BaseTrainConfig field the preset does not set is accepted, typed from the dataclass default
    p2 = speedrun.resolve_config(speedrun.parse_args(["--preset", "cpu", "--set", "base_train.warmdown_ratio=0.3"]))
    assert p2["base_train"]["warmdown_ratio"] == 0.3
    # GPU presets: 8 GPUs per node, any number of nodes; an explicit worker count wins
    p3 = speedrun.resolve_config(speedrun.parse_args(["--preset", "speedrun", "--nodes", "4"]))
    assert p3["ray"]["nodes"] * p3["ray"]["gpus_per_node"] == 32
    assert p3["base_train"]["depth"] == 24 and p3["base_train"]["fp8"] is True
    p4 = speedrun.resolve_config(speedrun.parse_args(["--preset", "d12", "--num-workers", "2"]))
    assert p4["ray"]["nodes"] == 0 and p4["ray"]["num_workers"] == 2


@pytest.mark.parametrize("spec, message", [
    ("base_train.nope=1", "unknown key 'nope'"),
    ("nosection.depth=1", "section one of"),
    ("base_train.depth=abc", "bad value"),
    ("tokenizer.eval=maybe", "boolean"),
    ("depth", "expected section.key=value"),
])  # fmt: skip
def test_bad_overrides_name_the_fix(spec, message):
    with pytest.raises(NanochatError, match=message):
        presets.apply_override(presets.get_preset("cpu"), spec)


def test_changed_setting_invalidates_that_stage_and_its_dependents_only():
    def hashes(preset):
        pipe = speedrun.Pipeline("/nonexistent", preset, {"run_id": "r1"}, None, set())
        for stage in speedrun.STAGES:
            pipe.hashes[stage] = pipe.stage_hash(stage)
        return pipe.hashes

    a = hashes(presets.get_preset("cpu"))
    changed = presets.get_preset("cpu")
    presets.apply_override(changed, "base_train.num_iterations=301")
    b = hashes(changed)
    same = {s for s in speedrun.STAGES if a[s] == b[s]}
    assert same == {"data", "tokenizer", "tok_eval"}
    more_workers = presets.get_preset("cpu")
    presets.apply_override(more_workers, "ray.num_workers=2")  # resumable with another world size: no re-run
    assert hashes(more_workers) == a


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(NanochatError) as e:
        presets.get_preset("gpt5")
    for name in presets.list_presets():
        assert name in str(e.value)


def test_parse_address():
    assert cluster_utils.parse_address("") is None and cluster_utils.parse_address("auto") is None
    assert cluster_utils.parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster_utils.parse_address("ray://head") == ("head", 10001)
    with pytest.raises(NanochatError, match="dashboard"):
        cluster_utils.parse_address("http://127.0.0.1:8265")
    with pytest.raises(NanochatError, match="host:port"):
        cluster_utils.parse_address("head:notaport")


def test_report_summary_has_blanks_for_stages_not_run(tmp_path):
    stages = {"base_eval": {"status": "done", "metrics": {"core_metric": 0.21, "bpb": {"val": 0.8}}},
              "chat_eval": {"status": "done", "metrics": {"results": {"ARC-Easy": 0.4}, "chatcore": 0.2}}}  # fmt: skip
    lines = report.summary_table(stages)
    assert "| CORE | 0.2100 |  |  |" in lines
    assert "| ARC-Easy |  | 0.4000 |  |" in lines
    assert "| ChatCORE |  | 0.2000 |  |" in lines
    with pytest.raises(NanochatError, match="nothing to report"):
        report.generate(str(tmp_path))


# -----------------------------------------------------------------------------
# Bad input fails in seconds (subprocesses: exit status 2, a message, no traceback)


def test_cli_unknown_preset():
    proc, dt = run_speedrun(["--preset", "gpt5"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "valid presets: cpu, cpu-tiny" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unreachable_cluster_fails_fast(tmp_path):
    port = free_port()
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", str(tmp_path), "--address", f"127.0.0.1:{port}"],
                            timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert dt < 30  # interpreter + imports included; Ray's own retry loop would take about a minute


def test_cli_unreachable_storage_fails_fast():
    port = free_port()  # nothing listens there: the S3 endpoint is down
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", "s3://nanochat-test-bucket/run"], env, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert "s3://nanochat-test-bucket" in proc.stderr and "Traceback" not in proc.stderr
    assert dt < 60


# -----------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("speedrun_base")
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", str(base)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base, proc, dt


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_tiny_end_to_end_artifacts(tiny_run):
    base, proc, _ = tiny_run
    markers = {p.stem: json.loads(p.read_text()) for p in (base / "speedrun" / "stages").glob("*.json")}
    for stage in ("data", "tokenizer", "base_train", "base_eval", "chat_sft", "chat_eval"):
        assert markers[stage]["status"] == "done" and markers[stage]["seconds"] > 0, stage
    # tokenizer (upstream's files)
    assert (base / "tokenizer" / "tokenizer.pkl").stat().st_size > 0
    assert (base / "tokenizer" / "token_bytes.pt").stat().st_size > 0
    assert markers["tokenizer"]["metrics"]["vocab_size"] == 512
    # base checkpoints in nanochat's layout: model_/meta_/optim_ files at the final step
    bt = markers["base_train"]["metrics"]
    step = bt["step"]
    assert step == bt["num_iterations"] == 12
    ck = base / "base_checkpoints" / bt["model_tag"]
    for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.pt"):
        assert (ck / name).exists(), name
    assert json.loads((ck / f"meta_{step:06d}.json").read_text())["step"] == step
    # base eval JSON (bpb of both splits) and SFT checkpoints
    ev = json.loads((base / "base_eval" / f"base_model_{step:06d}.json").read_text())
    assert set(ev["bpb"]) == {"train", "val"} and all(0 < v < 20 for v in ev["bpb"].values())
    sft = markers["chat_sft"]["metrics"]
    assert list((base / "chatsft_checkpoints" / sft["model_tag"]).glob("model_*.pt"))
    # chat eval results (held-out generated tasks in the offline preset)
    results = markers["chat_eval"]["metrics"]["results"]
    assert set(results) == {"WordChoice", "Arithmetic"} and all(0 <= a <= 1 for a in results.values())
    assert list((base / "chat_eval").glob("sft_*.json"))
    # per-step metrics: every step once, in order, and validation at the start and the end
    recs = [json.loads(line) for line in (base / "speedrun" / "metrics" / "base_train.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == list(range(1, step + 1))
    val = {r["step"]: r["val_bpb"] for r in recs if r["kind"] == "val"}
    assert 0 in val and step in val
    # report.md with its summary table and plots
    text = (base / "report.md").read_text()
    assert "| Metric | BASE | SFT | RL |" in text and "## Environment" in text and "Ray 2.60.0" in text
    for png in ("loss", "val_bpb", "lr", "tok_per_sec"):
        data = (base / "report" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"report/{png}.png" in text
    assert f"[speedrun] report: {base / 'report.md'}" in proc.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_tiny_rerun_skips_finished_stages_and_report_regenerates(tiny_run):
    base, _, first_dt = tiny_run
    before = json.loads((base / "speedrun" / "stages" / "base_train.json").read_text())
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", str(base), "--no-report"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("data", "tokenizer", "base_train", "base_eval", "chat_sft", "chat_eval"):
        assert f"[speedrun] {stage}: already done" in proc.stdout, stage
    after = json.loads((base / "speedrun" / "stages" / "base_train.json").read_text())
    assert after["finished"] == before["finished"]  # not re-run
    os.remove(base / "report.md")
    out = subprocess.run([sys.executable, "-m", "ray_jobs.report", "--base-dir", str(base)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (base / "report.md").exists() and out.stdout.strip() == str(base / "report.md")


@pytest.fixture
def local_ray(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_time_budget_sets_iterations_once_and_keeps_them(tiny_run, local_ray, monkeypatch):
    base, _, _ = tiny_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))  # the run's tokenizer gives the vocab size
    p = presets.get_preset("cpu-tiny")
    p["_explicit"] = {}
    p["base_train"].update(time_budget_s=3.0, min_iterations=5, max_iterations=10**6)
    pipe = speedrun.Pipeline(str(base), p, {"run_id": "budget"}, None, set())
    from nanochat.train import BaseTrainConfig

    cfg = BaseTrainConfig(**{k: v for k, v in p["base_train"].items() if k not in speedrun.BUDGET_KEYS})
    n = pipe._budget_iterations("base_train", "base_train", cfg, cfg.total_batch_size)  # timed in a Ray task
    saved = json.loads((base / "speedrun" / "calibration" / "base_train.json").read_text())
    assert n == saved["num_iterations"] >= 5 and saved["step_seconds"] > 0
    assert n == max(5, int(3.0 / saved["step_seconds"]))
    assert pipe._budget_iterations("base_train", "base_train", cfg, cfg.total_batch_size) == n  # kept on resume
    p["_explicit"] = {"base_train.num_iterations": True}  # an explicit horizon wins over the budget
    assert pipe._budget_iterations("base_train", "base_train", cfg, cfg.total_batch_size) is None
