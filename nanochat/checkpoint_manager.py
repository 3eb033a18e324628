"""Save and load model / optimizer / metadata checkpoints, locally or on S3 (file format = upstream nanochat's).

A checkpoint directory `<base>/<base|chatsft|chatrl>_checkpoints/<model_tag>/` holds, per step N:
    model_{N:06d}.pt            torch.save of the model state_dict (written by rank 0)
    optim_{N:06d}_rank{R}.pt    torch.save of rank R's optimizer shard (every rank; absent for RL)
    meta_{N:06d}.json           metadata (step, model_config, user_config, loop/dataloader state, ...)

Crash safety: every file is written atomically (nanochat.storage), and meta is written LAST (after a barrier when
several ranks save optimizer shards), so a step counts as complete exactly when both its model and meta files
exist. `find_last_step` only returns complete steps, so a crash mid-save leaves the previous checkpoint as the
newest one. Directories written by upstream nanochat have the same files and load unchanged.

Typical use:  model, tokenizer, meta = load_model("sft", device, phase="eval")
"""

import dataclasses
import json
import logging
import os
import re

import torch

from nanochat import storage
from nanochat.common import NanochatError, get_base_dir

logger = logging.getLogger(__name__)

# source -> (directory under the base dir, the command that creates checkpoints there)
CHECKPOINT_SOURCES = {
    "base": ("base_checkpoints", "python -m ray_jobs.base_train"),
    "sft": ("chatsft_checkpoints", "python -m ray_jobs.chat_sft"),
    "rl": ("chatrl_checkpoints", "python -m ray_jobs.chat_rl"),
}


class CheckpointNotFoundError(NanochatError, FileNotFoundError):
    """No usable checkpoint where one was expected (also a FileNotFoundError, as upstream raised)."""


class CorruptCheckpointError(NanochatError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, or not a checkpoint file)."""


def log0(message):
    if int(os.environ.get("RANK", 0)) == 0:
        logger.info(message)


def model_path(checkpoint_dir, step):
    return storage.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return storage.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return storage.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def _creating_command(path):
    """The command that writes checkpoints into path (guessed from its checkpoints dir name), for error messages."""
    parts = str(path).replace("\\", "/").rstrip("/").split("/")
    for dirname, command in CHECKPOINT_SOURCES.values():
        if dirname in parts:
            return command
    return "a training job (python -m ray_jobs.base_train / chat_sft / chat_rl)"


def _found(listing, limit=10):
    if not listing:
        return "nothing"
    shown = ", ".join(listing[:limit])
    return shown + (f", ... ({len(listing)} entries)" if len(listing) > limit else "")


# -----------------------------------------------------------------------------
# Saving


def _save_torch(obj, path):
    with storage.atomic_writer(path) as f:
        torch.save(obj, f)


def _unloadable(path, err):
    """The one-line error for a checkpoint file that exists but cannot be loaded: the file, the cause, the fix."""
    name = str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    what = {"model": "Model file", "optim": "Optimizer shard", "meta": "Checkpoint meta file"}.get(
        name.split("_", 1)[0], "Checkpoint file")
    text = " ".join(str(err).split()).split(". ")[0][:300]  # its first sentence, on one line
    cause = type(err).__name__ + (f": {text}" if text else "")
    try:
        steps = complete_steps(str(path)[: -len(name) - 1])
    except Exception:  # the listing is only a hint: never hide the real error behind another one
        steps = "unknown"
    return CorruptCheckpointError(
        f"{what} {path} cannot be loaded ({cause}); it is truncated or corrupt: re-save it with "
        f"`{_creating_command(path)}`, or pick another step with -s/--step (training jobs: --model-step, "
        f"--resume-from-step); steps in that directory: {steps or 'none'}"
    )


def load_torch(path, device, mmap=False):
    """torch.load of one checkpoint file (local or S3) onto device; CorruptCheckpointError names the file when it
    cannot be loaded. mmap=True (local files only) maps the tensors instead of reading them: a cheap full check of
    the file's structure (a truncated file has no zip directory)."""
    # weights_only=True (torch's default): state dicts are tensors and plain Python containers/scalars.
    try:
        if storage.is_remote(path):
            with storage.open_read(path) as f:
                return torch.load(f, map_location=device)
        return torch.load(path, map_location=device, mmap=mmap)
    except (NanochatError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise _unloadable(path, e) from e


_load_torch = load_torch  # older private name, still used by callers


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Save one step. Call it on every rank when optimizer_data is given (shards are per rank, and the ranks meet at
    a barrier before rank 0 writes meta); with optimizer_data=None calling it on rank 0 only is fine."""
    meta_file = meta_path(checkpoint_dir, step)
    if rank == 0:
        storage.makedirs(checkpoint_dir)
        # Re-saving a step (after a resume): drop its old meta first so the step is incomplete until the end.
        if storage.exists(meta_file):
            storage.remove(meta_file)
        path = model_path(checkpoint_dir, step)
        _save_torch(model_data, path)
        logger.info(f"Saved model parameters to: {path}")
    if optimizer_data is not None:
        storage.makedirs(checkpoint_dir)
        path = optim_path(checkpoint_dir, step, rank)
        _save_torch(optimizer_data, path)
        logger.info(f"Saved optimizer state to: {path}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # meta must not announce the step before every rank's shard is written
    if rank == 0:
        storage.write_bytes(meta_file, json.dumps(meta_data, indent=2).encode("utf-8"))
        logger.info(f"Saved metadata to: {meta_file}")
        for name in storage.remove_stale_temp_files(checkpoint_dir):  # partial files of an earlier killed save
            logger.info(f"Removed stale temp file {name}")


# -----------------------------------------------------------------------------
# Retention: delete old steps, newest first never


_STEP_FILE = re.compile(r"(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)")


def steps_on_storage(checkpoint_dir, names=None):
    """{step: [file names]} of every checkpoint file in checkpoint_dir (complete or not)."""
    out = {}
    for name in storage.listdir(checkpoint_dir) if names is None else names:
        m = _STEP_FILE.fullmatch(name)
        if m:
            out.setdefault(int(m.group(1)), []).append(name)
    return out


def delete_checkpoint(checkpoint_dir, step, names=None):
    """Delete every file of one step: meta FIRST, so a crash mid-delete leaves an incomplete (ignored) step, never
    a meta that points at missing shards; then the model and every rank's optimizer shard."""
    names = steps_on_storage(checkpoint_dir, names).get(step, [])
    meta_name = os.path.basename(meta_path(checkpoint_dir, step))
    for name in sorted(names, key=lambda n: n != meta_name):  # meta first
        storage.remove(storage.join(checkpoint_dir, name))
    return names


def _launcher(checkpoint_dir, step):
    """The `launcher` entry of a step's meta (None for single-process runs), or "?" when the meta is unreadable."""
    try:
        return json.loads(storage.read_bytes(meta_path(checkpoint_dir, step))).get("launcher")
    except (OSError, ValueError, NanochatError):
        return "?"


def prune_checkpoints(checkpoint_dir, keep, final=None, protect=(), launcher=None):
    """Retention: keep the `keep` newest complete steps written by `launcher` (the meta's "launcher" entry: which
    run wrote them; None = single-process runs), plus `final` and every step in `protect`; delete the rest of that
    run's steps, and incomplete leftovers (a killed save) older than the oldest step kept. Steps of other runs are
    left alone. keep < 1 keeps everything. Returns the deleted steps."""
    if keep is None or keep < 1:
        return []
    names = storage.listdir(checkpoint_dir)
    by_step = steps_on_storage(checkpoint_dir, names)
    complete = set(complete_steps_from_names(names))
    ours = sorted(s for s in complete if s != final and _launcher(checkpoint_dir, s) == launcher)
    kept = set(ours[-keep:]) | set(protect) | ({final} if final is not None else set())
    oldest_kept = min(kept & complete, default=None)
    doomed = [s for s in ours if s not in kept]
    if oldest_kept is not None:  # files of a save that never completed (no meta) and is older than what we keep
        doomed += [s for s in by_step if s not in complete and s < oldest_kept and s not in kept]
    for s in sorted(doomed):
        delete_checkpoint(checkpoint_dir, s, names)
        logger.info(f"Retention: deleted checkpoint step {s} in {checkpoint_dir}")
    return sorted(doomed)


# -----------------------------------------------------------------------------
# Finding checkpoints


def complete_steps(checkpoint_dir):
    """Sorted steps in checkpoint_dir whose model and meta files both exist."""
    return complete_steps_from_names(storage.listdir(checkpoint_dir))


def complete_steps_from_names(names):
    """complete_steps of a directory listing."""
    names = set(names)
    steps = []
    for name in names:
        m = re.fullmatch(r"model_(\d+)\.pt", name)
        if m and f"meta_{m.group(1)}.json" in names:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    """The highest complete step in checkpoint_dir (see complete_steps)."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise CheckpointNotFoundError(
            f"No checkpoints found in {checkpoint_dir} (found: {_found(storage.listdir(checkpoint_dir))}); "
            f"create one with `{_creating_command(checkpoint_dir)}`"
        )
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """The model tag with the largest depth `d<N>`, else the most recently modified tag directory."""
    entries = storage.listdir(checkpoints_dir)
    tags = [t for t in entries if storage.isdir(storage.join(checkpoints_dir, t))]
    if not tags:
        raise CheckpointNotFoundError(
            f"No checkpoints found in {checkpoints_dir} (found: {_found(entries)}); "
            f"create them with `{_creating_command(checkpoints_dir)}`"
        )
    by_depth = [(int(m.group(1)), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if by_depth:
        return max(by_depth)[1]
    return max(tags, key=lambda t: storage.getmtime(storage.join(checkpoints_dir, t)))


# -----------------------------------------------------------------------------
# Loading


def _require_step(checkpoint_dir, step):
    """The model file of a complete step; CheckpointNotFoundError (listing the complete ones) otherwise."""
    mpath = model_path(checkpoint_dir, step)
    if not (storage.exists(mpath) and storage.exists(meta_path(checkpoint_dir, step))):
        steps = complete_steps(checkpoint_dir)
        raise CheckpointNotFoundError(
            f"Checkpoint step {step} is missing or incomplete in {checkpoint_dir} (complete steps: "
            f"{steps or 'none'}); pick one of those or create it with `{_creating_command(checkpoint_dir)}`"
        )
    return mpath


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta_data) of one step."""
    mpath = _require_step(checkpoint_dir, step)
    model_data = load_torch(mpath, device)
    optimizer_data = None
    if load_optimizer:
        opath = optim_path(checkpoint_dir, step, rank)
        if not storage.exists(opath):
            shards = [n for n in storage.listdir(checkpoint_dir) if n.startswith(f"optim_{step:06d}_")]
            raise CheckpointNotFoundError(
                f"Optimizer shard {opath} is missing (found: {_found(shards)}); optimizer state is sharded per "
                "rank, so resume with the same number of workers that saved it"
            )
        optimizer_data = load_torch(opath, device)
    meta_data = load_meta(checkpoint_dir, step)
    return model_data, optimizer_data, meta_data


def load_meta(checkpoint_dir, step):
    """The meta dict of one step; CorruptCheckpointError when it is not a JSON object."""
    path = meta_path(checkpoint_dir, step)
    raw = storage.read_bytes(path)
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unloadable(path, e) from e
    return meta


def check_checkpoint(checkpoint_dir, step, optimizer=False):
    """Before a job starts: raise the error a load would raise for a damaged meta, model file or (optimizer=True)
    optimizer shard of one step; returns its meta. Local files are checked in full but cheaply (memory-mapped);
    files on S3 only when they are loaded."""
    paths = [_require_step(checkpoint_dir, step)]
    meta = load_meta(checkpoint_dir, step)
    if optimizer:
        prefix = f"optim_{step:06d}_rank"
        paths += [storage.join(checkpoint_dir, n) for n in sorted(storage.listdir(checkpoint_dir))
                  if n.startswith(prefix)]
    for path in paths:
        if not storage.is_remote(path):
            load_torch(path, "cpu", mmap=True)
    return meta


def _patch_missing_config_keys(model_config_kwargs):
    # Checkpoints from before sliding-window attention were trained with full context everywhere.
    if "window_pattern" not in model_config_kwargs:
        model_config_kwargs["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config to 'L'")


def _patch_missing_keys(model_data, model_config):
    # Checkpoints from before the per-layer residual scalars: resid 1.0 and x0 0.0 reproduce the old network.
    n_layer = model_config.n_layer
    if "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0("Patching missing resid_lambdas in model data to 1.0")
    if "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0("Patching missing x0_lambdas in model data to 0.0")


def build_model(checkpoint_dir, step, device, phase):
    """Build the GPT of one checkpoint step. Returns (model, tokenizer, meta_data); the model is uncompiled."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    mpath = model_path(checkpoint_dir, step)
    if not isinstance(model_data, dict):
        raise _unloadable(mpath, TypeError(f"a {type(model_data).__name__}, not a state dict"))
    if device.type in {"cpu", "mps"}:
        # bf16 weights (saved from GPU) run in fp32 on CPU/MPS.
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    # torch.compile'd models prefix every key with "_orig_mod."
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if not isinstance(meta_data.get("model_config"), dict):
        raise _unloadable(meta_path(checkpoint_dir, step), ValueError("no model_config object"))
    model_config_kwargs = dict(meta_data["model_config"])
    _patch_missing_config_keys(model_config_kwargs)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(model_config_kwargs) - known)
    if unknown:
        log0(f"Ignoring unknown model_config keys {unknown}")
    try:
        model_config = GPTConfig(**{k: v for k, v in model_config_kwargs.items() if k in known})
    except (TypeError, ValueError) as e:
        raise _unloadable(meta_path(checkpoint_dir, step), e) from e
    log0(f"Building model with config: {model_config}")
    _patch_missing_keys(model_data, model_config)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffers; the weights are overwritten just below
    try:
        model.load_state_dict(model_data, strict=True, assign=True)
    except RuntimeError as e:  # missing / unexpected keys or shapes: the file does not belong to this meta
        raise _unloadable(mpath, e) from e
    if phase == "train":
        model.train()
    else:
        model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise NanochatError(
            f"Tokenizer vocab size {tokenizer.get_vocab_size()} does not match the checkpoint's vocab size "
            f"{model_config.vocab_size} ({checkpoint_dir}); use the tokenizer this model was trained with "
            "(NANOCHAT_BASE_DIR/tokenizer)"
        )
    return model, tokenizer, meta_data


# -----------------------------------------------------------------------------
# Convenience functions on nanochat's directory layout


def checkpoints_dir_for(source):
    """<base dir>/<base|chatsft|chatrl>_checkpoints for source in {base, sft, rl}."""
    if source not in CHECKPOINT_SOURCES:
        raise ValueError(f"source must be one of {sorted(CHECKPOINT_SOURCES)}, got {source!r}")
    return storage.join(get_base_dir(), CHECKPOINT_SOURCES[source][0])


def _resolve(checkpoints_dir, model_tag, step):
    """(checkpoint_dir, step) with defaults: largest model tag, last complete step."""
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = storage.join(checkpoints_dir, model_tag)
    if not storage.isdir(checkpoint_dir):
        raise CheckpointNotFoundError(
            f"No model tag {model_tag!r} in {checkpoints_dir} (found: {_found(storage.listdir(checkpoints_dir))}); "
            f"pass one of those or create it with `{_creating_command(checkpoints_dir)}`"
        )
    if step is None:
        step = find_last_step(checkpoint_dir)
    return checkpoint_dir, step


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    checkpoint_dir, step = _resolve(checkpoints_dir, model_tag, step)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def check_model_checkpoint(checkpoints_dir, model_tag=None, step=None):
    """Resolve (model_tag, step) as load_model_from_dir does and check_checkpoint that step; returns
    (checkpoint_dir, step). For launchers that load the model elsewhere (Ray workers, Serve replicas)."""
    checkpoint_dir, step = _resolve(checkpoints_dir, model_tag, step)
    check_checkpoint(checkpoint_dir, step)
    return checkpoint_dir, step


def load_model(source, device, phase, model_tag=None, step=None):
    """Load the model of source in {base, sft, rl} from the base dir: returns (model, tokenizer, meta_data)."""
    return load_model_from_dir(checkpoints_dir_for(source), device, phase, model_tag=model_tag, step=step)


def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """Just one rank's optimizer shard (None, with a log line, if that file does not exist)."""
    checkpoint_dir, step = _resolve(checkpoints_dir_for(source), model_tag, step)
    path = optim_path(checkpoint_dir, step, rank)
    if not storage.exists(path):
        log0(f"Optimizer checkpoint not found: {path}")
        return None
    log0(f"Loading optimizer state from {path}")
    return load_torch(path, device)
