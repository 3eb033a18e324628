"""
Checkpoint saves that do not stall training, retention, and when to save (pretraining, SFT and RL share them).

Save protocol (`CheckpointSaver`, one per rank; every method is called by every rank at the same loop points):
1. `save(step, ...)` first finishes the previous save (at most one in flight: the next save waits for it), then
   copies the model (rank 0) and this rank's optimizer shard into host memory, the only part the loop waits for,
   and hands the host copies to a background thread that writes them (atomic files, local or s3://).
2. `poll()`, after every optimizer step, asks all ranks whether their shards landed (one tiny all_reduce, only while
   a save is in flight). When every rank's shards are on storage, rank 0 writes the meta (LAST: a step is complete
   only when its meta exists), then every rank calls `on_complete(step)` (Ray: report the checkpoint, a barrier),
   and rank 0 prunes old steps in the background (`checkpoint_manager.prune_checkpoints`: meta deleted first).
   A save whose writes failed on any rank raises on every rank.
3. `wait()` does step 2 now, blocking (end of training, a just-in-time checkpoint before a preemption).
A crash or SIGKILL at any point leaves the previous complete step as the newest loadable one: shards are atomic,
the meta is written only after every shard landed, and retention never touches the newest complete steps.

Cadence (`SaveSchedule`): `--save-every N` steps (upstream) and/or `--save-every-minutes M`, converted to a step
interval from the measured wall time per loop step. The clock is rank 0's; the interval is broadcast (at a few
agreed steps: after the first CALIBRATION_STEPS steps and at each time-based save), so all ranks decide alike.
The same measurement sets how often the loop asks the launcher about a preemption (about every
PREEMPTION_CHECK_S seconds of steps; a collective on Ray).
"""

import concurrent.futures
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from nanochat import storage
from nanochat.common import NanochatError, is_ddp_initialized, print0

logger = logging.getLogger(__name__)

CALIBRATION_STEPS = 3  # steps of wall time measured before the first time-based interval (skips none: see below)
# ask about a preemption about this often (Ray's drain watcher polls every 5 s); tests set 0: every step
PREEMPTION_CHECK_S = float(os.environ.get("NANOCHAT_PREEMPTION_CHECK_S", 5.0))


# -----------------------------------------------------------------------------
# Collectives used by both classes (no-ops in a single process)


def broadcast_value(value, src: int = 0):
    """rank src's value on every rank."""
    if not (is_ddp_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks(flags: list[bool], device) -> list[bool]:
    """Elementwise AND of each rank's flags."""
    if not (is_ddp_initialized() and dist.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


# -----------------------------------------------------------------------------
# Host snapshot of a state dict


def snapshot(obj):
    """A host-memory copy of a (nested) state dict: tensors copied (pinned, asynchronously, from a GPU), containers
    rebuilt (the loop mutates param_groups' lr in place), other leaves shared (immutable)."""
    cuda = []

    def copy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.device.type == "cpu":
                return x.clone()
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
            out.copy_(x, non_blocking=True)
            cuda.append(x.device)
            return out
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    if cuda and cuda[0].type == "cuda":
        torch.cuda.synchronize(cuda[0])  # the non-blocking copies are done before the tensors change again
    return out


# -----------------------------------------------------------------------------
# When to save


class SaveSchedule:
    """Which steps save (and ask about a preemption). All ranks call every method at the same steps."""

    def __init__(self, save_every: int, save_every_minutes: float, start_step: int, rank: int):
        self.save_every, self.minutes, self.rank = save_every, save_every_minutes, rank
        self.start_step = self.last_save = start_step
        self.interval = None  # steps per --save-every-minutes, once measured
        self.write_steps = 0  # steps the last background save took to complete: started that much earlier, so the
        # work a hard crash can lose (steps since the last COMPLETE checkpoint) stays within one interval
        self.check_every = 1  # steps between preemption checks (every step until measured)
        self.mark = (start_step, time.time())  # (step, rank 0's clock) of the last measurement

    def _measure(self, step: int) -> None:
        """Broadcast rank 0's seconds per step since the last mark; derive the intervals from it."""
        s0, t0 = self.mark
        now = time.time()
        sec = broadcast_value((now - t0) / max(1, step - s0) if self.rank == 0 else None)
        self.mark = (step, now)
        self.check_every = max(1, round(PREEMPTION_CHECK_S / max(sec, 1e-6)))
        if self.minutes > 0:
            self.interval = max(1, int(self.minutes * 60 / max(sec, 1e-6)))
            print0(f"Checkpoint cadence: {sec:.3f}s/step -> a checkpoint every {self.interval} steps "
                   f"(--save-every-minutes {self.minutes:g})")

    def after_step(self, step: int) -> None:
        """After an optimizer step (`step` = steps done). The first measurement includes warm-up and compilation:
        it errs towards saving early, and the next save measures again."""
        if step == self.start_step + CALIBRATION_STEPS:
            self._measure(step)

    def due(self, step: int) -> str | None:
        """'steps' (--save-every), 'minutes' (--save-every-minutes) or None, for a save before step `step` runs."""
        if step == self.start_step:
            return None  # the resume point is saved already
        if self.save_every > 0 and step % self.save_every == 0:
            return "steps"
        if self.interval is not None and step - self.last_save >= max(1, self.interval - self.write_steps):
            return "minutes"
        return None

    def saved(self, step: int, why: str | None) -> None:
        self.last_save = step
        if why == "minutes" and step > self.mark[0]:
            self._measure(step)  # follow the step time as it drifts (warm-up over, eval cost, ...)

    def check_preemption(self, step: int) -> bool:
        return step > self.start_step and (step - self.start_step) % self.check_every == 0


# -----------------------------------------------------------------------------
# Saving in the background


class CheckpointSaver:
    """Writes checkpoints of one run (see the module docstring for the protocol)."""

    def __init__(self, checkpoint_dir: str, rank: int, device, keep: int = -1, background: bool = True,
                 protect=lambda: ()):  # fmt: skip
        """keep: retention (`--keep-checkpoints`; < 1 keeps all). protect(): steps retention must keep (rank 0)."""
        self.dir, self.rank, self.device, self.keep, self.protect = checkpoint_dir, rank, device, keep, protect
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt") if background else None
        self.inflight = None  # (step, future of this rank's shard writes, meta, on_complete, final)
        self.cleanup = None  # rank 0: future of the last retention pass
        self.stalls = []  # (step, seconds the loop was blocked by save(): previous save + host copy)
        self.saved_steps = []

    def save(self, step: int, model_state, optim_state, meta: dict, on_complete, final: bool = False) -> None:
        """Start saving `step`: model_state is read on rank 0 only, optim_state (None: no optimizer file) on all.
        on_complete(step) runs on every rank once the step is complete on storage."""
        t0 = time.time()
        self.wait()
        if self.cleanup is not None:
            self.cleanup.result()  # retention of the previous save: it lists the directory we now write to
        model_host = snapshot(model_state) if self.rank == 0 else None
        optim_host = snapshot(optim_state) if optim_state is not None else None
        meta = json.loads(json.dumps(meta))  # plain JSON now: the loop's dicts keep changing
        job = lambda: self._write_shards(step, model_host, optim_host)  # noqa: E731
        if self.pool is not None:
            future = self.pool.submit(job)
        else:
            future = concurrent.futures.Future()
            try:
                job()
                future.set_result(None)
            except Exception as e:  # reported on every rank by _finish, like a background failure
                future.set_exception(e)
        self.inflight = (step, future, meta, on_complete, final)
        self.stalls.append((step, time.time() - t0))
        if self.pool is None:
            self.wait()  # synchronous saving: complete (meta + on_complete) before training continues

    def _write_shards(self, step, model_host, optim_host) -> None:
        from nanochat.checkpoint_manager import _save_torch, meta_path, model_path, optim_path

        storage.makedirs(self.dir)
        if self.rank == 0:
            if storage.exists(meta_path(self.dir, step)):  # re-saving a step: incomplete until its new meta lands
                storage.remove(meta_path(self.dir, step))
            _save_torch(model_host, model_path(self.dir, step))
        if optim_host is not None:
            _save_torch(optim_host, optim_path(self.dir, step, self.rank))

    def poll(self) -> None:
        """After every optimizer step: complete the in-flight save if every rank's shards landed (never blocks)."""
        if self.inflight is not None:
            self._finish(block=False)

    def wait(self) -> None:
        """Complete the in-flight save now (blocks until every rank's shards landed)."""
        if self.inflight is not None:
            self._finish(block=True)

    def close(self) -> None:
        self.wait()
        if self.cleanup is not None:
            self.cleanup.result()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _finish(self, block: bool) -> None:
        step, future, meta, on_complete, final = self.inflight
        if block:
            concurrent.futures.wait([future])
        done = future.done()
        ok = done and future.exception() is None
        all_done, all_ok = all_ranks([done, ok or not done], self.device)
        if not all_ok:
            self.inflight = None
            err = future.exception() if done else None
            raise NanochatError(f"saving checkpoint step {step} to {self.dir} failed on a rank"
                                + (f": {err}" if err else " (see that rank's log)"))  # fmt: skip
        if not all_done:
            return
        self.inflight = None
        if self.rank == 0:
            from nanochat.checkpoint_manager import meta_path

            storage.write_bytes(meta_path(self.dir, step), json.dumps(meta, indent=2).encode("utf-8"))
            logger.info(f"Saved checkpoint step {step} to {self.dir}")
            if self.keep is not None and self.keep > 0:
                protect = set(self.protect())
                launcher = meta.get("launcher")
                prune = lambda: self._prune(step if final else None, protect, launcher)  # noqa: E731
                self.cleanup = self.pool.submit(prune) if self.pool is not None else None
                if self.pool is None:
                    prune()
        self.saved_steps.append(step)
        on_complete(step)

    def _prune(self, final, protect, launcher) -> None:
        from nanochat.checkpoint_manager import prune_checkpoints

        try:
            prune_checkpoints(self.dir, self.keep, final=final, protect=protect, launcher=launcher)
            for name in storage.remove_stale_temp_files(self.dir):  # partial files of an earlier killed save
                logger.info(f"Removed stale temp file {name}")
        except (OSError, NanochatError) as e:  # retention is housekeeping: training goes on, the next pass retries
            print(f"WARNING: checkpoint retention in {self.dir} failed: {e}")


# -----------------------------------------------------------------------------
# What a training loop calls


class Checkpointing:
    """Cadence + background saver + preemption checks for one loop (pretraining, SFT, RL). Per rank; the loop calls
    `before_step` before each optimizer step (and once more after the last), `after_step` after each one, and
    `close` at the end. `make_save(why)` returns (model_state, optim_state or None, meta, on_complete)."""

    def __init__(self, checkpoint_dir: str, rank: int, device, sink, start_step: int, resumed: bool,
                 save_every: int = -1, save_every_minutes: float = -1, keep: int = -1, background: bool = True,
                 protect=lambda: (), step_offset: int = 0):  # fmt: skip
        """step_offset: file step = loop step + step_offset (RL names a checkpoint by its last update: -1)."""
        self.sink, self.start_step, self.resumed, self.step_offset = sink, start_step, resumed, step_offset
        self.schedule = SaveSchedule(save_every, save_every_minutes, start_step, rank)
        self.saver = CheckpointSaver(checkpoint_dir, rank, device, keep, background,
                                     protect=lambda: set(sink.protected_steps()) | set(protect()))
        self.last_saved = start_step if resumed else None
        self.preempted_at = None  # step of the just-in-time checkpoint, once a drain notice came

    def before_step(self, step: int, last: bool, make_save, force: str | None = None) -> None:
        """Save if the cadence (or `force`, e.g. an evaluation whose weights must survive a restart) says so, always
        at the last step (unless that is the step we resumed from), then ask about a preemption."""
        if last:
            why = None if (self.resumed and step == self.start_step) else "final"  # resumed at the end: it exists
        elif step == self.start_step:
            why = None  # the step we start from is saved already (or is step 0)
        else:
            why = force or self.schedule.due(step)
        if why is not None:
            self._save(step, why, make_save, final=last)
            self.schedule.saved(step, why)
        if last or not (getattr(self.sink, "checks_preemption", False) and self.schedule.check_preemption(step)):
            return
        notice = self.sink.preemption_notice()
        if notice is None:
            return
        print0(f"Step {step:05d} | preemption notice ({notice}): saving a just-in-time checkpoint")
        if self.last_saved != step:
            self._save(step, "preemption", make_save)
        self.saver.wait()  # complete and announced before the node goes
        self.preempted_at = step
        self.sink.hold_for_preemption(step, notice)

    def _save(self, step, why, make_save, final=False) -> None:
        model_state, optim_state, meta, on_complete = make_save(why)
        self.saver.save(step + self.step_offset, model_state, optim_state, {**meta, "save_reason": why}, on_complete,
                        final=final)
        self.last_saved = step

    def after_step(self, step: int) -> None:
        self.schedule.after_step(step)
        done_before = len(self.saver.saved_steps)
        self.saver.poll()
        if len(self.saver.saved_steps) > done_before:  # a background save completed at this step
            self.schedule.write_steps = step - (self.saver.saved_steps[-1] - self.step_offset)

    def close(self) -> None:
        self.saver.close()

    @property
    def stalls(self) -> list[tuple[int, float]]:
        return self.saver.stalls
