"""
Speedrun presets: one dict of stage settings per named run size. `ray_jobs.speedrun --preset NAME` starts from one
and applies command-line overrides on top (`--set base_train.depth=6`, or shorthands such as `--depth 6`).

    from ray_jobs.presets import get_preset, apply_override, list_presets
    p = get_preset("cpu"); apply_override(p, "base_train.num_iterations=100")

Sections (every key of every section can be overridden; unknown keys are rejected with the list of valid ones):
  data        where the pretraining shards come from (`nanochat.dataset.download`)
  tokenizer   `ray_jobs.tok_train` settings; eval=True also runs `ray_jobs.tok_eval`
  base_train  any `nanochat.train.BaseTrainConfig` field, plus time_budget_s / min_iterations / max_iterations:
              with time_budget_s > 0 the driver times a few steps of the model on this machine and sets
              num_iterations to fit the budget (CPU presets; an explicit num_iterations override wins)
  base_eval   `ray_jobs.base_eval` flags (eval modes, CORE examples per task, bpb tokens)
  chat_sft    any `nanochat.sft.SFTConfig` field, plus the same time budget keys
  chat_eval   `ray_jobs.chat_eval` flags (tasks joined by |, problems per task, ...)
  chat_rl     any field of the RL config (`nanochat.rl`); enabled=False skips the stage
  ray         workers and resources: nodes x gpus_per_node (GPU presets) or num_workers (-1 = every GPU of the
              cluster), min_workers (elastic), cpus_per_worker, use_gpu, max_failures / max_preemption_failures
              (separate retry budgets), report_every, eval_shards_per_task, embedded-cluster num_cpus / dashboard

Checkpoints: GPU presets save every GPU_SAVE_EVERY_MINUTES minutes (`save_every_minutes`, converted to steps from
the measured step time) and keep the newest 2 plus the final one (`keep_checkpoints`); a preemption notice adds a
just-in-time checkpoint. The CPU preset saves every CPU_SAVE_EVERY_MINUTES (bench/bench_checkpoint.py: < 2%).

GPU presets mirror upstream's runs/speedrun.sh (d24, ratio 8, FP8, device batch 16) and runs/miniseries.sh (a depth
sweep); they scale to any number of 8-GPU nodes because the global batch is fixed in tokens and gradient
accumulation absorbs the world size (NANOCHAT_SPEC §6.4).
"""

import copy
import json

from nanochat.common import NanochatError

SECTIONS = ("data", "tokenizer", "base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl", "ray")
GPU_SAVE_EVERY_MINUTES = 15.0  # a spot reclaim without notice loses at most this much work
# the CPU preset's ~7-minute pretraining: ~7 saves off the loop; bench/bench_checkpoint.py: 0.06 s blocked per save
# in the background (0.37 s synchronous), i.e. ~0.1% of the run
CPU_SAVE_EVERY_MINUTES = 1.0
_GPU_CKPT = {"save_every_minutes": GPU_SAVE_EVERY_MINUTES, "keep_checkpoints": 2}


def _ray(**kw) -> dict:
    d = {
        "num_workers": 1,  # training workers (1 per GPU); -1 = every GPU in the cluster now
        "nodes": 0,  # > 0: num_workers = nodes x gpus_per_node (GPU presets; the autoscaler adds the nodes)
        "gpus_per_node": 8,
        "cpus_per_worker": -1.0,  # -1 = auto (CPU: all CPUs split across workers; GPU: 4 per worker)
        "use_gpu": "auto",  # auto | 1 | 0
        "max_failures": 3,  # restarts after real failures (crashes, lost nodes); bounded, so a bug cannot loop
        "max_preemption_failures": -1,  # restarts after preemptions (drain notices), counted apart (-1 = infinite)
        "min_workers": -1,  # elastic: continue on as few as this many workers after losing nodes (-1 = fixed);
        # sizes the batch does not divide over are left out (the run may shrink less), see train_common
        "report_every": 10,  # ray.train.report every N steps
        "ray_data_actors": -1,  # -1 auto (Ray Data tokenizer actors on GPU workers, plain loader on CPU); N > 0 forces N actors
        "eval_shards_per_task": 1,  # eval fan-out: Ray tasks per CORE / chat task
        "eval_gpus_per_task": -1.0,  # -1 = 1 on GPU clusters, 0 on CPU
        "num_cpus": -1,  # embedded cluster only: logical CPUs (-1 = Ray's default, the machine's cores)
        "dashboard": True,  # embedded cluster only: start the dashboard (http://127.0.0.1:8265)
    }
    d.update(kw)
    return d


def _base(**sections) -> dict:
    """Defaults shared by every preset (upstream's values), then the preset's own settings."""
    p = {
        "data": {"source": "hf", "num_files": 170, "num_workers": 8},
        "tokenizer": {"max_chars": 2_000_000_000, "doc_cap": 10_000, "vocab_size": 32768, "eval": True},
        "base_train": {"depth": 20, "run": "dummy", "save_every": -1},
        "base_eval": {"eval": "core,bpb,sample", "max_per_task": -1, "device_batch_size": 32,
                      "split_tokens": 40 * 524288},  # fmt: skip
        "chat_sft": {"run": "dummy"},
        "chat_eval": {"tasks": "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval", "max_problems": -1, "batch_size": 8,
                      "max_new_tokens": 512, "num_samples": 1, "temperature": 0.0, "top_k": 50},  # fmt: skip
        "chat_rl": {"enabled": False, "run": "dummy"},
        "ray": _ray(),
    }
    for name, values in sections.items():
        p[name].update(values)
    return p


# -----------------------------------------------------------------------------
# CPU presets: offline sample corpus, embedded Ray, a few minutes on 2 cores


def cpu() -> dict:
    """The README's main command: every stage on a 2-core CPU in <= 20 min, a model that measurably learns.

    Offline: pretraining on the sample corpus (Python's own docs, ~6 MB), SFT and chat eval on generated tasks.
    d4 x aspect 64 = 256 dims, 4 heads of 64, full attention ("L": SDPA has no sliding window kernel on CPU).
    """
    return _base(
        data={"source": "sample", "num_files": -1, "num_workers": 1},
        tokenizer={"max_chars": 10_000_000, "vocab_size": 4096, "eval": True},
        base_train={"depth": 4, "head_dim": 64, "window_pattern": "L", "max_seq_len": 256, "device_batch_size": 16,
                    "total_batch_size": 4096, "num_iterations": 300, "eval_every": 50, "eval_tokens": 4096 * 8,
                    "core_metric_every": -1, "sample_every": -1, "save_every": -1, "warmup_steps": 10,
                    "save_every_minutes": CPU_SAVE_EVERY_MINUTES, "time_budget_s": 420, "min_iterations": 60,
                    "max_iterations": 1500},  # fmt: skip
        base_eval={"eval": "bpb,sample", "device_batch_size": 16, "split_tokens": 4096 * 8},
        chat_sft={"mixture": "offline", "offline_size": 20000, "device_batch_size": 16, "max_seq_len": 256,
                  "num_iterations": 150, "eval_every": -1, "eval_tokens": 4096 * 4, "chatcore_every": -1,
                  "save_every": -1, "save_every_minutes": CPU_SAVE_EVERY_MINUTES, "time_budget_s": 210,
                  "min_iterations": 40, "max_iterations": 800},
        chat_eval={"tasks": "WordChoice|Arithmetic", "max_problems": 100, "max_new_tokens": 64, "batch_size": 16},
        ray=_ray(num_workers=1, report_every=10, eval_shards_per_task=2),
    )


def cpu_tiny() -> dict:
    """CI: every stage at toy sizes (a couple of minutes). Learns a little; exercises every code path."""
    p = cpu()
    p["tokenizer"].update(max_chars=1_000_000, vocab_size=512, eval=False)
    p["base_train"].update(depth=2, max_seq_len=64, device_batch_size=4, total_batch_size=512, num_iterations=12,
                           eval_every=6, eval_tokens=512, save_every=4, warmup_steps=2, time_budget_s=0)  # fmt: skip
    p["base_eval"].update(device_batch_size=4, split_tokens=512)
    p["chat_sft"].update(device_batch_size=4, max_seq_len=128, num_iterations=6, eval_tokens=512, offline_size=200,
                         save_every=-1, time_budget_s=0)  # fmt: skip
    p["chat_eval"].update(max_problems=4, max_new_tokens=8, batch_size=4)
    p["ray"].update(report_every=2, eval_shards_per_task=1, dashboard=False)
    return p


# -----------------------------------------------------------------------------
# GPU presets (upstream's runs/*.sh on 8-GPU nodes)


def speedrun() -> dict:
    """runs/speedrun.sh: d24, data:param ratio 8, FP8, device batch 16 on every GPU of the cluster."""
    return _base(
        base_train={"depth": 24, "target_param_data_ratio": 8, "device_batch_size": 16, "fp8": True, **_GPU_CKPT},
        base_eval={"device_batch_size": 16},
        chat_sft=dict(_GPU_CKPT),
        chat_rl=dict(_GPU_CKPT),
        ray=_ray(nodes=1, min_workers=8, eval_shards_per_task=8),
    )


def d24() -> dict:
    """Same as speedrun (upstream's GPT-2-grade d24)."""
    return speedrun()


def d12() -> dict:
    """Quick GPU experiment (upstream: '~5 min pretraining' on 8xH100): d12, 8 shards, CORE capped per task."""
    return _base(
        data={"num_files": 8},
        base_train={"depth": 12, "core_metric_every": -1, "sample_every": -1, **_GPU_CKPT},
        base_eval={"max_per_task": 500},
        chat_sft=dict(_GPU_CKPT),
        chat_rl=dict(_GPU_CKPT),
        ray=_ray(nodes=1, min_workers=8, eval_shards_per_task=8),
    )


MINISERIES_DEPTHS = (12, 14, 16, 18, 20, 22, 24, 26)


def miniseries() -> dict:
    """runs/miniseries.sh: base models at each depth of `base_train.depths` (vocab 32768, 1000 shards).

    The device batch follows upstream's rule per depth (8 for >= 28, 16 for >= 20, else 32) unless overridden.
    Each depth is a separate base_train stage (tag <series>_miniseries_d<depth>); SFT and chat eval are skipped.
    """
    return _base(
        data={"num_files": 1000},
        tokenizer={"eval": False},
        base_train={"depths": ",".join(str(d) for d in MINISERIES_DEPTHS), "series": "jan", "core_metric_every": 999999,
                    "core_metric_max_per_task": -1, "sample_every": -1, "save_every": -1, **_GPU_CKPT},  # fmt: skip
        base_eval={"eval": "bpb"},
        chat_sft={"enabled": False},
        chat_eval={"enabled": False},
        ray=_ray(nodes=1, min_workers=8, eval_shards_per_task=8),
    )


def miniseries_device_batch(depth: int) -> int:
    return 8 if depth >= 28 else 16 if depth >= 20 else 32


PRESETS = {
    "cpu": cpu,
    "cpu-tiny": cpu_tiny,
    "speedrun": speedrun,
    "d24": d24,
    "d12": d12,
    "miniseries": miniseries,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise NanochatError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[name]())
    for section in SECTIONS:
        p.setdefault(section, {})
    p["preset"] = name
    return p


# -----------------------------------------------------------------------------
# Overrides: section.key=value, typed like the preset's value (or by the config dataclass of the stage)


def _parse_value(raw: str, like):
    """Parse `raw` with the type of `like` (the current value); JSON-ish guessing when there is none."""
    if isinstance(like, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if isinstance(like, int) and not isinstance(like, bool):
        try:
            return int(raw)
        except ValueError:
            f = float(raw)  # allow 1e6
            if f != int(f):
                raise ValueError(f"expected an integer, got {raw!r}") from None
            return int(f)
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, str):
        return raw
    try:  # no current value: numbers and booleans as JSON, the rest as strings
        return json.loads(raw)
    except ValueError:
        return raw


def known_keys(section: str) -> dict:
    """Keys a section accepts beyond the preset's own: the fields (with defaults) of the stage's config class."""
    if section == "base_train":
        from dataclasses import fields

        from nanochat.train import BaseTrainConfig

        return {f.name: f.default for f in fields(BaseTrainConfig)} | {"depths": "", "series": "", "time_budget_s": 0.0,
                                                                     "min_iterations": 1, "max_iterations": 10**9}
    if section in ("chat_sft", "chat_rl"):
        cls = _stage_config_class(section)
        if cls is not None:
            from dataclasses import MISSING, fields

            return {f.name: (None if f.default is MISSING else f.default) for f in fields(cls)} | {
                "enabled": True, "time_budget_s": 0.0, "min_iterations": 1, "max_iterations": 10**9}
        return {"enabled": True}
    if section == "chat_eval":
        return {"enabled": True}
    return {}


def _stage_config_class(section: str):
    """The dataclass a stage's settings feed (None while that stage's library module does not exist)."""
    import importlib

    module, names = {"chat_sft": ("nanochat.sft", ("SFTConfig", "ChatSFTConfig")),
                     "chat_rl": ("nanochat.rl", ("RLConfig", "ChatRLConfig"))}[section]  # fmt: skip
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    return None


def apply_override(preset: dict, spec: str) -> None:
    """Apply one 'section.key=value' override in place; errors name the valid sections / keys."""
    if "=" not in spec:
        raise NanochatError(f"bad override {spec!r}: expected section.key=value, e.g. base_train.depth=6")
    path, raw = spec.split("=", 1)
    section, dot, key = path.strip().partition(".")
    if section not in SECTIONS or not dot or not key:
        raise NanochatError(f"bad override {spec!r}: the key must be section.key with section one of {', '.join(SECTIONS)}")
    current = preset[section]
    extra = known_keys(section)
    if key not in current and key not in extra:
        valid = sorted(set(current) | set(extra))
        raise NanochatError(f"unknown key {key!r} in section {section!r}; valid keys: {', '.join(valid)}")
    like = current.get(key, extra.get(key))
    try:
        current[key] = _parse_value(raw, like)
    except ValueError as e:
        raise NanochatError(f"bad value in override {spec!r}: {e}") from None


# Shorthand command-line flags of ray_jobs.speedrun -> the key they override
SHORTHANDS = {
    "depth": "base_train.depth",
    "num_iterations": "base_train.num_iterations",
    "device_batch_size": "base_train.device_batch_size",
    "model_tag": "base_train.model_tag",
    "run": "base_train.run",
    "source": "data.source",
    "num_shards": "data.num_files",
    "num_workers": "ray.num_workers",
    "nodes": "ray.nodes",
}
