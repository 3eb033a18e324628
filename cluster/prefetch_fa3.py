"""
Download the Flash Attention 3 kernel that nanochat/flash_attention.py loads into the Hugging Face cache, at
`docker build` time (cluster/Dockerfile), so GPU nodes find it there instead of fetching it at every start.

    python cluster/prefetch_fa3.py            # exit 0: every kernel the lookup names is cached; else a one-line error

The kernel repository and its arguments are read from the `get_kernel(...)` calls in nanochat/flash_attention.py,
so the image always holds what the lookup asks for. The project's lookup itself returns early without a Hopper GPU
(there is none during `docker build`), hence this: `kernels.install_kernel` downloads the build variant for the
installed torch/CUDA without loading it. A missing variant (a torch the kernel is not built for) fails the build.
"""

import ast
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOKUP_FILE = os.path.join(ROOT, "nanochat", "flash_attention.py")


def kernel_calls(path: str = LOOKUP_FILE) -> list[tuple[str, dict]]:
    """[(repo_id, literal keyword arguments)] of every `get_kernel("org/name", ...)` call in the lookup file."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name != "get_kernel" or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        kwargs = {}
        for kw in node.keywords:
            try:
                kwargs[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                continue  # a computed argument: left to the library's default
        calls.append((node.args[0].value, kwargs))
    return calls


def install_args(install_kernel, kwargs: dict) -> dict:
    """The lookup's arguments that this `kernels` version's install_kernel takes (it needs a revision)."""
    params = inspect.signature(install_kernel).parameters
    out = {k: v for k, v in kwargs.items() if k in params}
    if "revision" in params and "revision" not in out and "version" not in out:
        out["revision"] = "main"  # what get_kernel downloads when it is given neither
    return out


def main() -> int:
    calls = kernel_calls()
    if not calls:
        print(f'error: no get_kernel("org/name") call in {LOOKUP_FILE}: nothing to prefetch', file=sys.stderr)
        return 1
    try:
        from kernels import install_kernel
    except ImportError:
        print("error: the `kernels` package is not installed (pip install kernels)", file=sys.stderr)
        return 1
    for repo, kwargs in calls:
        try:
            path = install_kernel(repo, **install_args(install_kernel, kwargs))
        except Exception as e:  # network, no build for this torch/CUDA, publisher not trusted: all fatal here
            print(f"error: could not fetch kernel {repo} ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        print(f"prefetched {repo} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
