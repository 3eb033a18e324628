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
    # does not hang: Ray's own connection retry loop would take a minute on top of start-up (start-up alone can take
    # 20 s on a loaded 2-core machine)
    assert dt < 55


def test_cli_unreachable_storage_fails_fast():
    port = free_port()  # nothing listens there: the S3 endpoint is down
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", "s3://nanochat-test-bucket/run"], env, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "s3://nanochat-test-bucket" in proc.stderr and "Traceback" not in proc.stderr
    assert dt < 120  # does not hang: botocore's default 60 s timeouts, retried, would take minutes
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # storage is checked before Ray starts


# -----------------------------------------------------------------------------
# End to end


# cpu-tiny with the RL stage on (offline arithmetic task, toy sizes): RL + chat eval of the RL model end to end
RL_ON = ["--set", "chat_rl.enabled=true", "--set", "chat_rl.task=arithmetic", "--set", "chat_rl.num_iterations=2",
         "--set", "chat_rl.device_batch_size=2", "--set", "chat_rl.examples_per_step=1", "--set",
         "chat_rl.num_samples=2", "--set", "chat_rl.max_new_tokens=8", "--set", "chat_rl.eval_every=1", "--set",
         "chat_rl.eval_examples=2"]  # fmt: skip
ALL_STAGES = ("data", "tokenizer", "base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl", "chat_eval_rl")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("speedrun_base")
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", str(base), *RL_ON])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base, proc, dt


def _markers(base) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (base / "speedrun" / "stages").glob("*.json")}


def _metrics(base, stage) -> list[dict]:
    path = base / "speedrun" / "metrics" / f"{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summary_rows(report_text: str) -> dict:
    """{metric: [BASE, SFT, RL] cell strings} of report.md's summary table."""
    rows, lines = {}, report_text.splitlines()
    start = lines.index("| Metric | BASE | SFT | RL |") + 2
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_tiny_end_to_end_artifacts(tiny_run):
    base, proc, _ = tiny_run
    markers = _markers(base)
    for stage in ALL_STAGES:
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
    # RL: 2 steps from the SFT model, its weights saved where upstream puts them, and the RL model evaluated
    rl = markers["chat_rl"]["metrics"]
    assert rl["step"] == 1 and list((base / "chatrl_checkpoints" / rl["model_tag"]).glob("model_000001.pt"))
    assert set(markers["chat_eval_rl"]["metrics"]["results"]) == {"WordChoice", "Arithmetic"}
    assert markers["chat_eval_rl"]["metrics"]["source"] == "rl" and list((base / "chat_eval").glob("rl_*.json"))
    # per-step metrics: every step once, in order, and validation at the start and the end
    recs = _metrics(base, "base_train")
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == list(range(1, step + 1))
    val = {r["step"]: r["val_bpb"] for r in recs if r["kind"] == "val"}
    assert 0 in val and step in val
    assert val[step] < val[0] - 0.05, val  # the model learned: val bpb fell during the run
    assert ev["bpb"]["val"] < val[0]  # and base eval measures the trained model
    # report.md: its summary numbers are the stage markers' (formatted to 4 decimals)
    text = (base / "report.md").read_text()
    assert "| Metric | BASE | SFT | RL |" in text and "## Environment" in text and "Ray 2.60.0" in text
    rows, f4 = _summary_rows(text), "{:.4f}".format
    assert rows["val bpb"][0] == f4(ev["bpb"]["val"]) and rows["val bpb"][1] == f4(sft["val_bpb"])
    assert rows["val bpb (untrained)"][0] == f4(val[0])
    for col, stage in ((1, "chat_eval"), (2, "chat_eval_rl")):
        m = markers[stage]["metrics"]
        for task, acc in m["results"].items():
            assert rows[task][col] == f4(acc), (stage, task)
        if m.get("chatcore") is not None:  # the offline tasks have no ChatCORE: then the row is blank or absent
            assert rows["ChatCORE"][col] == f4(m["chatcore"]), stage
        else:
            assert rows.get("ChatCORE", [""] * 3)[col] == "", stage
    assert f"[speedrun] report: {base / 'report.md'}" in proc.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_tiny_plots_draw_the_series_they_name(tiny_run, monkeypatch):
    """Each PNG is the drawing of its metric for every training stage that logged it: redraw the plots from the
    run's metrics while recording what is drawn; the PNGs on disk must be those exact drawings."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    base, _, _ = tiny_run
    text = (base / "report.md").read_text()
    drawn, plot = [], Axes.plot

    def recording_plot(ax, xs, ys, *args, **kwargs):
        drawn.append((ax, kwargs.get("label"), list(xs), list(ys)))
        return plot(ax, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    state = report.load_state(str(base))
    pngs = report.make_plots(state["metrics"])
    drawn = [(ax.get_title(), label, xs, ys) for ax, label, xs, ys in drawn]  # titles are set after plotting
    assert sorted(pngs) == sorted(p.name for p in (base / "report").glob("*.png"))
    for stem, kind, key, _, title in report.PLOTS:
        stages = [p.stem for p in (base / "speedrun" / "metrics").glob("*.jsonl")]
        want = {stage: [(r["step"], r[key]) for r in _metrics(base, stage) if r.get("kind") == kind and
                        r.get(key) is not None] for stage in stages}  # fmt: skip
        want = {stage: pts for stage, pts in want.items() if pts}
        got = {label: list(zip(xs, ys)) for t, label, xs, ys in drawn if t == title}
        assert got == want, stem
        assert f"report/{stem}.png" in text
        assert (base / "report" / f"{stem}.png").read_bytes() == pngs[f"{stem}.png"], stem  # the same drawing
    # the series that must be there in a full run: pretraining and SFT losses, pretraining validation
    titles = {t: {label for tt, label, _, _ in drawn if tt == t} for _, _, _, _, t in report.PLOTS}
    assert {"base_train", "chat_sft"} <= titles["Training loss"] and "base_train" in titles["Validation bpb"]


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_tiny_rerun_skips_finished_stages_and_report_regenerates(tiny_run):
    base, _, first_dt = tiny_run
    before = json.loads((base / "speedrun" / "stages" / "base_train.json").read_text())
    proc, dt = run_speedrun(["--preset", "cpu-tiny", "--base-dir", str(base), "--no-report", *RL_ON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ALL_STAGES:
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
