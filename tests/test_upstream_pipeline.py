"""python -m pytest tests/test_upstream_pipeline.py -q

Ours against a tiny pipeline that UPSTREAM nanochat ran (tests/fixtures/upstream_eval, written by
dev/make_upstream_fixtures_eval.py from nanochat@92d63d4): the same flags through ours give the same numbers.

- base_train (4 steps, upstream's flags through our CLI parser): every training loss, val bpb, final weights;
  and the checkpoint files it writes have upstream's names, keys, dtypes, shapes and meta fields
- CORE on a mini DCLM-format bundle: every example's outcome, per-task accuracy, centered results, CORE metric
- bits per byte on both splits (bos-bestfit loader + evaluate_bpb)
- chat eval: every predicted letter of ARC-Easy / ARC-Challenge / MMLU, every greedy GSM8K completion, and the
  GSM8K reward of fixed completions
- chat_sft (upstream mixture: SmolTalk + MMLU + GSM8K tables): every packed batch, loss and val bpb, final weights,
  and the checkpoint format
- chat_rl (2 steps, a text-length reward so that advantages are non-zero): every rollout, reward and loss, the
  step-0 pass@k, final weights, and the checkpoint format

Everything runs in this process on CPU in float32 with one torch thread (the fixture's conditions).
"""

import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import nanochat.chat_eval
import nanochat.engine
import nanochat.loss_eval
import nanochat.rl
import nanochat.sft
import nanochat.tasks.gsm8k
import nanochat.train
from nanochat.checkpoint_manager import load_checkpoint, load_model, save_checkpoint
from nanochat.gpt import GPT
from ray_jobs import base_train, chat_rl, chat_sft

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "upstream_eval"
CPU = torch.device("cpu")


def _load_generator():
    spec = importlib.util.spec_from_file_location("upstream_eval_gen", REPO / "dev" / "make_upstream_fixtures_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _load_generator()  # the generator's settings and helpers (it imports only stdlib, torch and pyarrow)
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
FORMATS = json.loads((FIXTURE / "checkpoint_format.json").read_text())
# Meta keys ours writes beyond upstream's (resume state, launcher record); anything else new fails the format test.
# (save_reason: why the checkpoint was written (steps, minutes, preemption, final); pending_evals: async evaluations
# not yet reported when it was written, relaunched after a restart. Upstream's loaders ignore keys they do not read.)
OUR_EXTRA_META = {
    "base": {"world_size", "dataloader_state_dicts", "run_id", "plan", "launcher", "save_reason", "pending_evals"},
    "sft": {"loop_state", "world_size", "dataloader_state_dicts", "run_id", "launcher", "save_reason",
            "pending_evals"},
    "rl": {"step", "user_config", "run_id", "launcher", "save_reason"},
}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A copy of the upstream-written base dir; NANOCHAT_BASE_DIR and the task data point at it. The fixture's
    conditions hold for the whole module: float32 compute whatever NANOCHAT_DTYPE says, one torch thread."""
    root = tmp_path_factory.mktemp("upstream_pipeline") / "base"
    shutil.copytree(FIXTURE / "base", root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):  # modules import the name: patch every copy
            if name.split(".")[0] == "nanochat" and hasattr(module, "COMPUTE_DTYPE"):
                mp.setattr(module, "COMPUTE_DTYPE", torch.float32)
        mp.setenv("NANOCHAT_BASE_DIR", str(root))
        mp.setenv("NANOCHAT_TASK_DATA_DIR", str(root / "task_data"))
        mp.setenv("NANOCHAT_DTYPE", "float32")
        mp.delenv("NANOCHAT_EVAL_BUNDLE_URL", raising=False)
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model(base):
    return load_model("base", CPU, phase="eval", model_tag="d2", step=G.BASE_STEP)[:2]


# Parameters whose gradient is exactly zero in exact arithmetic, i.e. +-1e-10 of float noise whose sign differs
# between any two summation orders; Adam's update is about lr * sign(g), so they move by +-lr either way. At depth 2
# the backout layer is the last one and the final norm cancels backout_lambda's scale, at every step; from scratch,
# the zero-initialised output projections also zero the first gradients of resid/x0 lambdas (measured at step 0:
# upstream 1.4e-10, ours -1.5e-11). Every other tensor must match.
ZERO_GRADIENT_AT_DEPTH_2 = {"backout_lambda"}
ZERO_GRADIENT_FROM_SCRATCH = ZERO_GRADIENT_AT_DEPTH_2 | {"resid_lambdas", "x0_lambdas"}


def assert_close_fingerprint(ours: dict, theirs: dict, rtol=1e-4, atol=1e-5, skip=ZERO_GRADIENT_AT_DEPTH_2):
    got = G.fingerprint(ours)
    assert got.keys() == theirs.keys()
    for k in sorted(set(theirs) - set(skip)):
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(theirs[k]), rtol=rtol, atol=atol, msg=k)


class ForwardRecorder:
    """Records (inputs, targets, loss) of every training-mode GPT forward with the given loss reduction."""

    def __init__(self, monkeypatch, reduction="mean"):
        self.calls, forward = [], GPT.forward

        def wrapper(model, idx, targets=None, kv_cache=None, loss_reduction="mean"):
            out = forward(model, idx, targets, kv_cache, loss_reduction)
            if model.training and targets is not None and loss_reduction == reduction:
                self.calls.append((idx.detach().clone(), targets.detach().clone(), out.detach().clone()))
            return out

        monkeypatch.setattr(GPT, "forward", wrapper)


class BpbRecorder:
    def __init__(self, monkeypatch, *modules):
        self.values, evaluate_bpb = [], nanochat.loss_eval.evaluate_bpb

        def wrapper(*args, **kwargs):
            self.values.append(evaluate_bpb(*args, **kwargs))
            return self.values[-1]

        for module in (nanochat.loss_eval, *modules):
            if hasattr(module, "evaluate_bpb"):
                monkeypatch.setattr(module, "evaluate_bpb", wrapper)


def describe(ckdir) -> dict:
    return G.describe_checkpoint_dir(str(ckdir))


def assert_meta_kinds(ours, theirs, stage, path=""):
    """Every field upstream writes exists in ours with the same JSON type (None allowed where upstream has one)."""
    for key, kind in theirs.items():
        assert key in ours, f"{stage}: meta field {path}{key} missing"
        if isinstance(kind, dict):
            assert isinstance(ours[key], dict), f"{stage}: {path}{key} is not an object"
            assert_meta_kinds(ours[key], kind, stage, f"{path}{key}.")
        else:
            assert ours[key] == kind or "null" in (ours[key], kind), f"{stage}: {path}{key}: {ours[key]} vs {kind}"


def assert_format(ours: dict, stage: str):
    theirs = FORMATS[stage]
    assert ours["files"] == theirs["files"], stage
    assert ours["model"] == theirs["model"], stage
    assert ("optim" in ours) == ("optim" in theirs), stage
    if "optim" in theirs:
        assert ours["optim"] == theirs["optim"], stage
    assert_meta_kinds(ours["meta"], theirs["meta"], stage)
    extra = set(ours["meta"]) - set(theirs["meta"])
    assert extra <= OUR_EXTRA_META[stage], f"{stage}: new meta fields {sorted(extra - OUR_EXTRA_META[stage])}"


# -----------------------------------------------------------------------------
# base_train


@pytest.fixture(scope="module")
def base_train_run(base, tmp_path_factory):
    # our base_train in a fresh base dir with the same shards and tokenizer, upstream's flags
    fresh = tmp_path_factory.mktemp("our_base_train")
    for rel in ("tokenizer", "base_data_climbmix"):
        shutil.copytree(base / rel, fresh / rel)
    cfg, _ = base_train.parse_args([*G.BASE_TRAIN_ARGS, "--num-workers=0"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(fresh))
        rec, bpb = ForwardRecorder(mp), BpbRecorder(mp, nanochat.train)
        result = nanochat.train.train(cfg)
    return {"result": result, "losses": [c[2].item() for c in rec.calls], "val_bpb": bpb.values,
            "ckdir": fresh / "base_checkpoints" / "d2"}  # fmt: skip


def test_base_train_matches_upstream(base_train_run):
    want = EXPECTED["base_train"]
    assert base_train_run["result"]["step"] == G.BASE_STEP
    torch.testing.assert_close(torch.tensor(base_train_run["losses"]), torch.tensor(want["losses"]), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(torch.tensor(base_train_run["val_bpb"]), torch.tensor(want["val_bpb"]), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    final = torch.load(base_train_run["ckdir"] / f"model_{G.BASE_STEP:06d}.pt")
    # Muon's orthogonalisation amplifies the noise of those zero gradients into the matrices a little: 1e-3
    assert_close_fingerprint(final, want["fingerprint"], rtol=1e-3, atol=1e-3, skip=ZERO_GRADIENT_FROM_SCRATCH)


def test_base_checkpoint_format_is_upstreams(base_train_run):
    assert_format(describe(base_train_run["ckdir"]), "base")


# -----------------------------------------------------------------------------
# Evaluation


def test_core_matches_upstream(base, base_model):
    from nanochat.core_eval import eval_bundle_dir, evaluate_core, evaluate_example, load_core_tasks, load_task_examples

    model, tokenizer = base_model
    want = EXPECTED["core"]
    for task in load_core_tasks(eval_bundle_dir()):
        data, pool, meta = load_task_examples(eval_bundle_dir(), task)
        outcomes = [evaluate_example(i, model, tokenizer, data, CPU, meta, pool=pool) for i in range(len(data))]
        assert outcomes == want["outcomes"][task["label"]], task["label"]
    core = evaluate_core(model, tokenizer, CPU)
    assert core["results"] == want["results"]
    assert core["centered_results"] == pytest.approx(want["centered_results"], abs=1e-12)
    assert core["core_metric"] == pytest.approx(want["core_metric"], abs=1e-12)
    assert any(want["outcomes"]["arc_easy"]) and not all(want["outcomes"]["arc_easy"])  # a fixture that can fail


def test_bits_per_byte_matches_upstream(base, base_model):
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    model, tokenizer = base_model
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, G.BPB["B"], G.BPB["T"], split, device=CPU)
        got = evaluate_bpb(model, loader, G.BPB["steps"], get_token_bytes(device=CPU))
        assert got == pytest.approx(EXPECTED["bpb"][split], rel=1e-6), split


def test_categorical_chat_eval_matches_upstream(base, base_model):
    from nanochat.chat_eval import make_task, run_categorical_eval

    model, tokenizer = base_model
    for name in G.CHAT_CATEGORICAL:
        task, predictions = make_task(name), []
        evaluate = task.evaluate
        task.evaluate = lambda conv, pred, ev=evaluate, seen=predictions: (seen.append(pred), ev(conv, pred))[1]
        acc = run_categorical_eval(task, tokenizer, model, G.CHAT_BATCH, max_problems=G.CHAT_MAX_PROBLEMS)
        assert predictions == EXPECTED["chat_eval"][name]["predictions"], name
        assert acc == EXPECTED["chat_eval"][name]["accuracy"], name


def test_generative_chat_eval_and_gsm8k_reward_match_upstream(base, base_model):
    from nanochat.chat_eval import make_task, run_generative_eval
    from nanochat.engine import Engine

    model, tokenizer = base_model
    task, completions = make_task("GSM8K"), []
    evaluate = task.evaluate
    task.evaluate = lambda conv, text: (completions.append(text), evaluate(conv, text))[1]
    g = G.GSM8K_GEN
    acc = run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), g["num_samples"], g["max_new_tokens"],
                              g["temperature"], g["top_k"], g["max_problems"])  # fmt: skip
    assert completions == EXPECTED["chat_eval"]["GSM8K"]["completions"]
    assert acc == EXPECTED["chat_eval"]["GSM8K"]["accuracy"]
    want = EXPECTED["chat_eval"]["GSM8K_reward"]
    assert [task[i]["messages"][-1]["content"][-1]["text"] for i in range(2)] == want["answers"]
    got = [[task.reward(task[i], c) for c in G.GSM8K_REWARD_COMPLETIONS] for i in range(2)]
    assert got == want["rewards"] and {0.0, 1.0} <= {r for row in got for r in row}


# -----------------------------------------------------------------------------
# SFT and RL


@pytest.fixture(scope="module")
def sft_run(base):
    cfg, _ = chat_sft.parse_args([*G.SFT_ARGS, "--num-workers=0"])
    assert cfg.mixture == "upstream"
    with pytest.MonkeyPatch.context() as mp:
        rec, bpb = ForwardRecorder(mp), BpbRecorder(mp, nanochat.sft)
        result = nanochat.sft.sft(cfg)
    return {"result": result, "calls": rec.calls, "val_bpb": bpb.values, "ckdir": Path(result["checkpoint_dir"])}


def test_sft_batches_losses_and_weights_match_upstream(sft_run):
    want, batches = EXPECTED["sft"], torch.load(FIXTURE / "expected.pt")
    calls = sft_run["calls"]
    assert len(calls) == len(want["losses"]) == len(batches["inputs"])
    for i, (x, y, _) in enumerate(calls):
        assert torch.equal(x, batches["inputs"][i].to(x.dtype)), f"packed inputs of step {i}"
        assert torch.equal(y, batches["targets"][i].to(y.dtype)), f"targets (masks) of step {i}"
    torch.testing.assert_close(torch.tensor([c[2].item() for c in calls]), torch.tensor(want["losses"]), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(torch.tensor(sft_run["val_bpb"]), torch.tensor(want["val_bpb"]), rtol=1e-5, atol=1e-5)
    assert sft_run["result"]["step"] == want["step"]
    final = torch.load(sft_run["ckdir"] / f"model_{want['step']:06d}.pt")
    assert_close_fingerprint(final, want["fingerprint"])


def test_sft_checkpoint_format_is_upstreams(sft_run):
    assert_format(describe(sft_run["ckdir"]), "sft")


@pytest.fixture(scope="module")
def rl_run(base, sft_run):
    """Ours from the same start (the base weights saved as an SFT checkpoint), same flags, same stand-in reward."""
    Engine = nanochat.engine.Engine
    model_data, _, meta = load_checkpoint(str(base / "base_checkpoints" / "d2"), G.BASE_STEP, CPU)
    save_checkpoint(str(base / "chatsft_checkpoints" / G.RL_TAG), G.BASE_STEP, model_data, None, meta)
    cfg, _ = chat_rl.parse_args([*G.RL_ARGS, "--num-workers=0"])
    rollouts, rewards, generate_batch = [], [], Engine.generate_batch

    def recording_generate(self, tokens, num_samples=1, **kwargs):
        seqs, masks = generate_batch(self, tokens, num_samples=num_samples, **kwargs)
        if "seed" in kwargs:
            rollouts.append({"seed": kwargs["seed"], "sequences": seqs, "masks": masks})
        return seqs, masks

    def reward(self, conversation, completion):
        rewards.append(G.rl_reward(conversation, completion))
        return rewards[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(Engine, "generate_batch", recording_generate)
        mp.setattr(nanochat.tasks.gsm8k.GSM8K, "reward", reward)
        result = nanochat.rl.rl(cfg)
    return {"result": result, "rollouts": rollouts, "rewards": rewards, "printed": printed.getvalue(),
            "ckdir": Path(result["checkpoint_dir"])}  # fmt: skip


def test_rl_rollouts_rewards_losses_and_weights_match_upstream(rl_run):
    want = EXPECTED["rl"]
    assert len(rl_run["rollouts"]) == len(want["rollouts"]) == 4
    for ours, theirs in zip(rl_run["rollouts"], want["rollouts"]):
        assert ours == theirs
    assert rl_run["rewards"] == want["rewards"] and len(set(want["rewards"])) > 1  # non-zero advantages
    losses = [float(x) for x in re.findall(r"\| Pass \d+ \| loss: (-?[0-9.]+) \|", rl_run["printed"])]
    assert losses == pytest.approx(want["losses"], abs=2e-6)
    assert f"Step 0 | {want['pass_at_k_step0']}" in rl_run["printed"]
    assert_close_fingerprint(torch.load(rl_run["ckdir"] / want["checkpoint"]), want["fingerprint"])


def test_rl_checkpoint_format_is_upstreams(rl_run):
    assert_format(describe(rl_run["ckdir"]), "rl")
