"""Ray entry points (`python -m ray_jobs.<name>`). Importing the package sets the OpenMP wait default below."""

import os

# CPU training runs PyTorch's ops on OpenMP threads (libgomp, which also runs MKL's matmuls). Between two parallel
# regions a libgomp thread spins for ~300,000 iterations (~10 ms) before it sleeps, and eager PyTorch opens one region
# per op (~1,200 per step of a d4 model): on a CPU that other processes also want (a shared machine, or Ray's own
# processes beside the Train worker) the spinning thread takes the core from the thread with work, and a 2-core
# machine under load ran d4 steps 2-3x slower (bench/bench_train.py --paths; README, Benchmarks). ~1,000 iterations
# (~30 us) still catch back-to-back ops. libgomp reads this once, when torch loads it, so it is set here, before any
# entry point imports torch; Ray workers get it from the environment (train_common.FORWARD_ENV_PREFIXES).
# A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
OPENMP_SPINCOUNT = "1000"
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
