"""
RaySink: the library loop's TrainSink on Ray Train, running inside each training worker. It reports metrics and
checkpoint pointers to Ray Train, picks the step a restarted worker group resumes from, publishes the run's Prometheus
gauges (rank 0), launches in-loop evaluations as Ray tasks, and holds a drained worker after its just-in-time
checkpoint until Ray restarts the group. The driver side (flags, TorchTrainer) is ray_jobs/train_common.py.
"""

import json
import os
import tempfile
import threading
import time

from nanochat.common import NanochatError
from nanochat.train import TrainSink

AUTO_RAY_DATA_ACTORS = 2  # --ray-data-actors auto on GPU: tokenizer actors (1 CPU each) per training worker
HOLD_MARGIN_S = 120.0  # after a just-in-time checkpoint, wait this long past the drain deadline for the restart


def _hold_for_tests(step: int) -> None:
    """Test hook: NANOCHAT_TRAIN_HOLD_AT=<step>:<path> parks the loop after <step> (creating <path>) until the job is
    stopped, so that a test stops a run at a known step instead of racing it."""
    spec = os.environ.get("NANOCHAT_TRAIN_HOLD_AT")
    if spec and step == int(spec.split(":", 1)[0]):
        open(spec.split(":", 1)[1], "w").close()
        threading.Event().wait()


class RaySink(TrainSink):
    """nanochat.train.TrainSink on Ray Train: report metrics and checkpoint pointers, pick the resume step."""

    MARKER = "nanochat_checkpoint.json"

    def __init__(self, run_name: str, report_every: int, ray_data_actors: int = 0):
        """ray_data_actors: tokenizer actors per worker for the pretraining input (0 = plain loader, -1 = auto)."""
        import ray.train

        self.ray_train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name, self.report_every, self.ray_data_actors = run_name, report_every, ray_data_actors
        self.gauges = _make_gauges(run_name) if self.rank == 0 else None
        self.t_start = time.time()
        self.first_step_reported = False
        self.eval_metrics = {}  # evaluation results waiting for the next report
        self.pending_evals = []  # rank 0: (kind, step, eval_fanout.EvalHandle) launched and not yet reported
        self.resumed = None  # (step, meta["save_reason"]) of the checkpoint this worker group started from
        self.reported_steps = []  # checkpoint steps this worker group reported to Ray, in order
        self.steps_lost = 0  # optimizer steps lost to interruptions in this run (MetricsSink counts them)

    # ---- where to resume

    def resume_step(self, checkpoint_dir: str) -> int | None:
        """Newest of (Ray's registered pointer, newest complete checkpoint written by this run); same on all ranks."""
        step = None
        if self.rank == 0:
            step = self._pick_resume_step(checkpoint_dir)
        return _broadcast(step)

    def _pick_resume_step(self, checkpoint_dir: str) -> int | None:
        registered = None
        ck = self.ray_train.get_checkpoint()
        if ck is not None:
            with ck.as_directory() as d:
                pointer = json.load(open(os.path.join(d, self.MARKER)))
            if pointer["checkpoint_dir"] == checkpoint_dir:
                registered = int(pointer["step"])
        own = own_complete_steps(checkpoint_dir, self.run_name)
        newest_own = own[-1] if own else None
        step = None
        if registered is not None and (newest_own is None or registered >= newest_own):
            print(f"[ray] resuming from registered checkpoint step {registered}")
            step = registered
        elif newest_own is not None:
            print(f"[ray] resuming from step {newest_own}: newest complete checkpoint of run {self.run_name!r} "
                  f"(registered: {registered})")
            step = newest_own
        if step is not None:
            self.resumed = (step, _meta_of(checkpoint_dir, step).get("save_reason"))
        return step

    def protected_steps(self) -> set:
        """What a restart would resume from right now: Ray registers a reported checkpoint at the controller's next
        poll, so until the next one is reported, the one reported before the newest (or the step this worker
        group resumed from) may still be the registered one. Retention keeps it."""
        if len(self.reported_steps) >= 2:
            return {self.reported_steps[-2]}
        return {self.resumed[0]} if self.resumed else set()

    # ---- preemption (a drain notice for a node of this worker group)

    checks_preemption = True

    def preemption_notice(self) -> dict | None:
        info = self.ray_train.get_preemption_info()  # a barrier: the loop calls it on every rank at agreed steps
        if info is None:
            return None
        left = None if info.deadline_ms is None else round(info.deadline_ms / 1000 - time.time(), 1)
        return {"deadline_s": left, "ranks": info.preempted_ranks, "nodes": info.preempted_node_ids}

    def hold_for_preemption(self, step: int, notice: dict) -> None:
        """The just-in-time checkpoint of `step` is complete and reported: train no further (the restart resumes
        from it, so any later step would be lost) until Ray tears this worker group down at the drain deadline
        (or earlier, when every rank has gone). A drain that never comes: resume training after a while."""
        left = notice.get("deadline_s")
        limit = time.time() + (left if left is not None else 600) + HOLD_MARGIN_S
        print(f"[ray] rank {self.rank}: checkpoint of step {step} saved ahead of the preemption of ranks "
              f"{notice.get('ranks')} (deadline in {left}s); waiting for the restart")
        while time.time() < limit:
            time.sleep(0.5)
        print(f"[ray] rank {self.rank}: no restart {HOLD_MARGIN_S:.0f}s after the drain deadline; training on")

    def checkpoint_meta(self) -> dict:
        return {"launcher": {"kind": "ray", "ray_run_name": self.run_name}}

    def train_loader(self, cfg, tokenizer, device, resume_state):
        """Ray Data pipeline (same batches and resume states as the library loader), or None for the library's."""
        actors = self.ray_data_actors
        if actors == -1:  # auto, unresolved by the driver: same rule as resolve_ray_data_actors
            actors = AUTO_RAY_DATA_ACTORS if torch_device_type(device) == "cuda" else 0
        if actors <= 0:
            return None
        from ray_jobs.data_pipeline import make_batch_iterator

        return make_batch_iterator(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split="train", device=device,
                                   resume_state=resume_state, num_tokenizer_actors=actors)

    # ---- reporting

    def on_step(self, step: int, metrics: dict) -> None:
        if self.gauges is not None:
            _set_gauges(self.gauges, {**metrics, "train/steps_lost": self.steps_lost})
        if not self.first_step_reported:
            self.first_step_reported = True
            self.first_step_time = time.time()  # wall clock: the driver subtracts its own start time
            metrics = {**metrics, "time_to_first_step_s": self.first_step_time - self.t_start}
        if step % self.report_every == 0:
            self.ray_train.report(_plain(self._with_evals(metrics)))
        _hold_for_tests(step)

    def on_eval(self, step: int, metrics: dict) -> None:
        if self.gauges is not None:
            _set_gauges(self.gauges, metrics)  # val/bpb
        # ride along with the next step / checkpoint / final report (report is a barrier: no extra call here)
        for k, v in metrics.items():
            if k not in ("step", "total_training_flops", "total_training_time"):
                self.eval_metrics.update({k: v, f"{k}_step": step})

    def on_checkpoint(self, step: int, checkpoint_dir: str, metrics: dict) -> None:
        self._report_pointer(step, checkpoint_dir, metrics, f"step_{step:06d}")
        self.reported_steps.append(step)

    def report_final(self, result: dict) -> None:
        """The run's summary, attached to a pointer to its final checkpoint (Result.metrics = this report)."""
        metrics = {"final": True, **result, "first_step_unix_time": getattr(self, "first_step_time", None)}
        self._report_pointer(result["step"], result["checkpoint_dir"], metrics, f"final_{result['step']:06d}")

    def _with_evals(self, metrics: dict) -> dict:
        """metrics + the evaluation results that arrived since the last report (then forgotten)."""
        out = {**self.eval_metrics, **metrics}
        self.eval_metrics = {}
        return out

    def _report_pointer(self, step: int, checkpoint_dir: str, metrics: dict, name: str) -> None:
        from ray.train import Checkpoint

        metrics = self._with_evals(metrics)
        if self.rank != 0:  # every rank reports (a barrier); only rank 0 attaches the pointer
            self.ray_train.report(_plain(metrics), checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, self.MARKER), "w") as f:
                json.dump({"checkpoint_dir": checkpoint_dir, "step": step, "world_size": self.world}, f)
            self.ray_train.report(_plain(metrics), checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    # ---- asynchronous evaluation (Ray tasks launched by rank 0)

    def eval_resources(self, device) -> dict | None:
        """Resources of one eval task, or None when the cluster has nowhere to run it (evaluate in-process)."""
        import ray

        free = ray.available_resources()
        cpus = 1 if free.get("CPU", 0) >= 1 else 0  # 0: share the workers' cores rather than wait for them
        if device.type == "cuda":  # a CPU evaluation of a GPU-sized model would take hours: need an idle GPU
            return {"cpus_per_worker": cpus, "gpus_per_worker": 1} if free.get("GPU", 0) >= 1 else None
        return {"cpus_per_worker": cpus, "gpus_per_worker": 0}

    def core_metric(self, model, tokenizer, device, step: int, max_per_task: int):
        def launch(resources):
            from ray_jobs.eval_fanout import ModelRef, launch_core_async

            return launch_core_async(ModelRef.from_model(model), max_per_task=max_per_task, **resources)

        return self._launch("core", step, device, launch)

    def chat_metric(self, cfg, model, tokenizer, device, step: int, batch_size: int):
        def launch(resources):
            from ray_jobs.eval_fanout import ModelRef, launch_chatcore_async, launch_offline_chat_async

            ref = ModelRef.from_model(model)
            if cfg.mixture == "offline":
                return launch_offline_chat_async(ref, max(1, cfg.offline_size // 10), cfg.chatcore_max_cat,
                                                 cfg.chatcore_max_sample, batch_size, **resources)
            return launch_chatcore_async(ref, cfg.chatcore_max_cat, cfg.chatcore_max_sample, batch_size, **resources)

        return self._launch("chat", step, device, launch)

    def relaunch_eval(self, kind: str, step: int, checkpoint_dir: str, device, params: dict) -> bool:
        """An evaluation the previous worker group launched and never reported: again, from that step's checkpoint."""
        from ray_jobs.eval_fanout import ModelRef, launch_chatcore_async, launch_core_async, launch_offline_chat_async

        ref = ModelRef(checkpoint_dir=checkpoint_dir, step=step)

        def launch(resources):
            if kind == "core":
                return launch_core_async(ref, max_per_task=params["max_per_task"], **resources)
            cfg, batch_size = params["cfg"], params["batch_size"]
            if cfg.mixture == "offline":
                return launch_offline_chat_async(ref, max(1, cfg.offline_size // 10), cfg.chatcore_max_cat,
                                                 cfg.chatcore_max_sample, batch_size, **resources)
            return launch_chatcore_async(ref, cfg.chatcore_max_cat, cfg.chatcore_max_sample, batch_size, **resources)

        return self._launch(kind, step, device, launch) is not None

    def _launch(self, kind: str, step: int, device, launch):
        """Rank 0 launches; every rank learns whether it did (else all evaluate in-process, a collective)."""
        from nanochat.train import PENDING

        handle = None
        if self.rank == 0:
            resources = self.eval_resources(device)
            if resources is None:
                print(f"[ray] no idle GPU for the step-{step} {kind} evaluation: running it in-process")
            else:
                try:
                    handle = launch(resources)
                except Exception as e:  # e.g. the eval bundle download; in-process raises it properly if it persists
                    print(f"[ray] could not launch the step-{step} {kind} evaluation as Ray tasks ({e!r}): "
                          f"running it in-process")
        if not _broadcast(handle is not None):
            return None
        if handle is not None:
            self.pending_evals.append((kind, step, handle))
        return PENDING

    def finished_evals(self, wait: bool = False) -> list[tuple[str, int, dict]]:
        done, still = [], []
        for kind, step, handle in self.pending_evals:
            if not (wait or handle.done()):  # done() is a zero-timeout ray.wait
                still.append((kind, step, handle))
                continue
            if wait and not handle.done():
                print(f"[ray] waiting for the step-{step} {kind} evaluation to finish")
            try:
                result = handle.result()
            except Exception as e:  # a failed evaluation must not take the training run down with it
                print(f"[ray] WARNING: the step-{step} {kind} evaluation failed: {e!r}")
                continue
            done.append((kind, step, result["results"] if kind == "chat" else result))
        self.pending_evals = still
        return done


def torch_device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def own_complete_steps(checkpoint_dir: str, run_name: str) -> list[int]:
    """Complete checkpoint steps in checkpoint_dir whose meta says this Ray run wrote them."""
    from nanochat import storage
    from nanochat.checkpoint_manager import complete_steps, meta_path

    steps = []
    for s in complete_steps(checkpoint_dir):
        try:
            meta = json.loads(storage.read_bytes(meta_path(checkpoint_dir, s)))
        except (OSError, ValueError, NanochatError):
            continue
        launcher = meta.get("launcher")
        if isinstance(launcher, dict) and launcher.get("ray_run_name") == run_name:
            steps.append(s)
    return steps


def _meta_of(checkpoint_dir: str, step: int) -> dict:
    """A checkpoint's meta ({} when unreadable)."""
    from nanochat import storage
    from nanochat.checkpoint_manager import meta_path

    try:
        return json.loads(storage.read_bytes(meta_path(checkpoint_dir, step)))
    except (OSError, ValueError, NanochatError):
        return {}


def _broadcast(obj):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _plain(metrics: dict) -> dict:
    """Ray metrics must be plain Python values (no tensors)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and v == float("inf"):
            v = None
        out[k] = v
    return out


GAUGES = {  # Ray custom metric name -> (metric key in the loop's metrics, description)
    "nanochat_train_tokens_per_second": ("train/tok_per_sec", "training throughput, tokens/s over all workers"),
    "nanochat_train_mfu_percent": ("train/mfu", "model FLOPs utilization, % of peak (measured peak on CPU)"),
    "nanochat_train_loss": ("train/loss", "smoothed training loss"),
    "nanochat_train_step": ("step", "optimizer steps done"),
    "nanochat_train_step_seconds": ("train/dt", "wall time of the last optimizer step, seconds"),
    "nanochat_train_steps_lost": ("train/steps_lost", "optimizer steps lost to interruptions (restarts) so far"),
}
EVAL_GAUGES = {"nanochat_train_val_bpb": ("val/bpb", "validation bits per byte (set at each evaluation)")}


def _make_gauges(run_name: str):
    from ray.util.metrics import Gauge

    gauges = {}
    for name, (key, desc) in {**GAUGES, **EVAL_GAUGES}.items():
        g = Gauge(name, description=desc, tag_keys=("run",))
        g.set_default_tags({"run": run_name})
        gauges[key] = g
    return gauges


def _set_gauges(gauges: dict, metrics: dict):
    for key, g in gauges.items():
        if key in metrics and isinstance(metrics[key], (int, float)):
            g.set(float(metrics[key]))
