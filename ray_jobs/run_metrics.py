"""
Per-step training metrics as a JSONL file in the base dir (local or s3://), for the run report's plots.

    <base>/speedrun/metrics/<stage>.jsonl      one JSON object per line:
      {"kind": "train", "step": 12, "loss": 5.91, "lrm": 1.0, "tok_per_sec": 2100, "mfu": 3.1, "dt": 1.9, "t": ...}
      {"kind": "val", "step": 50, "val_bpb": 2.31, "t": ...}
      {"kind": "core", "step": 2000, "core_metric": 0.12, "t": ...}
      {"kind": "start", "step": 0, "world_size": 2, "run": "<Ray run name>", "t": ...}   each worker group's start
      {"kind": "interruption", "run": "<Ray run name>", "step": 40, "cause": "preemption", "resumed_from": 40, "last_step": 41,
       "steps_lost": 1, "last_t": ..., "world_size": 1, "previous_world_size": 2, "t": ...}

`MetricsSink` is Ray Train's `RaySink` (ray_jobs/train_common.py) plus this log, written by rank 0. The whole file
is rewritten atomically (S3 has no append) at most every FLUSH_EVERY_S seconds, at every checkpoint and at the end.
When a run resumes from step N (a restarted worker group or a resubmitted job), records after N are dropped first,
so the file always describes one consistent history; the start and interruption records are kept. An interruption
is a start of a worker group of the same Ray run after an earlier one: it records the last step the earlier group
logged, the step resumed from, the steps lost (their difference: exact up to the last flush before a hard crash,
FLUSH_EVERY_S) and its cause: "preemption" (resumed from a just-in-time checkpoint), "node lost" (fewer workers),
"resize" (more workers: Ray grew the group back) or "failure". Their sum is the `nanochat_train_steps_lost` gauge.
"""

import json
import time

from nanochat import storage
from ray_jobs import train_common as tc

FLUSH_EVERY_S = 10.0
KEPT_KINDS = ("start", "interruption")  # history of the run itself: never dropped by a resume


def metrics_path(base_dir: str, stage: str) -> str:
    return storage.join(base_dir, "speedrun", "metrics", f"{stage}.jsonl")


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics file ([] when it does not exist); unparsable lines are skipped."""
    if not storage.exists(path):
        return []
    out = []
    for line in storage.read_bytes(path).decode("utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class MetricsLog:
    def __init__(self, path: str, flush_every_s: float = FLUSH_EVERY_S):
        self.path, self.flush_every_s = path, flush_every_s
        self.records = read_metrics(path)
        self.last_flush = time.time()

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (the resume point): that history is being recomputed."""
        self.records = [r for r in self.records if r.get("step", 0) <= step or r.get("kind") in KEPT_KINDS]
        self.flush()

    def add(self, record: dict) -> None:
        self.records.append({**record, "t": round(time.time(), 3)})
        if time.time() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        body = "".join(json.dumps(r) + "\n" for r in self.records)
        storage.write_bytes(self.path, body.encode("utf-8"))
        self.last_flush = time.time()


def _num(v):
    if hasattr(v, "item"):
        v = v.item()
    return v if isinstance(v, (int, float)) and v == v else None  # drop NaN / non-numbers


class MetricsSink(tc.RaySink):
    """RaySink that also keeps the per-step metrics log (rank 0 only)."""

    def __init__(self, *args, metrics_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = MetricsLog(metrics_file) if (metrics_file and self.rank == 0) else None

    def resume_step(self, checkpoint_dir: str) -> int | None:
        step = super().resume_step(checkpoint_dir)
        if self.log is not None:
            self._record_start(step or 0)
            self.log.truncate_after(step or 0)
        return step

    def _record_start(self, step: int) -> None:
        """Log this worker group's start, and the interruption that caused it if an earlier group of this run ran."""
        records = self.log.records
        starts = [r for r in records if r.get("kind") == "start" and r.get("run") == self.run_name]
        if starts:
            prev = starts[-1]
            logged = [r for r in records if r.get("t", 0) >= prev.get("t", 0) and r.get("kind") != "interruption"]
            last_step = max([r.get("step", 0) for r in logged if r.get("kind") == "train"] + [prev.get("step", 0)])
            prev_world = prev.get("world_size")
            if self.resumed is not None and self.resumed[1] == "preemption":
                cause = "preemption"
            elif prev_world is not None and self.world < prev_world:
                cause = "node lost"
            elif prev_world is not None and self.world > prev_world:
                cause = "resize"
            else:
                cause = "failure"
            lost = max(0, last_step - step)
            self.log.add({"kind": "interruption", "run": self.run_name, "step": step, "cause": cause, "resumed_from": step,
                          "last_step": last_step, "steps_lost": lost, "world_size": self.world,
                          "previous_world_size": prev_world, "last_t": max(r.get("t", 0) for r in logged)})
            print(f"[ray] resumed after an interruption ({cause}): step {last_step} was reached, resuming from "
                  f"step {step}: {lost} step(s) lost; {self.world} worker(s), before {prev_world}")
        self.log.add({"kind": "start", "step": step, "world_size": self.world, "run": self.run_name})
        self.steps_lost = sum(r.get("steps_lost", 0) for r in self.log.records
                              if r.get("kind") == "interruption" and r.get("run") == self.run_name)
        self.log.flush()

    def on_step(self, step: int, metrics: dict) -> None:
        super().on_step(step, metrics)
        if self.log is not None:
            self.log.add({"kind": "train", "step": step, "loss": _num(metrics.get("train/loss")),
                          "step_loss": _num(metrics.get("train/step_loss")), "lrm": _num(metrics.get("train/lrm")),
                          "tok_per_sec": _num(metrics.get("train/tok_per_sec")), "mfu": _num(metrics.get("train/mfu")),
                          "dt": _num(metrics.get("train/dt"))})  # fmt: skip

    def on_eval(self, step: int, metrics: dict) -> None:
        super().on_eval(step, metrics)
        if self.log is None:
            return
        for key, kind, name in (("val/bpb", "val", "val_bpb"), ("core_metric", "core", "core_metric")):
            if _num(metrics.get(key)) is not None:
                self.log.add({"kind": kind, "step": step, name: _num(metrics[key])})
        self.log.flush()

    def on_checkpoint(self, step: int, checkpoint_dir: str, metrics: dict) -> None:
        if self.log is not None:
            self.log.flush()
        super().on_checkpoint(step, checkpoint_dir, metrics)

    def report_final(self, result: dict) -> None:
        if self.log is not None:
            self.log.flush()
        super().report_final(result)
