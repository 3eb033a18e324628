"""
Generate tests/fixtures/upstream_eval/: a tiny nanochat pipeline run by UPSTREAM's own scripts and functions, with
everything a test needs to rerun the same steps with ours and compare.

    python dev/make_upstream_fixtures_eval.py /tmp/upstream [--out tests/fixtures/upstream_eval]

The argument is an unpacked upstream checkout (nanochat@92d63d4). Upstream runs in a subprocess (this file
re-invoked with --role upstream) with only the checkout on sys.path, so its `nanochat` never mixes with ours; its
scripts run unmodified through runpy, with CPU/offline adjustments made from outside (torch.compile -> identity,
recording wrappers around GPT.forward, Engine.generate_batch, evaluate_bpb and the task rewards). Nothing of
upstream's code is copied: only its outputs are saved.

Steps (upstream, in a temp base dir, CPU, float32):
  1. tokenizer: RustBPETokenizer.train_from_iterator on the generated shards (+ token_bytes.pt, as tok_train does)
  2. scripts/base_train.py: depth 2, n_embd 32, T 128, 4 steps on two generated parquet shards; every training
     loss, the val bpb values, and a fingerprint of the final weights
  3. CORE: scripts/base_eval.evaluate_core on the mini DCLM bundle of dev/make_eval_fixtures.py, plus each example's
     outcome (core_eval.evaluate_example) in evaluate_core's shuffled order
  4. bits per byte: the bos-bestfit loader + loss_eval.evaluate_bpb on both splits
  5. chat eval: scripts/chat_eval.run_categorical_eval (ARC-Easy, ARC-Challenge, MMLU; every predicted letter)
     and run_generative_eval (GSM8K, greedy; every completion); GSM8K.reward on fixed completions
  6. scripts/chat_sft.py: 3 steps (SmolTalk + MMLU + GSM8K tables); every packed training batch, its loss, the val
     bpb values, and a fingerprint of the final weights
  7. scripts/chat_rl.py: 2 steps from the base weights saved as an SFT checkpoint, with RL_REWARD (a deterministic
     function of the completion text, so advantages are non-zero) in place of GSM8K's 0/1 reward; every rollout,
     reward and printed loss, the step-0 pass@k, and a fingerprint of the final weights
  8. checkpoint_format.json: file names, model/optimizer keys, dtypes and shapes, meta fields (JSON types) of the
     checkpoints that steps 2, 6 and 7 wrote (the format invariants a base dir must keep to load in upstream)

Output (~0.5 MB): base/ (tokenizer, the base checkpoint's model + meta, data shards, eval bundle, task_data),
expected.json, expected.pt (packed SFT batches), checkpoint_format.json. tests/test_upstream_pipeline.py loads this
file by path for the shared constants below; module-level imports are stdlib, torch and pyarrow only.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import runpy
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "upstream_eval")

# -----------------------------------------------------------------------------
# Shared with the test: the exact settings of every step

VOCAB_SIZE = 384
BASE_TRAIN_ARGS = ["--depth=2", "--aspect-ratio=16", "--head-dim=16", "--max-seq-len=128", "--window-pattern=SL",
                   "--num-iterations=4", "--device-batch-size=2", "--total-batch-size=256", "--warmup-steps=1",
                   "--eval-every=2", "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1",
                   "--device-type=cpu"]  # fmt: skip
BASE_STEP = 4
BPB = dict(B=2, T=128, steps=2)
CORE_ROWS = 24  # rows per task in the mini bundle
CHAT_CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")
CHAT_BATCH, CHAT_MAX_PROBLEMS = 4, 24
GSM8K_GEN = dict(num_samples=1, max_new_tokens=24, temperature=0.0, top_k=50, max_problems=8)
SFT_ARGS = ["--device-type=cpu", "--num-iterations=3", "--max-seq-len=256", "--device-batch-size=2",
            "--total-batch-size=512", "--eval-every=2", "--eval-tokens=1024", "--chatcore-every=-1",
            "--mmlu-epochs=1", "--gsm8k-epochs=1", "--load-optimizer=0"]  # fmt: skip
RL_TAG = "rlstart"
RL_ARGS = ["--device-type=cpu", f"--model-tag={RL_TAG}", "--device-batch-size=4", "--examples-per-step=2",
           "--num-samples=4", "--max-new-tokens=256", "--eval-every=60", "--eval-examples=1", "--save-every=60"]
GSM8K_REWARD_COMPLETIONS = ["#### 7", "so 3 + 4 = 7.\n#### 7", "#### 1,000", "The answer is 7", "#### 8", "####7",
                            "#### -7", ""]  # fmt: skip


def rl_reward(conversation, completion: str) -> float:
    """Stand-in reward for the RL fixture: deterministic in the text and different between samples."""
    return (len(completion) % 5) / 4.0


def arg_dict(args: list[str]) -> dict:
    """['--num-iterations=3', ...] -> {'num_iterations': '3', ...}"""
    return {a[2:].split("=", 1)[0].replace("-", "_"): a.split("=", 1)[1] for a in args}


def fingerprint(state_dict: dict) -> dict:
    """Per tensor: float64 sum, sum of |x|, sum of x^2, first and last element (to compare weights cheaply)."""
    out = {}
    for k, v in sorted(state_dict.items()):
        x = v.detach().double().flatten()
        out[k] = [x.sum().item(), x.abs().sum().item(), (x * x).sum().item(), x[0].item(), x[-1].item()]
    return out


def json_kind(value):
    """JSON type tree of a meta value: dicts keep their keys, everything else becomes its JSON type name."""
    if isinstance(value, dict):
        return {k: json_kind(v) for k, v in value.items()}
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "list" if isinstance(value, list) else "str"


def tensor_kind(value):
    if isinstance(value, torch.Tensor):
        return [str(value.dtype).removeprefix("torch."), list(value.shape)]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, len(value)]
    return type(value).__name__


def describe_checkpoint_dir(ckdir: str) -> dict:
    """File names, model keys/dtypes/shapes, optimizer layout and meta JSON types of one checkpoint directory."""
    files = sorted(os.listdir(ckdir))
    out = {"files": files}
    for name in files:
        path = os.path.join(ckdir, name)
        if name.startswith("model_"):
            out["model"] = {k: tensor_kind(v) for k, v in torch.load(path, map_location="cpu").items()}
        elif name.startswith("optim_"):
            sd = torch.load(path, map_location="cpu")
            out["optim"] = {
                "top": sorted(sd),
                "param_groups": [{k: (v if k in ("kind", "params") else tensor_kind(v)) for k, v in g.items()}
                                 for g in sd["param_groups"]],  # fmt: skip
                "state": {str(i): {k: tensor_kind(v) for k, v in s.items()} for i, s in sd["state"].items()},
            }
        elif name.startswith("meta_"):
            with open(path) as f:
                out["meta"] = json_kind(json.load(f))
    return out


# -----------------------------------------------------------------------------
# Inputs (no upstream or ours needed): shards, task tables, eval bundle

WORDS = ("the of and to in is was for on that with as by at from river model token batch layer train value loss "
         "apples cat dog red blue green answer question number plus minus").split()


def make_docs(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 6, 10, 20, 40]))) + "." for _ in range(n)]


def write_shards(data_dir: str) -> None:
    """Two shards (train, val = the last), two row groups each."""
    rng = random.Random(7)
    os.makedirs(data_dir, exist_ok=True)
    for i in range(2):
        docs = make_docs(rng, 96)
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"), row_group_size=48)


def load_make_eval_fixtures():
    spec = importlib.util.spec_from_file_location("make_eval_fixtures", os.path.join(HERE, "make_eval_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval_inputs(base: str) -> None:
    """eval_bundle/ (unzipped, as upstream places it) and task_data/ in the Hub export layout.

    The SFT validation mixture takes MMLU test[:5200] and GSM8K test[:420] (upstream's fixed stops), so those two
    tables are rebuilt here at that size (tiny rows); chat eval reads only their first problems."""
    mef = load_make_eval_fixtures()
    with zipfile.ZipFile(io.BytesIO(mef.zip_bytes(mef.core_bundle_files(CORE_ROWS)))) as zf:
        zf.extractall(base)
    with tempfile.TemporaryDirectory() as tmp:
        built = mef.build(tmp)
        shutil.copytree(built["task_data_dir"], os.path.join(base, "task_data"))
    for repo, subset, table in (("cais--mmlu", "all", mef._mmlu_table(random.Random(3), 5200)),
                                ("openai--gsm8k", "main", mef._gsm8k_table(420))):  # fmt: skip
        pq.write_table(table, os.path.join(base, "task_data", repo, subset, "test", "00000.parquet"), compression="zstd")


def copy_inputs(base: str, out: str) -> None:
    for rel in ("tokenizer", "base_data_climbmix", "eval_bundle", "task_data"):
        shutil.copytree(os.path.join(base, rel), os.path.join(out, "base", rel))
    ck = os.path.join(out, "base", "base_checkpoints", "d2")
    os.makedirs(ck)
    for name in (f"model_{BASE_STEP:06d}.pt", f"meta_{BASE_STEP:06d}.json"):
        shutil.copy(os.path.join(base, "base_checkpoints", "d2", name), ck)


# -----------------------------------------------------------------------------
# Upstream side (runs with the checkout first on sys.path)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_script(upstream: str, script: str, args: list[str]) -> str:
    """Run upstream's scripts/<script>.py as __main__ with args; returns what it printed."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [os.path.join(upstream, "scripts", f"{script}.py"), *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"scripts.{script}", run_name="__main__")
    finally:
        sys.argv = argv
    sys.stdout.write(out.getvalue())
    return out.getvalue()


def recording_forward(GPT, calls: list, reduction: str):
    """A GPT.forward that records (inputs, targets, loss) of every training-mode call with that loss reduction."""
    forward = GPT.forward

    def wrapper(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        out = forward(self, idx, targets, kv_cache, loss_reduction)
        if self.training and targets is not None and loss_reduction == reduction:
            calls.append((idx.detach().clone(), targets.detach().clone(), out.detach().clone()))
        return out

    return wrapper


def upstream_tokenizer(base: str):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer

    def texts():
        for batch in parquets_iter_batched("train"):
            yield from batch
        mef = load_make_eval_fixtures()
        for content in mef.core_bundle_files(CORE_ROWS).values():
            yield content.decode()

    tok = RustBPETokenizer.train_from_iterator(texts(), VOCAB_SIZE)
    tok_dir = os.path.join(base, "tokenizer")
    tok.save(tok_dir)
    specials = {tok.encode_special(s) for s in tok.get_special_tokens()}  # token_bytes as upstream's tok_train
    sizes = [0 if i in specials else len(tok.decode_single_token_bytes(i)) for i in range(tok.get_vocab_size())]
    torch.save(torch.tensor(sizes, dtype=torch.int32), os.path.join(tok_dir, "token_bytes.pt"))


def upstream_core(model, tokenizer):
    from scripts.base_eval import evaluate_core

    from nanochat.common import get_base_dir
    from nanochat.core_eval import evaluate_example

    core = evaluate_core(model, tokenizer, "cpu")
    bundle = os.path.join(get_base_dir(), "eval_bundle")
    import yaml

    with open(os.path.join(bundle, "core.yaml")) as f:
        tasks = yaml.safe_load(f)["icl_tasks"]
    outcomes = {}
    for task in tasks:  # the same data, meta and shuffle as evaluate_core
        meta = {"task_type": task["icl_task_type"], "dataset_uri": task["dataset_uri"],
                "num_fewshot": task["num_fewshot"][0],
                "continuation_delimiter": task.get("continuation_delimiter", " ")}  # fmt: skip
        with open(os.path.join(bundle, "eval_data", meta["dataset_uri"])) as f:
            data = [json.loads(line.strip()) for line in f]
        random.Random(1337).shuffle(data)
        outcomes[task["label"]] = [bool(evaluate_example(i, model, tokenizer, data, "cpu", meta))
                                   for i in range(len(data))]  # fmt: skip
    return {**core, "outcomes": outcomes}


def upstream_bpb(model, tokenizer):
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    token_bytes = get_token_bytes(device="cpu")
    out = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, BPB["B"], BPB["T"], split, device="cpu")
        out[split] = evaluate_bpb(model, loader, BPB["steps"], token_bytes)
    return out


def upstream_chat_eval(model, tokenizer):
    from functools import partial

    from scripts.chat_eval import run_categorical_eval, run_generative_eval
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU

    from nanochat.engine import Engine

    makers = {"ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
              "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
              "MMLU": partial(MMLU, subset="all", split="test")}  # fmt: skip
    out = {}
    for name in CHAT_CATEGORICAL:
        task, answers = makers[name](), []
        evaluate = task.evaluate
        task.evaluate = lambda conv, pred, ev=evaluate, seen=answers: (seen.append(pred), ev(conv, pred))[1]
        acc = run_categorical_eval(task, tokenizer, model, CHAT_BATCH, max_problems=CHAT_MAX_PROBLEMS)
        out[name] = {"accuracy": acc, "predictions": answers}
    task, completions = GSM8K(subset="main", split="test"), []
    evaluate = task.evaluate
    task.evaluate = lambda conv, text: (completions.append(text), evaluate(conv, text))[1]
    g = GSM8K_GEN
    acc = run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), g["num_samples"],
                              g["max_new_tokens"], g["temperature"], g["top_k"], max_problems=g["max_problems"])
    out["GSM8K"] = {"accuracy": acc, "completions": list(completions)}  # before reward() calls evaluate again
    rewards = [[task.reward(task[i], c) for c in GSM8K_REWARD_COMPLETIONS] for i in range(2)]
    out["GSM8K_reward"] = {"answers": [task[i]["messages"][-1]["content"][-1]["text"] for i in range(2)],
                           "rewards": rewards}  # fmt: skip
    return out


def run_recorded(upstream: str, script: str, args: list[str]) -> tuple[list, list]:
    """Run a training script; returns (training forward calls (inputs, targets, loss), val bpb values)."""
    import nanochat.loss_eval
    from nanochat.gpt import GPT

    calls, bpbs = [], []
    evaluate_bpb = nanochat.loss_eval.evaluate_bpb

    def recording_bpb(*args, **kwargs):
        bpbs.append(evaluate_bpb(*args, **kwargs))
        return bpbs[-1]

    with patched(GPT, "forward", recording_forward(GPT, calls, "mean")), \
            patched(nanochat.loss_eval, "evaluate_bpb", recording_bpb):  # fmt: skip
        run_script(upstream, script, args)
    return calls, bpbs


def upstream_base_train(upstream: str, base: str) -> dict:
    calls, bpbs = run_recorded(upstream, "base_train", BASE_TRAIN_ARGS)
    final = torch.load(os.path.join(base, "base_checkpoints", "d2", f"model_{BASE_STEP:06d}.pt"), map_location="cpu")
    return {"losses": [c[2].item() for c in calls], "val_bpb": bpbs, "fingerprint": fingerprint(final)}


def upstream_sft(upstream: str, base: str):
    calls, bpbs = run_recorded(upstream, "chat_sft", SFT_ARGS)
    ckdir = os.path.join(base, "chatsft_checkpoints", "d2")
    step = int(sorted(os.listdir(ckdir))[0].split("_")[1].split(".")[0])
    final = torch.load(os.path.join(ckdir, f"model_{step:06d}.pt"), map_location="cpu")
    batches = {"inputs": torch.stack([c[0] for c in calls]).to(torch.int16),
               "targets": torch.stack([c[1] for c in calls]).to(torch.int16)}  # fmt: skip
    return {"losses": [c[2].item() for c in calls], "val_bpb": bpbs, "step": step,
            "fingerprint": fingerprint(final)}, batches  # fmt: skip


def upstream_rl(upstream: str, base: str):
    import re

    import tasks.gsm8k

    from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
    from nanochat.engine import Engine

    # the RL start: the base weights saved as an SFT checkpoint (upstream's own save/load)
    model_data, _, meta = load_checkpoint(os.path.join(base, "base_checkpoints", "d2"), BASE_STEP, torch.device("cpu"))
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", RL_TAG), BASE_STEP, model_data, None, meta)
    rollouts, rewards = [], []
    generate_batch = Engine.generate_batch

    def recording_generate(self, tokens, num_samples=1, **kwargs):
        seqs, masks = generate_batch(self, tokens, num_samples=num_samples, **kwargs)
        if "seed" in kwargs:  # training rollouts pass a seed; pass@k evaluation uses the default
            rollouts.append({"seed": kwargs["seed"], "sequences": seqs, "masks": masks})
        return seqs, masks

    def reward(self, conversation, completion):
        rewards.append(rl_reward(conversation, completion))
        return rewards[-1]

    with patched(Engine, "generate_batch", recording_generate), patched(tasks.gsm8k.GSM8K, "reward", reward):
        printed = run_script(upstream, "chat_rl", RL_ARGS)
    losses = [float(x) for x in re.findall(r"\| Pass \d+ \| loss: (-?[0-9.]+) \|", printed)]
    passk = re.search(r"Step 0 \| (Pass@1: .*)", printed).group(1)
    ckdir = os.path.join(base, "chatrl_checkpoints", RL_TAG)
    last = sorted(n for n in os.listdir(ckdir) if n.startswith("model_"))[-1]
    final = torch.load(os.path.join(ckdir, last), map_location="cpu")
    return {"rollouts": rollouts, "rewards": rewards, "losses": losses, "pass_at_k_step0": passk,
            "checkpoint": last, "fingerprint": fingerprint(final)}  # fmt: skip


def eager(model=None, **kwargs):
    """torch.compile stand-in: compile(model) and @compile(...) both return the function unchanged."""
    return model if model is not None else (lambda fn: fn)


def role_upstream(upstream: str, base: str, out: str) -> None:
    sys.path.insert(0, upstream)
    import nanochat

    assert os.path.abspath(nanochat.__file__).startswith(upstream), nanochat.__file__
    torch.set_num_threads(1)
    torch.compile = eager  # CPU: eager kernels, as ours runs them on CPU (and no compiler toolchain needed)
    upstream_tokenizer(base)
    base_train = upstream_base_train(upstream, base)

    from nanochat.checkpoint_manager import load_model

    model, tokenizer, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag="d2", step=BASE_STEP)
    expected = {"base_train": base_train, "core": upstream_core(model, tokenizer), "bpb": upstream_bpb(model, tokenizer),
                "chat_eval": upstream_chat_eval(model, tokenizer)}  # fmt: skip
    expected["sft"], batches = upstream_sft(upstream, base)
    expected["rl"] = upstream_rl(upstream, base)
    formats = {"base": describe_checkpoint_dir(os.path.join(base, "base_checkpoints", "d2")),
               "sft": describe_checkpoint_dir(os.path.join(base, "chatsft_checkpoints", "d2")),
               "rl": describe_checkpoint_dir(os.path.join(base, "chatrl_checkpoints", RL_TAG))}  # fmt: skip
    copy_inputs(base, out)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    with open(os.path.join(out, "checkpoint_format.json"), "w") as f:
        json.dump(formats, f, indent=1)
    torch.save(batches, os.path.join(out, "expected.pt"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", help="path to an unpacked upstream nanochat checkout (92d63d4)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    args = parser.parse_args()
    upstream = os.path.abspath(args.upstream)
    if args.role == "upstream":
        return role_upstream(upstream, os.environ["NANOCHAT_BASE_DIR"], args.out)
    if not os.path.isfile(os.path.join(upstream, "scripts", "chat_sft.py")):
        raise SystemExit("pass the path of an unpacked upstream nanochat checkout (with scripts/chat_sft.py)")
    with tempfile.TemporaryDirectory() as tmp:
        base, staged = os.path.join(tmp, "base"), os.path.join(tmp, "out")
        write_shards(os.path.join(base, "base_data_climbmix"))
        write_eval_inputs(base)
        os.makedirs(staged)
        env = {**os.environ, "NANOCHAT_DTYPE": "float32", "NANOCHAT_BASE_DIR": base, "PYTHONPATH": "",
               "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # fmt: skip
        cmd = [sys.executable, os.path.abspath(__file__), upstream, "--role", "upstream", "--out", staged]
        subprocess.run(cmd, env=env, cwd=tmp, check=True)  # cwd=tmp: keep this repo off upstream's sys.path
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(staged, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
