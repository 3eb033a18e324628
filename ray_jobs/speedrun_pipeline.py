"""
The speedrun's stages as methods of `Pipeline`: each one calls the library / ray_jobs entry point of that stage on
the Ray cluster and returns the numbers its marker records. Also the CPU presets' time budget (steps that fit a
wall-clock budget, measured once per run). ray_jobs/speedrun.py builds a Pipeline and runs it.
"""

import dataclasses
import functools
import os
import time

from nanochat import storage
from nanochat.common import NanochatError
from ray_jobs import presets as P
from ray_jobs.speedrun_generated_eval import _write_generated_eval, eval_generated_tasks
from ray_jobs.speedrun_state import (
    DEPENDS,
    MARKER_VERSION,
    SECTION,
    _hash,
    log,
    marker_path,
    read_json,
    speedrun_dir,
    write_json,
)

# -----------------------------------------------------------------------------
# The runner


class Pipeline:
    def __init__(self, base_dir: str, preset: dict, run: dict, only: set | None, skip: set):
        self.base_dir, self.p, self.run = base_dir, preset, run
        self.only, self.skip = only, skip
        self.results: dict[str, dict] = {}  # stage -> marker
        self.hashes: dict[str, str] = {}

    # ---- bookkeeping

    def stage_hash(self, stage: str, extra=None) -> str:
        cfg = self.p[SECTION[stage]]
        deps = [self.hashes.get(d, "") for d in DEPENDS[stage]]
        return _hash({"v": MARKER_VERSION, "run": self.run["run_id"], "stage": stage, "cfg": cfg, "deps": deps,
                      "extra": extra})  # fmt: skip

    def enabled(self, stage: str) -> bool:
        if stage in self.skip or (self.only is not None and stage not in self.only):
            return False
        section = self.p[SECTION[stage]]
        if stage == "tok_eval":
            return bool(section.get("eval", True))
        if stage in ("chat_rl", "chat_eval_rl"):
            return bool(self.p["chat_rl"].get("enabled", False)) and (
                stage == "chat_rl" or bool(self.p["chat_eval"].get("enabled", True)))
        return bool(section.get("enabled", True))

    def run_stage(self, stage: str, fn, extra=None) -> dict | None:
        """Run fn() unless a matching marker says it is done; returns the marker (None when disabled)."""
        h = self.stage_hash(stage, extra)
        self.hashes[stage] = h
        if not self.enabled(stage):
            log(f"{stage}: skipped (disabled)")
            return None
        path = marker_path(self.base_dir, stage)
        marker = read_json(path)
        if marker is not None and marker.get("hash") == h and marker.get("status") == "done":
            log(f"{stage}: already done ({marker.get('seconds', 0):.1f}s, {time.ctime(marker.get('finished', 0))}); "
                f"skipping")
            self.results[stage] = marker
            return marker
        if marker is not None:
            log(f"{stage}: settings or inputs changed since the last run (or it did not finish): running it again")
        log(f"{stage}: starting")
        started = time.time()
        write_json(path, {"stage": stage, "status": "running", "hash": h, "started": started})
        metrics = fn() or {}
        finished = time.time()
        marker = {"stage": stage, "status": "done", "hash": h, "run_id": self.run["run_id"], "started": started,
                  "finished": finished, "seconds": round(finished - started, 2), "metrics": metrics}  # fmt: skip
        write_json(path, marker)
        self.results[stage] = marker
        log(f"{stage}: done in {finished - started:.1f}s")
        return marker

    def metric(self, stage: str, key: str, default=None):
        return (self.results.get(stage) or {}).get("metrics", {}).get(key, default)

    # ---- stages

    def data(self) -> dict:
        from nanochat import dataset

        cfg = self.p["data"]
        data_dir = dataset.get_data_dir()
        local_dir = data_dir
        if storage.is_remote(data_dir):  # download to local disk, then upload what the bucket lacks
            from nanochat.common import get_local_cache_dir

            local_dir = os.path.join(get_local_cache_dir(), dataset.DATA_DIRNAME)
        ok, failed, wanted = dataset.download(cfg["source"], cfg["num_files"], cfg["num_workers"], data_dir=local_dir,
                                              progress=False)  # fmt: skip
        if failed:
            names = ", ".join(sorted(failed)[:5])
            raise NanochatError(f"{len(failed)} of {wanted} shards failed to download ({names}); re-run the same "
                                f"command to retry them, or use --source sample offline")  # fmt: skip
        uploaded = 0
        if local_dir != data_dir:
            have = set(storage.listdir(data_dir))
            for path in ok:
                name = os.path.basename(path)
                if name not in have:
                    with open(path, "rb") as f:
                        storage.write_bytes(storage.join(data_dir, name), f.read())
                    uploaded += 1
        files = dataset.list_parquet_files(data_dir)
        return {"source": cfg["source"], "shards": len(files), "train_shards": len(files) - 1, "uploaded": uploaded,
                "data_dir": data_dir}  # fmt: skip

    def tokenizer(self) -> dict:
        from ray_jobs import tok_train

        cfg = self.p["tokenizer"]
        tcfg = tok_train.TokTrainConfig(max_chars=cfg["max_chars"], doc_cap=cfg["doc_cap"],
                                        vocab_size=cfg["vocab_size"], use_ray=True)  # fmt: skip
        out = tok_train.main(tcfg)
        import torch

        from nanochat.tokenizer import get_token_bytes

        tb = get_token_bytes(device="cpu").float()
        tb = tb[tb > 0]
        return {"vocab_size": out["vocab_size"], "train_time_s": round(out["train_time_s"], 2), "docs": out["docs"],
                "chars": out["chars"], "token_bytes_min": int(tb.min()), "token_bytes_max": int(tb.max()),
                "token_bytes_mean": round(float(tb.mean()), 3), "token_bytes_std": round(float(torch.std(tb)), 3),
                "tokenizer_path": out["tokenizer_path"]}  # fmt: skip

    def tok_eval(self) -> dict:
        from ray_jobs import tok_eval

        out = tok_eval.main()
        ratios = {}
        for label, per_text in out["results"].items():
            ratios[label] = {name: round(r["ratio"], 3) for name, r in per_text.items() if "ratio" in r}
        return {"vocab_sizes": out["vocab_sizes"], "bytes_per_token": ratios}

    def _cluster_args(self, name: str):
        from ray_jobs import train_common as tc

        r = self.p["ray"]
        n = int(r["num_workers"])
        if int(r.get("nodes", 0)) > 0:
            n = int(r["nodes"]) * int(r["gpus_per_node"])
        elif n < 0:  # every GPU of the cluster
            import ray

            n = int(ray.cluster_resources().get("GPU", 0))
            if n < 1:
                raise NanochatError("ray.num_workers=-1 means one worker per GPU, but the cluster has no GPUs; "
                                    "start GPU nodes or pass --num-workers N (CPU workers)")  # fmt: skip
        lo = int(r.get("min_workers", -1))
        min_workers = min(lo, n) if 0 < lo < n else -1  # elastic: continue on fewer workers after losing nodes
        kw = dict(num_workers=n, min_workers=min_workers, use_gpu=str(r["use_gpu"]),
                  cpus_per_worker=float(r["cpus_per_worker"]), max_failures=int(r["max_failures"]),
                  max_preemption_failures=int(r.get("max_preemption_failures", -1)),
                  report_every=int(r["report_every"]), name=name, ray_data_actors=int(r.get("ray_data_actors", 0)),
                  narrow_elastic=True)  # fmt: skip
        known = {f.name for f in dataclasses.fields(tc.ClusterArgs)}
        return tc.ClusterArgs(**{k: v for k, v in kw.items() if k in known})

    def _fit(self, module, cfg, stage: str, name: str) -> dict:
        """prepare -> TorchTrainer.fit with the metrics-logging sink; returns the loop's final result dict."""
        from ray_jobs import run_metrics
        from ray_jobs import train_common as tc

        cluster = self._cluster_args(name)
        cfg, use_gpu, run_name = module.prepare(cfg, cluster)
        sink = functools.partial(run_metrics.MetricsSink, metrics_file=run_metrics.metrics_path(self.base_dir, stage))
        worker = functools.partial(module.worker_fn, sink_cls=sink)
        loop_config = {"cfg": cfg.to_dict(), "run_name": run_name, "report_every": cluster.report_every,
                       "ray_data_actors": getattr(cluster, "ray_data_actors", 0)}  # fmt: skip
        elastic = f" (elastic: down to {cluster.min_workers})" if cluster.min_workers > 0 else ""
        log(f"{stage}: Ray Train run {run_name!r}, {cluster.num_workers} worker(s){elastic}, gpu={use_gpu}")
        return tc.run_trainer(worker, loop_config, cluster, use_gpu, run_name).metrics

    def base_train(self, depth: int | None = None, stage: str = "base_train") -> dict:
        from nanochat.train import BaseTrainConfig
        from ray_jobs import base_train

        kw = {k: v for k, v in self.p["base_train"].items() if k not in ("depths", "series", *BUDGET_KEYS)}
        if depth is not None:
            kw["depth"] = depth
            kw["model_tag"] = f"{self.p['base_train'].get('series', 'jan')}_miniseries_d{depth}"
            if not self.p.get("_explicit", {}).get("base_train.device_batch_size"):
                kw["device_batch_size"] = P.miniseries_device_batch(depth)
        cfg = BaseTrainConfig(**kw)
        calibrated = self._budget_iterations(stage, "base_train", cfg, cfg.total_batch_size)
        if calibrated:
            cfg.num_iterations = calibrated
        res = self._fit(base_train, cfg, stage, self._run_name(stage, cfg.tag))
        keep = ("step", "num_iterations", "start_step", "val_bpb", "min_val_bpb", "total_batch_size",
                "grad_accum_steps", "world_size", "checkpoint_dir", "tok_per_sec", "mfu", "total_training_time")
        out = {k: res.get(k) for k in keep}
        losses = res.get("losses") or []
        out["first_loss"] = losses[0][1] if losses else None
        out["final_loss"] = losses[-1][1] if losses else None
        out["model_tag"] = cfg.tag
        out["initial_val_bpb"] = self._first_val_bpb(stage)
        out.update(self._model_numbers(cfg))
        return out

    def _first_val_bpb(self, stage: str):
        """Val bpb of the untrained model (step 0), from the metrics log: the 'did it learn' baseline."""
        from ray_jobs import run_metrics

        recs = run_metrics.read_metrics(run_metrics.metrics_path(self.base_dir, stage))
        vals = [r["val_bpb"] for r in recs if r["kind"] == "val" and r["step"] == 0]
        return vals[0] if vals else None

    def _run_name(self, stage: str, tag) -> str:
        """Ray Train run name: the same settings resume the same run (and its checkpoints); changed settings (or
        upstream stages) start a new one, so a changed model never resumes from another config's checkpoint."""
        return f"speedrun-{stage}-{tag}-{self.hashes[stage][:8]}"

    def _budget_iterations(self, stage: str, section: str, cfg, total_batch_size) -> int | None:
        """Steps that fit the section's time_budget_s on this machine (CPU presets), or None to keep the config.

        Measured once per run by timing a few optimizer steps of the real model shape in this process, and stored
        in the base dir, so a resumed run keeps the same horizon (and LR schedule). An explicit num_iterations on
        the command line wins."""
        sec = self.p[section]
        budget = float(sec.get("time_budget_s", 0) or 0)
        if budget <= 0 or self.p.get("_explicit", {}).get(f"{section}.num_iterations"):
            return None
        path = storage.join(speedrun_dir(self.base_dir), "calibration", f"{stage}.json")
        key = self.stage_hash(stage)
        saved = read_json(path)
        if saved and saved.get("hash") == key:
            log(f"{stage}: time budget {budget:.0f}s -> {saved['num_iterations']} steps (measured earlier)")
            return int(saved["num_iterations"])
        step_s = self._measure_in_ray(cfg, int(total_batch_size))
        n = int(budget / step_s)
        n = max(int(sec.get("min_iterations", 1)), min(int(sec.get("max_iterations", 10**9)), n))
        write_json(path, {"hash": key, "num_iterations": n, "step_seconds": step_s, "budget_s": budget})
        log(f"{stage}: time budget {budget:.0f}s, measured {step_s:.2f}s/step -> {n} steps")
        return n

    def _measure_in_ray(self, cfg, total_batch_size: int) -> float:
        """measure_step_seconds in a Ray task shaped like one training worker (same CPUs, same niceness: Ray runs
        workers at nice 15, so on a busy machine they are slower than this driver)."""
        import ray

        from nanochat.tokenizer import get_tokenizer

        cluster = self._cluster_args("calibration")
        cpus = cluster.cpus_per_worker
        if cpus <= 0:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cluster.num_workers, 1)))
        task = ray.remote(measure_step_seconds).options(num_cpus=cpus, max_retries=0)
        return float(ray.get(task.remote(cfg, total_batch_size, max(cluster.num_workers, 1),
                                         vocab_size=get_tokenizer().get_vocab_size())))  # fmt: skip

    def _model_numbers(self, cfg) -> dict:
        from nanochat.tokenizer import get_tokenizer
        from nanochat.train import build_model_meta, scaling_params

        model = build_model_meta(cfg, get_tokenizer().get_vocab_size())
        counts = model.num_scaling_params()
        return {"depth": cfg.depth, "model_dim": model.config.n_embd, "num_params": counts["total"],
                "num_scaling_params": scaling_params(model), "flops_per_token": model.estimate_flops()}  # fmt: skip

    def _fanout_args(self) -> list[str]:
        r = self.p["ray"]
        args = ["--shards-per-task", str(r["eval_shards_per_task"]), "--no-progress"]
        if float(r.get("eval_gpus_per_task", -1)) >= 0:
            args += ["--gpus-per-worker", str(r["eval_gpus_per_task"])]
        return args

    def base_eval(self, tag: str | None = None, step: int | None = None) -> dict:
        from ray_jobs import base_eval

        cfg = self.p["base_eval"]
        tag = tag or self.metric("base_train", "model_tag")
        step = step if step is not None else self.metric("base_train", "step")
        argv = ["--eval", cfg["eval"], "--max-per-task", str(cfg["max_per_task"]), "--device-batch-size",
                str(cfg["device_batch_size"]), "--split-tokens", str(cfg["split_tokens"]), *self._fanout_args()]
        if tag:
            argv += ["--model-tag", tag]
        if step is not None:
            argv += ["--step", str(step)]
        out = _call_entry(base_eval.main, argv)
        res = {"step": out.get("step"), "bpb": out.get("bpb")}
        if "core" in out:
            res["core_metric"] = out["core"]["core_metric"]
            res["centered_results"] = out["core"].get("centered_results")
        if "samples" in out:
            res["samples"] = out["samples"][:7]
        return res

    def chat_sft(self) -> dict:
        from nanochat.sft import SFTConfig
        from ray_jobs import chat_sft

        kw = {k: v for k, v in self.p["chat_sft"].items() if k not in ("enabled", *BUDGET_KEYS)}
        kw.setdefault("model_tag", self.metric("base_train", "model_tag"))
        kw.setdefault("model_step", self.metric("base_train", "step"))
        cfg = SFTConfig(**kw)
        base_bt = self.p["base_train"]
        shape = _shape_cfg(base_bt, cfg.max_seq_len or base_bt.get("max_seq_len"),
                          cfg.device_batch_size or base_bt.get("device_batch_size"))  # fmt: skip
        calibrated = self._budget_iterations("chat_sft", "chat_sft", shape,
                                             cfg.total_batch_size or base_bt.get("total_batch_size"))  # fmt: skip
        if calibrated:
            cfg.num_iterations = calibrated
        res = self._fit(chat_sft, cfg, "chat_sft", self._run_name("chat_sft", cfg.model_tag))
        losses = res.get("losses") or []
        return {"step": res.get("step"), "start_step": res.get("start_step"), "val_bpb": res.get("val_bpb"),
                "initial_val_bpb": self._first_val_bpb("chat_sft"),
                "min_val_bpb": res.get("min_val_bpb"), "chat_eval": res.get("chat_eval"),
                "checkpoint_dir": res.get("checkpoint_dir"), "world_size": res.get("world_size"),
                "first_loss": losses[0][1] if losses else None, "final_loss": losses[-1][1] if losses else None,
                "model_tag": str(res.get("checkpoint_dir", "")).rstrip("/").rsplit("/", 1)[-1] or cfg.model_tag}

    def chat_eval(self, source: str = "sft") -> dict:
        from nanochat.chat_eval import TASK_NAMES
        from ray_jobs import chat_eval

        cfg = self.p["chat_eval"]
        producer = "chat_sft" if source == "sft" else "chat_rl"
        tag, step = self.metric(producer, "model_tag"), self.metric(producer, "step")
        tasks = [t.strip() for t in str(cfg["tasks"]).split("|") if t.strip()]
        known = [t for t in tasks if t in TASK_NAMES]
        generated = [t for t in tasks if t not in TASK_NAMES]
        results, out = {}, {}
        if known:
            argv = ["-i", source, "-a", "|".join(known), "-b", str(cfg["batch_size"]), "-m", str(cfg["max_new_tokens"]),
                    "-n", str(cfg["num_samples"]), "-t", str(cfg["temperature"]), "-k", str(cfg["top_k"]),
                    *self._fanout_args()]  # fmt: skip
            if int(cfg["max_problems"]) > 0:
                argv += ["-x", str(cfg["max_problems"])]
            if tag:
                argv += ["-g", tag]
            if step is not None:
                argv += ["-s", str(step)]
            out = _call_entry(chat_eval.main, argv)
            results.update(out.get("results", {}))
        if generated:
            results.update(eval_generated_tasks(source, tag, step, generated, cfg, self.p["chat_sft"]))
            _write_generated_eval(source, tag, step, results)
        from nanochat.chat_eval import chatcore

        return {"source": source, "step": step, "results": results, "chatcore": out.get("chatcore") or chatcore(results)}

    def chat_rl(self) -> dict:
        from nanochat.rl import RLConfig
        from ray_jobs import chat_rl

        kw = {k: v for k, v in self.p["chat_rl"].items() if k != "enabled"}
        kw.setdefault("model_tag", self.metric("chat_sft", "model_tag"))
        cfg = RLConfig(**kw)
        res = self._fit(chat_rl, cfg, "chat_rl", self._run_name("chat_rl", cfg.model_tag))
        ckpt = str(res.get("checkpoint_dir", ""))
        return {"step": res.get("step"), "checkpoint_dir": ckpt, "model_tag": ckpt.rstrip("/").rsplit("/", 1)[-1],
                **{k: v for k, v in res.items() if k.startswith(("pass@", "reward", "mean_reward"))}}

    # ---- the whole thing

    def run_all(self) -> None:
        if self.p["preset"] == "miniseries" or self.p["base_train"].get("depths"):
            return self.run_miniseries()
        self.run_stage("data", self.data)
        self.run_stage("tokenizer", self.tokenizer)
        self.run_stage("tok_eval", self.tok_eval)
        self.run_stage("base_train", self.base_train)
        self.run_stage("base_eval", self.base_eval)
        self.run_stage("chat_sft", self.chat_sft)
        self.run_stage("chat_eval", lambda: self.chat_eval("sft"))
        self.run_stage("chat_rl", self.chat_rl)
        self.run_stage("chat_eval_rl", lambda: self.chat_eval("rl"))

    def run_miniseries(self) -> None:
        """runs/miniseries.sh: one base_train (+ bpb eval) per depth, then results.csv with upstream's columns."""
        self.run_stage("data", self.data)
        self.run_stage("tokenizer", self.tokenizer)
        depths = [int(d) for d in str(self.p["base_train"].get("depths") or self.p["base_train"]["depth"]).split(",")]
        rows = []
        for d in depths:
            stage = f"base_train_d{d}"
            DEPENDS.setdefault(stage, ("tokenizer",))
            SECTION.setdefault(stage, "base_train")
            tr = self.run_stage(stage, functools.partial(self.base_train, d, stage), extra=d)
            ev_stage = f"base_eval_d{d}"
            DEPENDS.setdefault(ev_stage, (stage,))
            SECTION.setdefault(ev_stage, "base_eval")
            ev = None
            if tr is not None:
                m = tr["metrics"]
                ev = self.run_stage(ev_stage, functools.partial(self.base_eval, m["model_tag"], m["step"]), extra=d)
            if tr is not None:
                m, em = tr["metrics"], (ev or {}).get("metrics", {})
                tokens = (m.get("total_batch_size") or 0) * (m.get("step") or 0)
                rows.append([d, m["model_dim"], m["num_params"], m["num_scaling_params"], m["num_iterations"], tokens,
                             round(tokens / m["num_scaling_params"], 3), m.get("min_val_bpb"),
                             em.get("core_metric", ""), round(m.get("total_training_time") or 0, 1)])  # fmt: skip
        header = ("depth,model_dim,num_params,num_scaling_params,num_iterations,tokens_trained,param_data_ratio,"
                  "val_bpb,core_score,train_time_sec")  # fmt: skip
        body = header + "\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in rows)
        path = storage.join(speedrun_dir(self.base_dir), "miniseries_results.csv")
        storage.write_bytes(path, body.encode())
        log(f"miniseries results: {path}")


BUDGET_KEYS = ("time_budget_s", "min_iterations", "max_iterations")


def _shape_cfg(base_train: dict, max_seq_len: int, device_batch_size: int):
    """The base model's config with another sequence length / device batch (SFT's shape, for measure_step_seconds)."""
    from nanochat.train import BaseTrainConfig

    known = {k: v for k, v in base_train.items() if k in BaseTrainConfig.__dataclass_fields__}
    return BaseTrainConfig(**{**known, "max_seq_len": max_seq_len, "device_batch_size": device_batch_size})


def measure_step_seconds(cfg, total_batch_size: int, world_size: int, steps: int = 4, vocab_size: int = 0) -> float:
    """Wall seconds of one optimizer step (all micro-steps) of cfg's model shape on this machine's CPU."""
    import torch

    from nanochat.train import build_model_meta

    if vocab_size <= 0:
        from nanochat.tokenizer import get_tokenizer

        vocab_size = get_tokenizer().get_vocab_size()
    vocab = vocab_size
    model = build_model_meta(cfg, vocab)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = model.setup_optimizer()
    B, T = cfg.device_batch_size, cfg.max_seq_len
    accum = max(1, total_batch_size // (B * T * max(world_size, 1)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=gen)
    times = []
    for _ in range(steps):
        t0 = time.time()
        for _ in range(accum):
            model(x, x).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]  # median without the first (allocation) step


def _call_entry(main, argv: list[str]) -> dict:
    """Call a ray_jobs entry point's main(argv) in this process; its exit-2 user errors become NanochatError."""
    name = getattr(main, "__wrapped__", main).__module__
    log(f"  {name} {' '.join(argv)}")
    try:
        return main(argv)
    except SystemExit as e:
        raise NanochatError(f"{name} failed (exit status {e.code}); see the message above") from None
