#!/usr/bin/env bash
# The GPU checks of this repo in one command, for a lent GPU machine (torch + CUDA, tiktoken, pyarrow, numpy, pytest;
# no Ray, boto3, wandb, kernels or network needed). Run from the repo root:
#   OUT=/path/for/logs NANOCHAT_BASE_DIR=/path/with/shards+tokenizer bash dev/gpu_check.sh [UPSTREAM_CHECKOUT]
# Steps, each under its own `timeout` and logged to $OUT (default ./gpu_check_out):
#   1. env.txt         python, torch, CUDA, GPU, which optional packages exist
#   2. pytest_gpu.log  `pytest -m gpu` over the test files that have gpu tests (files that need Ray are not
#                      collected, so a machine without Ray skips nothing by error)
#   3. bench_gpu.log   bench/bench_gpu.py, ours vs UPSTREAM_CHECKOUT (ours only without one); per-run logs in
#                      bench_runs.tgz, the JSON summary in bench_gpu.json. Skipped without NANOCHAT_BASE_DIR data.
# Five files in all (a device run brings back at most 8).
# Time limits (seconds): PYTEST_TIMEOUT_S (default 240), BENCH_TIMEOUT_S (default 480; the bench's own budget is
# 60 s less). On a machine without CUDA every step still runs: the gpu tests skip and the bench says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
UPSTREAM=${1:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
  echo "date: $(date -u +%FT%TZ)"
  "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| sm", torch.cuda.get_device_capability())
else:
    print("gpu: none (CUDA not available)")
def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False
print("optional:", {m: importable(m) for m in ("ray", "kernels", "wandb", "boto3", "rustbpe")})
EOF
  nvidia-smi 2>/dev/null | head -15 || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. gpu-marked tests: only files that define some, and of those only files whose imports work without Ray
files=$(grep -l "pytest.mark.gpu" tests/test_*.py | while read -r f; do
  if ! grep -qE "^(import ray|from ray|from ray_jobs\.(data_pipeline|eval_fanout)|from tests\.test_data_pipeline)" "$f" \
     || "$PY" -c "import ray" 2>/dev/null; then echo "$f"; fi; done)
echo "== pytest -m gpu: $(echo $files | wc -w) files"
timeout "${PYTEST_TIMEOUT_S:-240}" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider $files >"$OUT/pytest_gpu.log" 2>&1
rc=$?; tail -15 "$OUT/pytest_gpu.log"
# exit 5 = no test collected: not a failure on a machine where every gpu test was deselected
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then echo "pytest -m gpu: FAILED (exit $rc)"; status=1; fi

# 3. the GPU benchmark
base=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if [ -d "$base/base_data_climbmix" ] && [ -d "$base/tokenizer" ]; then
  budget=$(( ${BENCH_TIMEOUT_S:-480} - 60 ))
  echo "== bench/bench_gpu.py (budget ${budget} s)"
  timeout "${BENCH_TIMEOUT_S:-480}" "$PY" bench/bench_gpu.py ${UPSTREAM:+--upstream "$UPSTREAM"} --budget-s "$budget" \
    --log-dir "$OUT/bench_runs" >"$OUT/bench_gpu.log" 2>&1
  rc=$?; tail -25 "$OUT/bench_gpu.log" | grep -v '^{'
  tail -1 "$OUT/bench_gpu.log" >"$OUT/bench_gpu.json"
  tar czf "$OUT/bench_runs.tgz" -C "$OUT" bench_runs 2>/dev/null && rm -rf "$OUT/bench_runs"
  if [ $rc -ne 0 ]; then echo "bench_gpu: FAILED (exit $rc)"; status=1; fi
else
  echo "== bench_gpu skipped: $base has no base_data_climbmix/ and tokenizer/ (set NANOCHAT_BASE_DIR)" | tee "$OUT/bench_gpu.log"
fi
echo "logs in $OUT"
exit $status
