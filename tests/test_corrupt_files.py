"""python -m pytest tests/test_corrupt_files.py -q           (the Serve replica case starts Ray: -m "not ray" skips it)

Damaged inputs give one clear line, never a traceback: a truncated model file, a corrupt meta JSON, a corrupt
optimizer shard and a model file that does not match its meta, through every entry point that loads a checkpoint
(serve.chat_cli and ray_jobs.base_train --resume-from-step as subprocesses; serve.chat_web, ray_jobs.chat_eval /
base_eval / chat_sft / chat_rl through their main(argv) in-process), plus the Serve replica's deployment status;
and ray_jobs.tok_eval with a corrupt dataset shard exits non-zero unless --skip-corrupt says to skip it.
"""

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from nanochat.checkpoint_manager import CorruptCheckpointError, load_model_from_dir
from serve.tiny import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_S = 300  # a "does not hang" bound for one entry point run on a loaded machine


@pytest.fixture(scope="module")
def clean_base(tmp_path_factory):
    """A base dir with a tiny sft and base checkpoint (step 1, tag d2) and a rank-0 optimizer shard of the base."""
    base = str(tmp_path_factory.mktemp("clean"))
    make_tiny_checkpoint(base, depth=2, sequence_len=64, source="sft")
    base_dir = make_tiny_checkpoint(base, depth=2, sequence_len=64, source="base")
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": []},
               os.path.join(base_dir, "optim_000001_rank0.pt"))
    return base


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def corrupt_json(path):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])


def mismatched_model(path):
    """A valid model file of another model (depth 1): loads, but does not fit the meta next to it."""
    with open(path, "rb") as f:
        torch.load(f)  # the original is a real checkpoint
    other = make_tiny_checkpoint(os.path.join(os.path.dirname(path), "other"), depth=1, sequence_len=64)
    shutil.copy(os.path.join(other, "model_000001.pt"), path)


DAMAGE = {"truncated_model": ("model_000001.pt", truncate), "corrupt_meta": ("meta_000001.json", corrupt_json),
          "corrupt_optimizer": ("optim_000001_rank0.pt", truncate),
          "mismatched_model": ("model_000001.pt", mismatched_model)}


def damaged(clean_base, tmp_path, source, kind):
    """A copy of the clean base dir with one file of `source`'s checkpoint damaged; returns (base, damaged path)."""
    base = str(tmp_path / "base")
    shutil.copytree(clean_base, base)
    name, damage = DAMAGE[kind]
    path = os.path.join(base, {"sft": "chatsft_checkpoints", "base": "base_checkpoints"}[source], "d2", name)
    damage(path)
    return base, path


def run_entry(module, args, base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                       timeout=HANG_S, cwd=base)
    return p.returncode, p.stdout, p.stderr


def assert_one_line(rc, stdout, stderr, path, fixes=("re-save", "-s/--step")):
    assert rc != 0, f"exit 0 with a damaged {path}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert path in errors[0] and all(f in errors[0] for f in fixes), errors[0]


def run_in_process(module, args, base, monkeypatch, capsys):
    """The entry point's main(argv) in this process (torch is imported already: seconds cheaper than a
    subprocess); a traceback would be an exception escaping into pytest."""
    import importlib

    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(base)
    try:
        rc = importlib.import_module(module).main(args)
    except SystemExit as e:  # the eval entry points exit through user_errors_exit
        rc = e.code
    out = capsys.readouterr()
    return rc if isinstance(rc, int) else 0, out.out, out.err


# (entry point module, its flags, the checkpoint source it loads, the damage, subprocess?) for every load path: each
# kind of damage once as a subprocess, the other entry points in-process
ENTRY_CASES = [
    ("serve.chat_cli", ["-p", "hi", "--device-type", "cpu"], "sft", "truncated_model", True),
    ("serve.chat_cli", ["-p", "hi", "--device-type", "cpu"], "sft", "corrupt_meta", True),
    ("serve.chat_cli", ["-p", "hi", "--device-type", "cpu"], "sft", "mismatched_model", False),
    ("ray_jobs.base_train", ["--depth", "2", "--resume-from-step", "1", "--device-type", "cpu", "--num-workers", "0"],
     "base", "corrupt_optimizer", True),
    ("serve.chat_web", ["--device-type", "cpu", "-p", "0", "--no-ui"], "sft", "truncated_model", False),
    ("ray_jobs.chat_eval", ["-i", "sft", "-a", "SpellingBee", "-x", "1", "--device-type", "cpu"], "sft",
     "truncated_model", False),
    ("ray_jobs.base_eval", ["--eval", "sample", "--device-type", "cpu"], "base", "corrupt_meta", False),
    ("ray_jobs.chat_sft", ["--device-type", "cpu", "--num-workers", "0"], "base", "truncated_model", False),
    ("ray_jobs.chat_sft", ["--device-type", "cpu", "--num-workers", "0"], "base", "corrupt_optimizer", False),
    ("ray_jobs.chat_rl", ["--device-type", "cpu", "--num-workers", "0"], "sft", "truncated_model", False),
]


@pytest.mark.parametrize("module,args,source,kind,subproc", ENTRY_CASES,
                         ids=[f"{c[0].split('.')[-1]}-{c[3]}" for c in ENTRY_CASES])
def test_entry_points_name_the_damaged_file_in_one_line(clean_base, tmp_path, monkeypatch, capsys, module, args,
                                                        source, kind, subproc):
    base, path = damaged(clean_base, tmp_path, source, kind)
    if subproc:
        rc, stdout, stderr = run_entry(module, args, base)
    else:
        rc, stdout, stderr = run_in_process(module, args, base, monkeypatch, capsys)
    assert_one_line(rc, stdout, stderr, path)


def test_clean_checkpoint_still_loads(clean_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", clean_base)
    model, _, meta = load_model_from_dir(os.path.join(clean_base, "chatsft_checkpoints"), "cpu", "eval")
    assert meta["step"] == 1 and model.config.n_layer == 2


def test_the_load_error_is_a_nanochat_error_naming_the_file(clean_base, tmp_path, monkeypatch):
    base, path = damaged(clean_base, tmp_path, "sft", "truncated_model")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    with pytest.raises(CorruptCheckpointError) as e:
        load_model_from_dir(os.path.join(base, "chatsft_checkpoints"), "cpu", "eval")
    message = str(e.value)
    assert "\n" not in message and path in message and "steps in that directory: [1]" in message
    assert "failed finding central directory" in message  # torch's reason, first sentence only


@pytest.mark.ray
def test_serve_replica_deployment_failure_carries_the_line(clean_base, tmp_path):
    """The replica path (e.g. `serve deploy`, or chat_web on a cluster whose files the driver cannot see)."""
    import ray
    from ray import serve

    from serve.app import ChatAppArgs, build_app
    from serve.chat_web import deployment_error

    base, path = damaged(clean_base, tmp_path, "sft", "truncated_model")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(RuntimeError):
            serve.run(build_app(ChatAppArgs(base_dir=base, device_type="cpu", ui=False)), name="chat",
                      route_prefix="/")
        line = deployment_error("chat")
        assert line is not None and "\n" not in line and path in line and "-s/--step" in line, line
    finally:
        serve.shutdown()
        ray.shutdown()


# -----------------------------------------------------------------------------
# tok_eval with a corrupt dataset shard


@pytest.fixture
def corrupt_shard(base_dir, monkeypatch):
    """A tokenizer, three small shards of which the first (a train shard) is truncated; no network."""
    make_tiny_checkpoint(str(base_dir), depth=1, sequence_len=64)  # writes the tokenizer
    data = base_dir / "base_data_climbmix"
    data.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"document {i} {j} about rivers" for j in range(50)]}),
                       data / f"shard_{i:05d}.parquet", row_group_size=25)
    truncate(str(data / "shard_00000.parquet"))

    def offline(name):
        raise OSError(f"no network for {name} (simulated)")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    return str(data / "shard_00000.parquet")


def test_tok_eval_fails_on_a_corrupt_shard(corrupt_shard, capsys):
    from ray_jobs import tok_eval

    assert tok_eval.cli([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and corrupt_shard in err and "--skip-corrupt" in err and err.count("\n") == 1


def test_tok_eval_skip_corrupt_says_so(corrupt_shard, capsys):
    from ray_jobs import tok_eval

    assert tok_eval.cli(["--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert "shard-train: SKIPPED because of --skip-corrupt" in out and corrupt_shard in out
    assert "shard-val" in out  # the readable shard is still evaluated
