"""The run report's interruption list and the steps-lost gauge's definition, from a metrics log (no Ray).

python -m pytest tests/test_interruption_report.py -q
"""

import json

from ray_jobs import report, run_metrics
from ray_jobs.train_common import GAUGES


def test_report_lists_every_interruption(tmp_path):
    base = tmp_path / "base"
    (base / "speedrun" / "stages").mkdir(parents=True)
    (base / "speedrun" / "stages" / "base_train.json").write_text(json.dumps(
        {"stage": "base_train", "status": "done", "started": 1.0, "finished": 100.0, "seconds": 99.0,
         "metrics": {"step": 60}}))  # fmt: skip
    log = run_metrics.MetricsLog(run_metrics.metrics_path(str(base), "base_train"))
    log.add({"kind": "start", "step": 0, "world_size": 2, "run": "r"})
    for s in range(1, 21):
        log.add({"kind": "train", "step": s, "loss": 5.0, "dt": 0.5})
    log.add({"kind": "interruption", "run": "r", "step": 18, "cause": "node lost", "resumed_from": 18,
             "last_step": 20, "steps_lost": 2, "world_size": 1, "previous_world_size": 2, "last_t": 1e9})
    log.add({"kind": "interruption", "run": "r", "step": 40, "cause": "preemption", "resumed_from": 40,
             "last_step": 40, "steps_lost": 0, "world_size": 1, "previous_world_size": 1, "last_t": 1e9})
    log.truncate_after(10)  # a later resume from step 10 keeps the run's own history
    assert [r["kind"] for r in log.records].count("interruption") == 2
    text = (base / "report.md").read_text() if report.generate(str(base)) else ""
    assert "## Interruptions" in text and "2 interruption(s), 2 step(s) of work lost in all." in text
    assert "| base_train |" in text and "| node lost | 20 | 18 | 2 (~0m01s) | 2 -> 1 |" in text
    assert "| preemption | 40 | 40 | 0 | 1 -> 1 |" in text


def test_steps_lost_gauge_is_in_the_table():
    assert GAUGES["nanochat_train_steps_lost"][0] == "train/steps_lost"
