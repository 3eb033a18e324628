"""
Generate tests/fixtures/dataloader_golden.json: packed batches from UPSTREAM nanochat's data loader.

    python dev/make_dataloader_golden.py /tmp/upstream      # path to an upstream checkout (e.g. commit 92d63d4)

The fixture holds the generated documents, the shard layout and the (inputs, targets, state) upstream yields for a
few cases (1 rank, 2 ranks, val, approximate resume). tests/test_dataloader.py rebuilds the same shards and checks
that our loader yields identical batches. Upstream runs in a subprocess with only the checkout on sys.path, so its
`nanochat` package never mixes with ours; nothing of upstream's code ends up in this repository.
"""

import json
import os
import random
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "dataloader_golden.json")
WORDS = ("the of and to in is was for on that with as by at from it an be this are or which his her their "
         "river model token batch layer python ray shard train value grad loss café naïve 東京 über").split()


def make_docs(rng, n):
    docs = []
    for i in range(n):
        if i % 37 == 5:
            docs.append("")  # empty documents must not break anything
            continue
        k = rng.choice([1, 2, 3, 5, 8, 12, 20, 30])  # many short docs, some longer than a row
        docs.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    return docs


def main(upstream):
    rng = random.Random(1234)
    # file -> row groups -> docs: uneven row-group counts so rank 1 of 2 sees a different number of groups per file
    layout = [[32] * 4, [32] * 3, [32] * 2]  # 2 train files + 1 val file (last)
    files = [[make_docs(rng, n) for n in rgs] for rgs in layout]
    cases = [
        {"name": "single", "world": 1, "rank": 0, "split": "train", "B": 2, "T": 24, "steps": 12},
        {"name": "long_wraps_epoch", "world": 1, "rank": 0, "split": "train", "B": 4, "T": 48, "steps": 40},
        {"name": "ddp_rank0", "world": 2, "rank": 0, "split": "train", "B": 2, "T": 24, "steps": 10},
        {"name": "ddp_rank1", "world": 2, "rank": 1, "split": "train", "B": 2, "T": 24, "steps": 10},
        {"name": "val", "world": 1, "rank": 0, "split": "val", "B": 2, "T": 24, "steps": 6},
        {"name": "resume_approx", "world": 1, "rank": 0, "split": "train", "B": 2, "T": 24, "steps": 6,
         "resume_from": {"case": "single", "step": 5}},
    ]
    common = {"buffer_size": 40, "tokenizer_batch_size": 8, "bos": 256}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "base_data_climbmix")
        os.makedirs(data_dir)
        for i, rgs in enumerate(files):
            docs = [d for rg in rgs for d in rg]
            pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"),
                           row_group_size=32)
        spec = {"cases": cases, **common}
        env = {**os.environ, "NANOCHAT_BASE_DIR": tmp, "PYTHONPATH": upstream}
        result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], env=env, cwd=upstream,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"upstream runner failed:\n{result.stderr}")
        outputs = json.loads(result.stdout.strip().splitlines()[-1])
    fixture = {"layout": layout, "files": files, **common, "cases": cases, "outputs": outputs}
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"), ensure_ascii=False)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


# Runs inside the upstream checkout: a byte-level stand-in tokenizer + upstream's loader, one case at a time.
RUNNER = r"""
import json, os, sys
spec = json.loads(sys.argv[1])

class ByteTokenizer:
    def get_bos_token_id(self):
        return spec["bos"]
    def encode(self, text, prepend=None, append=None, num_threads=1):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids

outputs = {}
for case in spec["cases"]:
    os.environ.update(RANK=str(case["rank"]), LOCAL_RANK=str(case["rank"]), WORLD_SIZE=str(case["world"]))
    if case["world"] == 1:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(k)
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader
    resume = None
    if "resume_from" in case:
        resume = outputs[case["resume_from"]["case"]]["states"][case["resume_from"]["step"]]
    it = loader(ByteTokenizer(), case["B"], case["T"], case["split"], tokenizer_threads=1,
                tokenizer_batch_size=spec["tokenizer_batch_size"], device="cpu", resume_state_dict=resume,
                buffer_size=spec["buffer_size"])
    res = {"inputs": [], "targets": [], "states": []}
    for _ in range(case["steps"]):
        x, y, state = next(it)
        res["inputs"].append(x.tolist()); res["targets"].append(y.tolist()); res["states"].append(dict(state))
    outputs[case["name"]] = res
print(json.dumps(outputs))
"""

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(os.path.abspath(sys.argv[1]))
