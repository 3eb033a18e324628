"""
Per-step training metrics as a JSONL file in the base dir (local or s3://), for the run report's plots.

    <base>/speedrun/metrics/<stage>.jsonl      one JSON object per line:
      {"kind": "train", "step": 12, "loss": 5.91, "lrm": 1.0, "tok_per_sec": 2100, "mfu": 3.1, "dt": 1.9, "t": ...}
      {"kind": "val", "step": 50, "val_bpb": 2.31, "t": ...}
      {"kind": "core", "step": 2000, "core_metric": 0.12, "t": ...}

`MetricsSink` is Ray Train's `RaySink` (ray_jobs/train_common.py) plus this log, written by rank 0. The whole file
is rewritten atomically (S3 has no append) at most every FLUSH_EVERY_S seconds, at every checkpoint and at the end.
When a run resumes from step N (a restarted worker group or a resubmitted job), records after N are dropped first,
so the file always describes one consistent history.
"""

import json
import time

from nanochat import storage
from ray_jobs import train_common as tc

FLUSH_EVERY_S = 10.0


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
        self.records = [r for r in self.records if r.get("step", 0) <= step]
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
            self.log.truncate_after(step or 0)
        return step

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
