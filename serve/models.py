"""
Model names for serving several checkpoints in one app, and their safe resolution to checkpoint files.

A model name is `<source>[:<tag>][@<step>]`, with source one of base | sft | rl (upstream's -i), tag a model tag
directory (upstream's -g, e.g. d20) and step a checkpoint step (upstream's -s):

    sft            the largest model tag under <base>/chatsft_checkpoints, its last complete step
    base:d20       <base>/base_checkpoints/d20, its last complete step
    rl:d20@650     <base>/chatrl_checkpoints/d20, step 650

The app serves a list of names (ChatAppArgs.models; the first is the default for requests without `model`), and
also any served name that has no step with an `@<step>` suffix (`sft:d20@650` when `sft:d20` is served). Names are
parsed with a strict grammar (a tag is letters, digits, `_`, `-` and `.`, never starting with `.`), so no name can
hold a path separator, `..` or an absolute path; after resolution the checkpoint directory and files must lie
inside the base dir (a symlink that leads out of it is refused).

No torch here (the ingress imports this module); resolve() imports the checkpoint manager lazily.
"""

from __future__ import annotations

import dataclasses
import os
import re

SOURCES = ("base", "sft", "rl")
_NAME = re.compile(r"(base|sft|rl)(?::([A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}))?(?:@([0-9]{1,9}))?")


class ModelNotFound(LookupError):
    """A model name that is not served or has no checkpoint (HTTP 404)."""


@dataclasses.dataclass(frozen=True)
class ModelName:
    source: str
    tag: str | None = None
    step: int | None = None

    @classmethod
    def parse(cls, name: str) -> ModelName:
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise ModelNotFound(f"{name!r} is not a model name; names look like sft, base:d20 or sft:d20@650 "
                                "(source base|sft|rl, then optionally :tag and @step)")
        return cls(m.group(1), m.group(2), None if m.group(3) is None else int(m.group(3)))

    def __str__(self) -> str:
        return self.source + (f":{self.tag}" if self.tag else "") + (f"@{self.step}" if self.step is not None else "")


def default_model_name(source: str = "sft", model_tag: str | None = None, step: int | None = None) -> str:
    """The name of the checkpoint upstream's -i/-g/-s flags pick."""
    return str(ModelName(source, model_tag, step))


class ServedModels:
    """The names an app serves: `names` (first = default), plus `@step` variants of names without a step."""

    def __init__(self, names: list[str]):
        if not names:
            raise ValueError("models must list at least one model name (e.g. ['sft', 'base'])")
        parsed = []
        for name in names:
            try:
                parsed.append(ModelName.parse(name))
            except ModelNotFound as e:
                raise ValueError(f"models: {e}") from None
        self.names = [str(p) for p in parsed]  # canonical spelling
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"models lists a name twice: {self.names}")
        self._stepless = {dataclasses.replace(p, step=None) for p in parsed if p.step is None}
        self.default = self.names[0]

    def resolve(self, name: str | None) -> str:
        """The canonical served name for a request's `model` (None = the default); ModelNotFound otherwise."""
        if name is None:
            return self.default
        try:
            parsed = ModelName.parse(name)
        except ModelNotFound:
            parsed = None
        if parsed is not None and (str(parsed) in self.names or
                                   (parsed.step is not None and dataclasses.replace(parsed, step=None) in
                                    self._stepless)):
            return str(parsed)
        steps = " (a served name without a step also takes @<step>)" if self._stepless else ""
        raise ModelNotFound(f"The model {name!r} does not exist on this server; served models: "
                            f"{', '.join(self.names)}{steps}")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve(name: str) -> tuple[str, int]:
    """ModelName string -> (checkpoint_dir, step) under the base dir (NANOCHAT_BASE_DIR); ModelNotFound when there
    is no such checkpoint or when it would lie outside the base dir."""
    from nanochat import storage
    from nanochat.checkpoint_manager import (
        CheckpointNotFoundError,
        checkpoints_dir_for,
        complete_steps,
        find_largest_model,
        find_last_step,
        meta_path,
        model_path,
    )
    from nanochat.common import get_base_dir

    parsed = ModelName.parse(name)
    base = get_base_dir()
    root = checkpoints_dir_for(parsed.source)
    try:
        tag = parsed.tag or find_largest_model(root)
        checkpoint_dir = storage.join(root, tag)
        if not storage.isdir(checkpoint_dir):
            tags = storage.listdir(root) if storage.isdir(root) else []
            raise ModelNotFound(f"model {name}: no model tag {tag!r} in {root} (found: {', '.join(tags) or 'none'})")
        step = find_last_step(checkpoint_dir) if parsed.step is None else parsed.step
    except CheckpointNotFoundError as e:
        raise ModelNotFound(f"model {name}: {e}") from None
    if not (storage.exists(model_path(checkpoint_dir, step)) and storage.exists(meta_path(checkpoint_dir, step))):
        raise ModelNotFound(f"model {name}: no step {step} in {checkpoint_dir} (complete steps: "
                            f"{complete_steps(checkpoint_dir) or 'none'})")
    if not storage.is_remote(base):  # a symlink inside the base dir must not lead out of it
        for path in (checkpoint_dir, model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step)):
            if not _inside(path, base):
                raise ModelNotFound(f"model {name}: {path} leads outside the base dir {base} (a symlink?); "
                                    "refusing to load it")
    return checkpoint_dir, step
