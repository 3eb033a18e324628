"""
Run Python code written by a model in a separate, resource-limited process (HumanEval scoring, code tools).

    from nanochat.execution import execute_code
    result = execute_code("print(1 + 1)")      # ExecutionResult(success=True, stdout='2\\n', ...)

Layers of containment, outermost first:
1. A fresh interpreter (`python -I`) in its own session / process group, with a scrubbed environment
   (PATH only), stdin from /dev/null, and an empty temporary directory as CWD that is deleted afterwards.
   On timeout the whole process group is SIGKILLed, so children die with the parent.
2. rlimits set in the child before the untrusted code runs: address space / data / stack (the memory limit),
   CPU seconds, file size (also caps captured stdout/stderr, which go to files, not pipes), open files,
   core dumps off, and number of processes (only effective for non-root users).
3. Kernel filters, where the kernel offers them (Linux; each is skipped silently if unavailable):
   - seccomp: fork/vfork/execve/execveat fail with EPERM and clone is only allowed for threads, so the code
     cannot start programs or fork bombs even through ctypes;
   - Landlock: reads are limited to the Python installation and system library dirs, writes to the temp dir,
     TCP bind/connect is denied, and signals / abstract unix sockets cannot reach processes outside.
   `sandbox_features()` reports which ones this machine applies (`python -m nanochat.execution` prints them).
4. A Python-level guard (like upstream's): destructive os/shutil/subprocess functions set to None, exit/quit/help
   removed, ctypes and a few modules made unimportable, and open()/os.open() refuse to write outside the temp dir
   or read other processes' /proc entries. This layer alone is easy to bypass; it exists for clear error messages
   and for machines without layer 3.

It is still not a full security boundary (no network namespace, UDP is open, shared kernel).
"""

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per stream; also the RLIMIT_FSIZE for files the code writes


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
# The guard: Python source run in the child before the untrusted code. Placeholders are filled with repr()s.
# It only uses names prefixed with _g so that nothing leaks into the user's (fresh) globals anyway.

_GUARD = r"""
import builtins as _gb, faulthandler as _gfh, os as _gos, posix as _gpx, shutil as _gsh, subprocess as _gsp, sys as _gsys
_g_root = {root!r}
_g_mem = {mem!r}
_g_cpu = {cpu!r}
_g_fsize = {fsize!r}
_g_read_dirs = {read_dirs!r}
_g_features = []

def _g_rlimits():
    import resource
    lims = [(resource.RLIMIT_CPU, _g_cpu), (resource.RLIMIT_FSIZE, _g_fsize), (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NOFILE, 64)]
    if _g_mem is not None and _gsys.platform != "darwin":
        lims += [(resource.RLIMIT_AS, _g_mem), (resource.RLIMIT_DATA, _g_mem), (resource.RLIMIT_STACK, _g_mem)]
    if hasattr(resource, "RLIMIT_NPROC") and _gos.getuid() != 0:
        lims.append((resource.RLIMIT_NPROC, 0))  # no new processes at all (root ignores this limit)
    for which, value in lims:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError(EFBIG) instead of killing us

def _g_kernel_filters():
    if not _gsys.platform.startswith("linux"):
        return
    import ctypes, platform, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required for unprivileged seccomp/landlock
        return
    # ---- Landlock (syscalls 444..446 on every architecture) ----
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi >= 1:
        read = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE | READ_FILE | READ_DIR
        fs_all = (1 << 13) - 1  # every right up to MAKE_SYM (ABI 1)
        if abi >= 2:
            fs_all |= 1 << 13  # REFER
        if abi >= 3:
            fs_all |= 1 << 14  # TRUNCATE
        if abi >= 5:
            fs_all |= 1 << 15  # IOCTL_DEV
        net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule: all TCP denied
        scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
        attr = struct.pack("QQQ", fs_all, net, scoped)
        attr = attr[: 8 if abi < 4 else (16 if abi < 6 else 24)]
        rs = libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        if rs >= 0:
            def allow(path, access):
                try:
                    fd = _gos.open(path, _gos.O_PATH | _gos.O_CLOEXEC)
                except OSError:
                    return
                rule = struct.pack("=Qi", access & fs_all, fd)
                libc.syscall(445, ctypes.c_int(rs), ctypes.c_int(1), ctypes.c_char_p(rule), ctypes.c_uint32(0))
                _gos.close(fd)
            for d in _g_read_dirs:
                allow(d, read)
            allow("/dev/null", (1 << 1) | (1 << 2))  # files only take file rights: WRITE_FILE | READ_FILE
            allow("/dev/urandom", 1 << 2)
            allow(_g_root, fs_all)
            if libc.syscall(446, ctypes.c_int(rs), ctypes.c_uint32(0)) == 0:
                _g_features.append("landlock")
                _g_features.extend((["landlock-net"] if net else []) + (["landlock-scope"] if scoped else []))
            _gos.close(rs)
    # ---- seccomp: no fork/exec, clone only for threads ----
    arch = platform.machine()
    if arch == "x86_64":
        audit, deny, clone, clone3 = 0xC000003E, (57, 58, 59, 322), 56, 435  # fork vfork execve execveat
    elif arch == "aarch64":
        audit, deny, clone, clone3 = 0xC00000B7, (221, 281), 220, 435  # execve execveat
    else:
        return
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    JGE = 0x35
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # x32 syscall numbers on x86_64
    for nr in deny:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, clone3), (RET, 0, 0, ENOSYS)]  # glibc then falls back to clone(), which we can inspect
    prog += [(JEQ, 0, 3, clone), (LD, 0, 0, 16), (JSET, 1, 0, 0x00010000), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    buf = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    filt = ctypes.create_string_buffer(buf)

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Prog(len(prog), ctypes.cast(filt, ctypes.c_void_p))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        _g_features.append("seccomp")

def _g_python_guard():
    _gfh.disable()
    _gb.exit = _gb.quit = _gb.help = None
    _gos.environ["OMP_NUM_THREADS"] = "1"
    os_ = _gos
    real_open, real_os_open, realpath, pid = _gb.open, os_.open, os_.path.realpath, os_.getpid()

    def resolve(file):
        p = os_.fsdecode(os_.fspath(file))
        return realpath(p if p.startswith("/") else _g_root + "/" + p)

    def check(file, writing):
        if isinstance(file, int):
            return
        p = resolve(file)
        if writing and not (p == _g_root or p.startswith(_g_root + "/")):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {{p}}")
        parts = p.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != pid:
            raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed: {{p}}")

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    wflags = os_.O_WRONLY | os_.O_RDWR | os_.O_CREAT | os_.O_TRUNC | os_.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & wflags))
        return real_os_open(path, flags, *args, **kwargs)

    import io
    _gb.open = io.open = guarded_open
    _gos.open = _gpx.open = guarded_os_open
    # upstream's list minus putenv (numpy calls it at import; it only changes this child's environment)
    for name in ("kill", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
                 # beyond upstream's list: every way to start another program
                 "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "setsid", "setpgid", "symlink", "link", "mkfifo", "mknod"):
        for mod in (_gos, _gpx):
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(_gsh, name, None)
    _gsp.Popen = None
    _gsp._fork_exec = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "_posixsubprocess", "pty",
                 "multiprocessing"):
        _gsys.modules[name] = None

_g_rlimits()
try:
    _g_kernel_filters()
except Exception:
    pass
if {report_features!r}:
    print(",".join(_g_features))
_g_python_guard()
del _gb, _gfh, _gos, _gpx, _gsh, _gsp, _gsys
"""


def _read_dirs() -> list[str]:
    """Directories the child may read: the Python installation, its import path, and system libraries."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "/usr", "/lib", "/lib64", "/bin"}
    dirs.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(d for d in dirs if os.path.exists(d))


def _build_program(code: str, root: str, timeout: float, maximum_memory_bytes: int | None,
                   report_features: bool = False) -> str:
    guard = _GUARD.format(root=root, mem=maximum_memory_bytes, cpu=int(timeout) + 2, fsize=MAX_OUTPUT_BYTES,
                          read_dirs=_read_dirs(), report_features=report_features)
    # the code travels as a repr()'d literal and runs with fresh globals, so it sees none of the guard's names
    return guard + f"\nexec(compile({code!r}, '<llm>', 'exec'), {{'__name__': '__main__'}})\n"


def _run(program: str, root: str, timeout: float) -> tuple[int | None, str, str]:
    """Run `python -I -c program` in `root`; return (returncode or None on timeout, stdout, stderr)."""
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_io_") as io_dir:
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", program],
                cwd=root,
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: killpg reaches everything it started
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


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES) -> ExecutionResult:
    """Execute `code` in a fresh sandboxed interpreter; never raises for anything the code does."""
    if not isinstance(code, str):
        raise ValueError(f"execute_code expects the program as a str, got {type(code).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as root:
        root = os.path.realpath(root)
        returncode, stdout, stderr = _run(_build_program(code, root, timeout, maximum_memory_bytes), root, timeout)
    if returncode is None:
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr,
                               error="Execution timed out (process killed)", timeout=True)
    success = returncode == 0
    error = None
    if not success:
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
    """Kernel filters this machine applies to execute_code children: 'landlock' (filesystem), 'landlock-net' (TCP),
    'landlock-scope' (signals, abstract sockets), 'seccomp' (no fork/exec)."""
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as root:
        root = os.path.realpath(root)
        rc, stdout, _ = _run(_build_program("", root, 5.0, DEFAULT_MEMORY_BYTES, report_features=True), root, 10.0)
    return [f for f in stdout.strip().split(",") if f] if rc == 0 else []


if __name__ == "__main__":
    print("kernel filters:", sandbox_features() or "none")
    print(execute_code("print('hello from the sandbox')"))
