"""
The run report: `<base>/report.md` plus PNG plots in `<base>/report/`, built from what the speedrun left in the base
dir (local or s3://). Regenerate it at any time, also while a run is in progress:

    python -m ray_jobs.report                      # NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
    python -m ray_jobs.report --base-dir s3://bucket/nanochat --print

Inputs (all written by ray_jobs/speedrun.py):
  speedrun/run.json            run id, preset, resolved config
  speedrun/environment.json    git commit, Python / torch / Ray versions, CPUs, GPUs, nodes
  speedrun/stages/<stage>.json each stage's status, timings and key numbers
  speedrun/metrics/<stage>.jsonl per-step training metrics (ray_jobs/run_metrics.py)
Outputs: report.md (environment, per-stage sections, a BASE / SFT / RL summary table, total wall clock) and
report/{loss,val_bpb,lr,tok_per_sec}.png (matplotlib, Agg backend: no display needed).
"""

import argparse
import io
import json
import sys
import time

from nanochat import storage
from nanochat.common import NanochatError, get_base_dir

PLOTS = (  # file stem, metrics kind, key, y label, title
    ("loss", "train", "loss", "training loss (smoothed)", "Training loss"),
    ("val_bpb", "val", "val_bpb", "validation bits per byte", "Validation bpb"),
    ("lr", "train", "lrm", "LR multiplier (x base LR)", "Learning rate schedule"),
    ("tok_per_sec", "train", "tok_per_sec", "tokens / s (all workers)", "Throughput"),
)
TRAIN_STAGES = ("base_train", "chat_sft", "chat_rl")
SUMMARY_ROWS = ("CORE", "val bpb (untrained)", "val bpb", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                "WordChoice", "Arithmetic", "ChatCORE")  # fmt: skip
STAGE_TITLES = {"data": "Data", "tokenizer": "Tokenizer training", "tok_eval": "Tokenizer evaluation",
                "base_train": "Base model training", "base_eval": "Base model evaluation", "chat_sft": "Chat SFT",
                "chat_eval": "Chat evaluation (SFT)", "chat_rl": "Chat RL", "chat_eval_rl": "Chat evaluation (RL)"}
STAGE_ORDER = tuple(STAGE_TITLES)


def _read_json(path: str):
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError:
        return None


def load_state(base_dir: str) -> dict:
    from ray_jobs.run_metrics import metrics_path, read_metrics

    sr = storage.join(base_dir, "speedrun")
    stages = {}
    for name in storage.listdir(storage.join(sr, "stages")):
        if name.endswith(".json"):
            m = _read_json(storage.join(sr, "stages", name))
            if m:
                stages[name[: -len(".json")]] = m
    metrics = {}
    for name in storage.listdir(storage.join(sr, "metrics")):
        if name.endswith(".jsonl"):
            stage = name[: -len(".jsonl")]
            metrics[stage] = read_metrics(metrics_path(base_dir, stage))
    return {"run": _read_json(storage.join(sr, "run.json")), "env": _read_json(storage.join(sr, "environment.json")),
            "last": _read_json(storage.join(sr, "last_invocation.json")), "stages": stages, "metrics": metrics}


# -----------------------------------------------------------------------------
# Formatting


def fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds or 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _kv_lines(d: dict, skip=()) -> list[str]:
    out = []
    for k, v in d.items():
        if k in skip or isinstance(v, (dict, list)):
            continue
        out.append(f"- {k}: {fmt(v)}")
    return out


def environment_section(env: dict | None, run: dict | None) -> list[str]:
    lines = ["## Environment", ""]
    if not env:
        return lines + ["(no environment recorded: run `python -m ray_jobs.speedrun` first)", ""]
    commit = env.get("commit") or "unknown"
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    gpus = ", ".join(f"{n}x {name}" for name, n in (env.get("gpu_types") or {}).items()) or (
        f"{int(env.get('cluster_gpus') or 0)}" if env.get("cluster_gpus") else "none")
    lines += [
        f"- git commit: {commit}{dirty}",
        f"- Python {env.get('python')} | torch {env.get('torch')} | Ray {env.get('ray')}",
        f"- platform: {env.get('platform')}",
        f"- Ray: {'embedded (local)' if env.get('embedded_ray') else 'cluster'}, {env.get('nodes')} node(s), "
        f"{fmt(env.get('cluster_cpus'))} CPUs, {env.get('cluster_memory_gib')} GiB memory; ray.init "
        f"{env.get('ray_init_seconds')}s",
        f"- GPUs: {gpus}",
        f"- driver: {env.get('driver_cpu')} ({env.get('driver_cpu_count')} cores)",
    ]
    if env.get("job_submission_id"):
        lines.append(f"- Ray job: {env['job_submission_id']}")
    if run:
        lines.append(f"- run id: {run.get('run_id')} | preset: {run.get('preset')}")
    return lines + [""]


def stage_table(stages: dict) -> list[str]:
    lines = ["## Stages", "", "| stage | status | time | started |", "|---|---|---|---|"]
    for name in _ordered(stages):
        m = stages[name]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["started"])) if m.get("started") else ""
        lines.append(f"| {name} | {m.get('status')} | {fmt_duration(m.get('seconds', 0)) if m.get('seconds') else ''} "
                     f"| {started} |")
    return lines + [""]


def _ordered(stages: dict) -> list[str]:
    known = [s for s in STAGE_ORDER if s in stages]
    return known + sorted(s for s in stages if s not in STAGE_ORDER)


def stage_sections(stages: dict) -> list[str]:
    lines = []
    for name in _ordered(stages):
        m = stages[name].get("metrics") or {}
        if not m:
            continue
        lines += [f"## {STAGE_TITLES.get(name, name)}", ""]
        if stages[name].get("seconds"):
            lines.append(f"- stage time: {fmt_duration(stages[name]['seconds'])}")
        lines += _kv_lines(m)
        if name == "tok_eval":
            lines += _tok_eval_table(m)
        if name == "base_eval" and m.get("bpb"):
            lines += [f"- {split} bpb: {fmt(v)}" for split, v in m["bpb"].items()]
        if name == "base_eval" and m.get("centered_results"):
            lines += ["", "| CORE task | centered |", "|---|---|"]
            lines += [f"| {t} | {fmt(v)} |" for t, v in m["centered_results"].items()]
        if name in ("chat_eval", "chat_eval_rl", "chat_sft") and (m.get("results") or m.get("chat_eval")):
            res = m.get("results") or m.get("chat_eval")
            lines += ["", "| task | accuracy |", "|---|---|"] + [f"| {t} | {100 * a:.2f}% |" for t, a in res.items()]
        if m.get("samples"):
            lines += ["", "Samples:", ""] + [f"    {s!r}" for s in m["samples"]]
        lines.append("")
    return lines


def interruption_section(metrics: dict) -> list[str]:
    """Every interruption of every training stage: when, why, the step resumed from and the work lost."""
    rows, total = [], 0
    for stage in [s for s in TRAIN_STAGES if s in metrics] + sorted(s for s in metrics if s not in TRAIN_STAGES):
        recs = metrics[stage]
        dts = [r["dt"] for r in recs if r.get("kind") == "train" and isinstance(r.get("dt"), (int, float))]
        dt = sum(dts) / len(dts) if dts else None
        for r in recs:
            if r.get("kind") != "interruption":
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("last_t") or r.get("t") or 0))
            lost = r.get("steps_lost", 0)
            total += lost
            secs = f" (~{fmt_duration(lost * dt)})" if dt and lost else ""
            rows.append(f"| {stage} | {when} | {r.get('cause')} | {r.get('last_step')} | {r.get('resumed_from')} | "
                        f"{lost}{secs} | {r.get('previous_world_size')} -> {r.get('world_size')} |")
    if not rows:
        return []
    return ["## Interruptions", "", f"{len(rows)} interruption(s), {total} step(s) of work lost in all.", "",
            "| stage | time | kind | last step reached | resumed from step | work lost (steps) | workers |",
            "|---|---|---|---|---|---|---|", *rows, ""]  # fmt: skip


def _tok_eval_table(m: dict) -> list[str]:
    bpt = m.get("bytes_per_token") or {}
    if "Ours" not in bpt:
        return []
    labels = list(bpt)
    lines = ["", "| text | " + " | ".join(f"{lab} bytes/token" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]  # fmt: skip
    for text in bpt["Ours"]:
        lines.append(f"| {text} | " + " | ".join(fmt(bpt[lab].get(text)) for lab in labels) + " |")
    return lines


def summary_table(stages: dict, metrics: dict | None = None) -> list[str]:
    """| Metric | BASE | SFT | RL | with blanks where a stage did not run or does not measure that metric."""

    def m(stage):
        return (stages.get(stage) or {}).get("metrics") or {}

    cols = {"BASE": {}, "SFT": {}, "RL": {}}
    be = m("base_eval")
    cols["BASE"]["CORE"] = be.get("core_metric")
    untrained = m("base_train").get("initial_val_bpb")
    if untrained is None:  # markers written before this field existed: the step-0 eval of the metrics log
        untrained = next((r["val_bpb"] for r in (metrics or {}).get("base_train", [])
                          if r.get("kind") == "val" and r.get("step") == 0), None)  # fmt: skip
    cols["BASE"]["val bpb (untrained)"] = untrained
    cols["BASE"]["val bpb"] = (be.get("bpb") or {}).get("val", m("base_train").get("min_val_bpb"))
    cols["SFT"]["val bpb"] = m("chat_sft").get("val_bpb")
    for col, stage in (("SFT", "chat_eval"), ("RL", "chat_eval_rl")):
        res = m(stage).get("results") or {}
        if not res and col == "SFT":
            res = m("chat_sft").get("chat_eval") or {}
        for task, acc in res.items():
            cols[col][task] = acc
        cols[col]["ChatCORE"] = m(stage).get("chatcore")
    rows = [r for r in SUMMARY_ROWS if any(cols[c].get(r) is not None for c in cols)] or ["CORE", "ChatCORE"]
    lines = ["## Summary", "", "| Metric | BASE | SFT | RL |", "|---|---|---|---|"]
    lines += [f"| {r} | " + " | ".join(fmt(cols[c].get(r)) for c in cols) + " |" for r in rows]
    return lines + [""]


# -----------------------------------------------------------------------------
# Plots


def make_plots(metrics: dict) -> dict[str, bytes]:
    """{file name: PNG bytes} for each plot that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for stem, kind, key, ylabel, title in PLOTS:
        series = {}
        for stage in [s for s in TRAIN_STAGES if s in metrics] + sorted(s for s in metrics if s not in TRAIN_STAGES):
            pts = [(r["step"], r[key]) for r in metrics[stage] if r.get("kind") == kind and r.get(key) is not None]
            if pts:
                series[stage] = pts
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for stage, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=stage)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out[f"{stem}.png"] = buf.getvalue()
    return out


# -----------------------------------------------------------------------------


def render(state: dict, plot_names: list[str]) -> str:
    run, stages, last = state["run"], state["stages"], state["last"]
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = ["# nanochat speedrun report", "", f"Generated {now}."]
    if run:
        lines.append(f"Preset `{run.get('preset')}`, run id `{run.get('run_id')}`.")
    lines.append("")
    lines += environment_section(state["env"], run)
    lines += summary_table(stages, state["metrics"])
    done = [m for m in stages.values() if m.get("status") == "done"]
    stage_seconds = sum(m.get("seconds", 0) for m in done)
    if done:
        span = max(m["finished"] for m in done) - min(m["started"] for m in done)
        lines.append(f"Total wall clock time: {fmt_duration(span)} (sum of stage times {fmt_duration(stage_seconds)})")
    if last:
        lines.append(f"Last invocation (Ray start-up included): {fmt_duration(last.get('seconds', 0))}")
    lines.append("")
    lines += stage_table(stages)
    lines += interruption_section(state["metrics"])
    if plot_names:
        lines += ["## Plots", ""] + [f"![{n[:-4]}](report/{n})" for n in plot_names] + [""]
    lines += stage_sections(stages)
    return "\n".join(lines).rstrip() + "\n"


def generate(base_dir: str | None = None) -> str:
    """Write report.md and the plots under base_dir; returns report.md's path."""
    base_dir = base_dir or get_base_dir()
    state = load_state(base_dir)
    if not state["stages"] and not state["run"]:
        raise NanochatError(f"nothing to report in {base_dir}: no speedrun stages recorded there; run "
                            f"`python -m ray_jobs.speedrun` first or pass the right --base-dir")  # fmt: skip
    plots = make_plots(state["metrics"])
    report_dir = storage.join(base_dir, "report")
    storage.makedirs(report_dir)
    for name, data in plots.items():
        storage.write_bytes(storage.join(report_dir, name), data)
    path = storage.join(base_dir, "report.md")
    storage.write_bytes(path, render(state, sorted(plots)).encode("utf-8"))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="(Re)generate report.md and plots from a speedrun's base dir")
    parser.add_argument("--base-dir", default=None, help="base dir (default: NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    parser.add_argument("--print", action="store_true", help="also print report.md")
    args = parser.parse_args(argv)
    try:
        path = generate(args.base_dir)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    if args.print:
        print(storage.read_bytes(path).decode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
