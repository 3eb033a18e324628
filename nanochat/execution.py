"""
Run Python code written by a model in a separate, resource-limited process (HumanEval scoring, code tools).

    from nanochat.execution import execute_code
    result = execute_code("print(1 + 1)")      # ExecutionResult(success=True, stdout='2\\n', ...)

A program succeeds only when it exits with status 0 AND ran to its last statement: after the code, the child
prints a per-run nonce that it reads from an inherited pipe, and the parent checks for it (and removes it from
stdout). So `sys.exit(0)`, `raise SystemExit` or `os._exit(0)` before a test's asserts counts as a failure. The
nonce is in no source text, argv, environment variable or file the code can see; it sits in a pipe that the
trailer reads. Code that goes looking for it (reads that pipe itself and prints what it finds) can forge the end:
nothing running in the same process can be kept from doing what the trailer does, just as it can return an object
whose __eq__ is always True. The nonce catches programs that stop early, not programs written to cheat.

Layers of containment, outermost first (the child side is nanochat/execution_guard.py):
1. A fresh interpreter (`python -I program.py`) in its own session / process group, with a scrubbed environment
   (PATH only), stdin from /dev/null, and an empty temporary directory as CWD that is deleted afterwards.
   On timeout the whole process group is SIGKILLed, so children die with the parent.
2. rlimits set in the child before the untrusted code runs: address space / data / stack (the memory limit),
   CPU seconds, file size (8 MB: also caps captured stdout/stderr, which go to files, not pipes), open files,
   core dumps off; and, only where seccomp (below) is missing, number of processes 0 (non-root users only; it
   also stops threads, which seccomp's clone rule lets through).
3. Kernel layers, where the kernel offers them (Linux; each is skipped silently if unavailable):
   - a bounded scratch directory: the CWD becomes a tmpfs of MAX_SCRATCH_BYTES (32 MB, 1024 inodes) mounted in a
     private user + mount namespace, which needs no root. RLIMIT_FSIZE bounds one file only (many files, or
     files unlinked while open, add up without limit); a size-limited filesystem bounds every byte the code can
     store, whatever the number of files. Without user namespaces (e.g. under Docker's default seccomp profile)
     Landlock instead lets the code create no file at all, so its only output is stdout and stderr.
   - all capabilities dropped (a root caller's too: no device nodes, no kernel modules).
   - Landlock: reads are limited to the interpreter's own stdlib and site-packages (sysconfig / site) and the
     system library directories the dynamic loader searches, never the caller's CWD or sys.path additions; writes
     only in the scratch directory; TCP bind/connect denied; signals and abstract Unix sockets cannot reach
     processes outside.
   - seccomp (errno EPERM): socket() and socketpair() for every family, so no TCP, UDP, netlink, or Unix socket
     by path (Landlock does not govern connecting to a socket file, and Ray's head listens on such files); fork,
     vfork, execve, execveat, and clone unless it makes a thread; io_uring; ptrace, process_vm_*, pidfd_getfd;
     memfd_create; unshare, setns, mount, umount2; bpf, perf_event_open, userfaultfd; and every syscall of a
     foreign architecture (i386 `int 0x80`, x32), which would otherwise bypass the list. `import socket` still
     works; creating a socket raises PermissionError.
   `sandbox_features()` reports which ones this machine applies (`python -m nanochat.execution` prints them).
4. A Python-level guard (like upstream's): destructive os/shutil/subprocess functions set to None, exit/quit/help
   removed, ctypes and a few modules made unimportable, and open()/os.open() refuse to write outside the temp dir
   or read other processes' /proc entries. This layer alone is easy to bypass; it exists for clear error messages
   and for machines without layer 3.

It is still not a full security boundary (shared kernel, no PID namespace: the code sees other processes in
`/proc` listings where Landlock is missing).
"""

import os
import secrets
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per stream; also the RLIMIT_FSIZE for files the code writes
MAX_SCRATCH_BYTES = 32 * 1024 * 1024  # all files in the scratch directory together
# where the dynamic loader looks when /etc/ld.so.cache names nothing else (glibc's trusted directories)
LOADER_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")
GUARD_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "execution_guard.py")
EARLY_EXIT_ERROR = "Program exited before its last statement (sys.exit, SystemExit or os._exit)"


@dataclass
class ExecutionResult:
    """Outcome of one execute_code call (field names are upstream's)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


# -----------------------------------------------------------------------------
# The program the child runs: the guard, the untrusted code with fresh globals, then the end marker.


def _read_dirs() -> list[str]:
    """What the child may read: this interpreter's stdlib and site-packages, and the loader's library dirs."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    # lib-dynload (C modules of the stdlib) and the directory of libpython / bundled libs (pyenv, conda)
    dirs.update(sysconfig.get_config_var(v) or "" for v in ("DESTSHARED", "LIBDIR"))
    dirs.update(LOADER_DIRS)
    return sorted(d for d in dirs if d and os.path.isabs(d) and os.path.exists(d))


def _build_program(code: str, root: str, timeout: float, maximum_memory_bytes: int | None, end_fd: int,
                   report_features: bool = False, scratch: bool = True, kernel_filters: bool = True) -> str:
    """The child's program: the guard, the code, and the end marker, which is read from `end_fd` only after the
    code returned. `scratch` / `kernel_filters` off exist for tests (negative controls)."""
    with open(GUARD_SOURCE) as f:
        guard = f.read()
    cfg = dict(root=root, mem=maximum_memory_bytes, cpu=int(timeout) + 2, fsize=MAX_OUTPUT_BYTES,
               read_dirs=_read_dirs(), scratch=MAX_SCRATCH_BYTES if scratch else 0, kernel=kernel_filters,
               report=report_features)
    # The guard runs in a namespace of its own (its functions keep it alive) and the code in fresh globals, so the
    # code's globals hold nothing of the guard's.
    return (
        f"_g = {{'__name__': 'execution_guard'}}\n"
        f"exec(compile({guard!r}, {GUARD_SOURCE!r}, 'exec'), _g)\n"
        f"_g['apply']({cfg!r})\n"
        "del _g\n"
        f"exec(compile({code!r}, '<llm>', 'exec'), {{'__name__': '__main__'}})\n"
        "import posix as _g_posix, sys as _g_sys\n"
        "_g_sys.stdout.flush()\n_g_sys.stderr.flush()\n"
        f"_g_posix.write(1, _g_posix.read({end_fd}, 64))\n"
    )


def _run(program: str, root: str, timeout: float, pass_fds: tuple[int, ...] = ()) -> tuple[int | None, str, str]:
    """Run `python -I program` in `root` (keeping `pass_fds` open in it); return (returncode or None on timeout,
    stdout, stderr). The program goes in a file: as a `-c` argument it would be limited to 128 kB (E2BIG)."""
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_io_") as io_dir:
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        program_path = os.path.join(io_dir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", program_path],
                cwd=root,
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: killpg reaches everything it started
                pass_fds=pass_fds,
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also reaps stragglers after a normal exit
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()

        def read(path):
            with open(path, "rb") as f:
                return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")

        return returncode, read(out_path), read(err_path)


def _execute(code: str, timeout: float, maximum_memory_bytes: int | None, **build) -> tuple[int | None, str, str, bool]:
    """(returncode or None, stdout without the end marker, stderr, whether the code ran to its end)."""
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, nonce.encode())  # 32 bytes: far below the pipe buffer, so this never blocks
        os.close(write_fd)
        write_fd = -1
        with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as root:
            root = os.path.realpath(root)
            program = _build_program(code, root, timeout, maximum_memory_bytes, read_fd, **build)
            returncode, stdout, stderr = _run(program, root, timeout, pass_fds=(read_fd,))
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    before, marker, after = stdout.rpartition(nonce)
    return returncode, (before + after if marker else stdout), stderr, bool(marker)


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES) -> ExecutionResult:
    """Execute `code` in a fresh sandboxed interpreter; never raises for anything the code does. `success` means
    exit status 0 after the last statement ran (an early sys.exit(0) / os._exit(0) is a failure)."""
    if not isinstance(code, str):
        raise ValueError(f"execute_code expects the program as a str, got {type(code).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    returncode, stdout, stderr, completed = _execute(code, timeout, maximum_memory_bytes)
    if returncode is None:
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr,
                               error="Execution timed out (process killed)", timeout=True)
    success = returncode == 0 and completed
    error = None
    if returncode == 0 and not completed:
        error = EARLY_EXIT_ERROR
    elif not success:
        lines = stderr.strip().splitlines()
        if lines:
            error = lines[-1]  # the exception line of the traceback, e.g. "ZeroDivisionError: division by zero"
        elif returncode < 0:
            error = f"Process killed by signal {signal.Signals(-returncode).name}"
        else:
            error = f"Execution failed (exit code {returncode})"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                           memory_exceeded="MemoryError" in stderr)


def sandbox_features() -> list[str]:
    """Kernel layers this machine applies to execute_code children: 'tmpfs' (bounded scratch dir), 'nocaps'
    (capabilities dropped), 'landlock' (filesystem), 'landlock-net' (TCP), 'landlock-scope' (signals, abstract
    sockets), 'seccomp' (no sockets, fork or exec)."""
    rc, stdout, _, completed = _execute("", 10.0, DEFAULT_MEMORY_BYTES, report_features=True)
    return [f for f in stdout.strip().split(",") if f] if rc == 0 and completed else []


if __name__ == "__main__":
    print("kernel layers:", sandbox_features() or "none")
    print(execute_code("print('hello from the sandbox')"))
