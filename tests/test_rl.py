"""RL (nanochat/rl.py, ray_jobs/chat_rl.py): the advantage / policy-gradient math against a hand computation, seeds,
pass@k, a few real RL steps on a tiny SFT checkpoint (determinism, chatrl_checkpoints layout, load_model('rl')),
GSM8K from offline parquet through the CLI, bad input, and 2 Ray Train workers == 1 process.

python -m pytest tests/test_rl.py -q
"""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanochat.common import NanochatError
from nanochat.rl import (
    RL_TASKS,
    RLConfig,
    advantages_from_rewards,
    build_rollout_batch,
    lr_multiplier,
    num_steps_for,
    pass_at_k_counts,
    pg_loss,
    rl,
    rollout_seed,
    sample_rollouts,
)
from nanochat.tasks.common import Task
from nanochat.train import TrainSink
from tests.eval_fixtures import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Fixtures: a tiny SFT checkpoint (depth 2, 320-token tokenizer), GSM8K-format parquet, a task with mixed rewards


class VowelTask(Task):
    """Reward 1.0 when the completion contains a lowercase vowel: a tiny random model gets it about half the time,
    so advantages are non-zero (GSM8K's reward is always 0 for an untrained model)."""

    def __init__(self, n=8, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"Say a word {index}"},
                             {"role": "assistant", "content": "apple"}]}  # fmt: skip

    def evaluate(self, conversation, completion):
        return int(any(c in completion for c in "aeiou"))

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


def vowel_tasks():
    return VowelTask(8), VowelTask(4)


def write_gsm8k(root, n_train=4, n_test=2):
    """openai/gsm8k main train/test in the task_data layout (manifest + parquet) that NANOCHAT_TASK_DATA_DIR reads."""
    for split, n in (("train", n_train), ("test", n_test)):
        d = os.path.join(root, "openai--gsm8k", "main", split)
        os.makedirs(d, exist_ok=True)
        q = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?" for i in range(n)]
        a = [f"He has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}" for i in range(n)]
        pq.write_table(pa.table({"question": q, "answer": a}), os.path.join(d, "00000.parquet"))
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(["00000.parquet"], f)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A base dir with a tokenizer and chatsft_checkpoints/d2/model_000003.pt, plus offline GSM8K task data."""
    root = tmp_path_factory.mktemp("rl_template")
    make_tiny_checkpoint(str(root / "base"), source_dir="chatsft_checkpoints", tag="d2", step=3)
    write_gsm8k(str(root / "task_data"))
    return root


@pytest.fixture
def sft_base(template, tmp_path, monkeypatch):
    """A fresh copy of the template base dir as NANOCHAT_BASE_DIR (RL writes chatrl_checkpoints into it)."""
    base = tmp_path / "base"
    shutil.copytree(template / "base", base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(template / "task_data"))
    monkeypatch.setitem(RL_TASKS, "vowels", vowel_tasks)
    return base


def tiny_cfg(**kw):
    base = dict(device_type="cpu", device_batch_size=2, examples_per_step=2, num_samples=2, max_new_tokens=6,
                num_iterations=2, eval_every=2, eval_examples=2, save_every=1, task="vowels", matrix_lr=0.2,
                embedding_lr=2.0, unembedding_lr=0.04, init_lr_frac=1.0)
    base.update(kw)
    return RLConfig(**base)  # the 'vowels' task is registered by the sft_base fixture


# -----------------------------------------------------------------------------
# The math, by hand


def tiny_model(seed=0):
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=32, vocab_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


PROMPT = [1, 2, 3]
# sample A: sampled 4, 5, forced tool output 6, sampled 7; sample B: sampled 8 then stopped; C: sampled 9, 10
SEQS = [PROMPT + [4, 5, 6, 7], PROMPT + [8], PROMPT + [9, 10]]
MASKS = [[0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1, 1]]
REWARDS = [1.0, 0.0, 0.0]
PAD = 15


def test_rollout_batch_targets_and_advantages():
    inputs, targets, rewards, adv = build_rollout_batch(SEQS, MASKS, REWARDS, PAD, "cpu")
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 8, 15, 15], [1, 2, 3, 9, 10, 15]]
    # only sampled tokens are targets: not the prompt, the forced tool output (6) or the padding
    assert targets.tolist() == [[-1, -1, 4, 5, -1, 7], [-1, -1, 8, -1, -1, -1], [-1, -1, 9, 10, -1, -1]]
    assert rewards.tolist() == REWARDS
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])  # r - mean, no std division
    assert advantages_from_rewards(torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]  # all equal: no signal


def hand_logp(model, inputs, row, t, token):
    """log p(token | inputs[row, :t+1]) from the full-sequence logits."""
    logits = model(inputs)  # (B, T, V)
    return F.log_softmax(logits[row, t].float(), dim=-1)[token]


@pytest.mark.parametrize("device_batch_size", [3, 1])
def test_pg_loss_matches_hand_computation(device_batch_size):
    model = tiny_model()
    inputs, targets, _, adv = build_rollout_batch(SEQS, MASKS, REWARDS, PAD, "cpu")
    examples_per_rank = 2  # the step has 2 questions per rank: every loss is also divided by 2
    num_passes = 3 // device_batch_size
    ours = []
    for p in range(num_passes):
        rows = slice(p * device_batch_size, (p + 1) * device_batch_size)
        ours.append(pg_loss(model, inputs[rows], targets[rows], adv[rows], num_passes, examples_per_rank))
    # by hand: the (row, position, token) triples that are trained on, per row
    trained = {0: [(2, 4), (3, 5), (5, 7)], 1: [(2, 8)], 2: [(2, 9), (3, 10)]}
    a = [2 / 3, -1 / 3, -1 / 3]
    hand = []
    for p in range(num_passes):
        rows = range(p * device_batch_size, (p + 1) * device_batch_size)
        valid = sum(len(trained[r]) for r in rows)
        obj = sum(a[r] * hand_logp(model, inputs, r, t, tok) for r in rows for t, tok in trained[r])
        hand.append(-obj / (valid * num_passes * examples_per_rank))
    for o, h in zip(ours, hand):
        assert o.item() == pytest.approx(h.item(), rel=1e-5, abs=1e-7)
    # and the same gradients
    grads = []
    for losses in (ours, hand):
        model.zero_grad()
        sum(losses).backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7)


def test_gradient_step_raises_rewarded_sample_probability():
    model = tiny_model(seed=1)
    inputs, targets, _, adv = build_rollout_batch(SEQS, MASKS, REWARDS, PAD, "cpu")

    def seq_logp(row):  # log-probability of a sample's sampled tokens
        logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
        return logp[row].sum().item()

    before = [seq_logp(r) for r in range(3)]
    pg_loss(model, inputs, targets, adv, 1, 1).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    after = [seq_logp(r) for r in range(3)]
    assert after[0] > before[0]  # the rewarded sample (A > 0) became more likely
    assert after[1] < before[1] and after[2] < before[2]  # the others (A < 0) less likely


def test_seeds_schedule_horizon_and_pass_at_k():
    # rollout seeds: upstream's hash((step, example, sampling_step)), identical in a process with another hash salt
    code = "from nanochat.rl import rollout_seed; print(rollout_seed(3, 17, 1), rollout_seed(3, 17, 1, seed=5))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert [int(x) for x in out] == [rollout_seed(3, 17, 1), rollout_seed(3, 17, 1, seed=5)]
    assert rollout_seed(3, 17, 1) == hash((3, 17, 1)) & 0x7FFFFFFF
    assert len({rollout_seed(s, e, k) for s in range(4) for e in range(4) for k in range(2)}) == 32
    assert 0 <= rollout_seed(3, 17, 1, seed=-(2**40)) < 2**31
    # linear ramp-down; horizon = (7473 // 16) * epochs for GSM8K at the defaults
    assert [lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert num_steps_for(RLConfig(), 7473) == 467 and num_steps_for(RLConfig(num_epochs=2), 7473) == 934
    assert num_steps_for(RLConfig(num_iterations=5), 7473) == 5
    with pytest.raises(NanochatError, match="--examples-per-step"):
        num_steps_for(RLConfig(), 10)
    # pass@k: an example counts for k when any of its first k samples is correct
    outcomes = [[False, True, False], [False, False, False], [True, False, False]]
    assert pass_at_k_counts(outcomes, 3) == [1, 2, 2]


def test_offline_arithmetic_task_rewards():
    from nanochat.rl import load_tasks

    train, test = load_tasks("arithmetic")
    assert (len(train), len(test)) == (7473, 1319) and num_steps_for(RLConfig(task="arithmetic"), len(train)) == 467
    conversation = train[5]
    answer = conversation["messages"][-1]["content"][-1]["text"]  # '\n#### N'
    assert train.reward(conversation, "Let me calculate: " + answer) == 1.0
    assert train.reward(conversation, "#### 123456789") == 0.0 and train.reward(conversation, "no answer") == 0.0
    assert train[5] == conversation and test[5] != conversation  # generated deterministically, disjoint splits


@pytest.mark.parametrize("kwargs,flag", [
    (dict(num_samples=3, device_batch_size=2), "--num-samples"), (dict(examples_per_step=0), "--examples-per-step"),
    (dict(task="mmlu"), "--task"), (dict(device_type="tpu"), "--device-type"), (dict(top_k=-1), "--top-k"),
    (dict(model_step="x"), "--model-step"),
])  # fmt: skip
def test_bad_flags_name_the_flag(kwargs, flag):
    with pytest.raises(NanochatError, match=flag):
        RLConfig(**kwargs)
    with pytest.raises(NanochatError, match="divisible by the number of workers"):
        RLConfig(examples_per_step=3).validate(world_size=2)


# -----------------------------------------------------------------------------
# Real RL steps on a tiny SFT checkpoint


def test_rl_steps_deterministic_and_checkpoint_loads_as_rl(sft_base):
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    first = rl(tiny_cfg())
    ckpt = sft_base / "chatrl_checkpoints" / "d2"
    # model + meta only (RL saves no optimizer state); file step N = weights after the update of step N
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_000001.json", "model_000001.pt"]
    meta = json.loads((ckpt / "meta_000001.json").read_text())
    assert meta["model_config"]["n_layer"] == 2 and meta["step"] == 1
    rewards = [r for _, r in first["rewards"]]
    assert len(rewards) == 2 and 0 < sum(rewards) < 2, rewards  # mixed rewards: the gradient is not zero
    assert [s for s, _ in first["pass_at_k"]] == [0, 2] and len(first["final_pass_at_k"]) == 2
    rl_model, tokenizer, rl_meta = load_model("rl", "cpu", phase="eval")
    sft_model, _, _ = load_model("sft", "cpu", phase="eval")
    assert rl_meta["step"] == 1 and tokenizer.get_vocab_size() == 320
    changed = [n for n, p in rl_model.state_dict().items() if not torch.equal(p, sft_model.state_dict()[n])]
    assert "lm_head.weight" in changed and any(n.startswith("transformer.h.") for n in changed)
    weights = torch.load(ckpt / "model_000001.pt")

    # same config, same seeds -> the same rollouts and bitwise the same weights
    shutil.rmtree(ckpt)
    second = rl(tiny_cfg())
    assert second["rewards"] == first["rewards"] and second["pass_at_k"] == first["pass_at_k"]
    again = torch.load(ckpt / "model_000001.pt")
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    # --eval-every -1: no pass@k; --model-tag picks the SFT tag and names the RL output dir
    third = rl(tiny_cfg(model_tag="d2", num_iterations=1, eval_every=-1))
    assert third["pass_at_k"] == [] and third["final_pass_at_k"] is None and (ckpt / "model_000000.pt").exists()

    # a launcher's resume (Ray: restarted worker group) continues after the checkpoint step with its weights:
    # step 0 had lrm 1.0 in both runs, so step 1's rollouts (and rewards) equal the uninterrupted run's
    class ResumeAt0(TrainSink):
        def resume_step(self, checkpoint_dir):
            return 0

    resumed = rl(tiny_cfg(eval_every=-1), ResumeAt0())
    assert resumed["start_step"] == 1 and resumed["rewards"] == first["rewards"][1:]
    assert resumed["sequence_lengths"] == first["sequence_lengths"][1:]

    # rollouts: same (step, question, seed) -> same samples; another --seed -> other samples
    engine = Engine(sft_model, tokenizer)
    task = VowelTask()
    draw = lambda seed, step=0: sample_rollouts(engine, tokenizer, task, task[0], tiny_cfg(seed=seed, num_samples=4),
                                                step, 0)[0]
    assert draw(0) == draw(0) and draw(0) != draw(1) and draw(0) != draw(0, step=1)
    assert len(draw(0)) == 4


def test_missing_sft_checkpoint_names_chat_sft(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(NanochatError, match="python -m ray_jobs.chat_sft"):
        rl(RLConfig(device_type="cpu"))


def test_cli_gsm8k_offline_and_bad_input(sft_base, tmp_path):
    env = {**os.environ, "NANOCHAT_DTYPE": "float32"}
    cmd = [sys.executable, "-m", "ray_jobs.chat_rl", "--num-workers", "0", "--device-type", "cpu",
           "--device-batch-size", "2", "--examples-per-step", "2", "--num-samples", "2", "--max-new-tokens", "4",
           "--eval-every", "1", "--eval-examples", "1", "--model-step", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # GSM8K train has 4 questions: (4 // 2) * 1 epoch = 2 steps; pass@k before each step and after the last
    assert "Calculated number of steps: 2" in proc.stdout
    assert "Step 0 | Pass@1: 0.0000, Pass@2: 0.0000" in proc.stdout and "Step 2 | Pass@1:" in proc.stdout
    assert "Step 1/2 | Average reward: 0.0" in proc.stdout  # an untrained model never answers '#### N'
    assert "✅ Saved model checkpoint to" in proc.stdout
    assert (sft_base / "chatrl_checkpoints" / "d2" / "model_000001.pt").exists()
    # bad input: exit 2, one clear line, no traceback, no Ray started
    bad = [
        (["--num-samples", "3", "--device-batch-size", "2"], "--num-samples"),
        (["--examples-per-step", "3", "--num-workers", "2"], "divisible by the number of workers"),
        (["--model-tag", "d9"], "python -m ray_jobs.chat_sft"),
    ]
    empty_env = {**env, "NANOCHAT_BASE_DIR": str(tmp_path / "empty")}
    bad.append(([], "python -m ray_jobs.chat_sft"))
    for i, (flags, message) in enumerate(bad):
        run_env = empty_env if i == len(bad) - 1 else env
        proc = subprocess.run([sys.executable, "-m", "ray_jobs.chat_rl", "--num-workers", "0", *flags],
                              capture_output=True, text=True, cwd=REPO, env=run_env, timeout=120)
        assert proc.returncode == 2, (flags, proc.stdout[-2000:], proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr


# -----------------------------------------------------------------------------
# Ray Train: 2 workers (1 question each per step) == 1 process (2 questions per step)


def vowel_worker(config):
    import nanochat.rl
    from ray_jobs import chat_rl

    # this test's task, registered in the worker's own module (a global captured by value would be a copy)
    nanochat.rl.RL_TASKS["vowels"] = vowel_tasks
    chat_rl.worker_fn(config)


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_workers_equal_one_process(sft_base, template, tmp_path):
    import ray
    import ray.cloudpickle

    from nanochat.checkpoint_manager import load_checkpoint
    from ray_jobs import train_common as tc

    single = rl(tiny_cfg(eval_every=-1))
    single_model = load_checkpoint(single["checkpoint_dir"], 1, "cpu")[0]
    shutil.rmtree(single["checkpoint_dir"])

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    env = {"NANOCHAT_DTYPE": "float32", "NANOCHAT_BASE_DIR": str(sft_base),
           "NANOCHAT_TASK_DATA_DIR": str(template / "task_data"), "NANOCHAT_COLLECTIVE_TIMEOUT_S": "120"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        cfg = tiny_cfg(eval_every=-1)
        cfg.device_type = "cpu"
        cluster = tc.ClusterArgs(num_workers=2, cpus_per_worker=1, max_failures=0, storage=str(tmp_path / "runs"))
        config = {"cfg": cfg.to_dict(), "run_name": "rl-two", "report_every": 1}
        two = tc.run_trainer(vowel_worker, config, cluster, use_gpu=False, run_name="rl-two").metrics
    finally:
        ray.shutdown()
    assert two["world_size"] == 2 and two["final"]
    for (s1, r1), (s2, r2) in zip(single["rewards"], two["rewards"]):
        assert s1 == s2 and r1 == pytest.approx(r2, abs=1e-6)  # the same questions and the same rollouts
    two_model = load_checkpoint(two["checkpoint_dir"], 1, "cpu")[0]
    diff = max((single_model[k] - two_model[k]).abs().max().item() for k in single_model)
    assert diff < 1e-5, diff  # gradients: mean over 2 questions == all-reduce(AVG) of 2 ranks x 1 question
