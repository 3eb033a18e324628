"""
The child side of the code sandbox: what runs inside the sandboxed interpreter BEFORE the untrusted code.

Never imported by the sandbox itself: nanochat/execution.py writes this file's source into the child's program,
followed by `apply(CFG)` (CFG is a dict literal, see `execution._build_program`), the untrusted code and the end
marker. Importing it has no side effects (tests do, to read its constants). Every step is listed in execution.py's
docstring; the comments here say why each number is what it is. A step the kernel does not offer is skipped;
`sandbox_features()` asks `apply` to print the names of the steps that took effect.
"""

import builtins
import os
import sys

# ---------------------------------------------------------------------------------------------------------------------
# rlimits


def set_rlimits(cfg):
    import resource
    import signal

    lims = [(resource.RLIMIT_CPU, cfg["cpu"]), (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NOFILE, 64)]
    if cfg["mem"] is not None and sys.platform != "darwin":
        mem = cfg["mem"]
        lims += [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_STACK, mem)]
    for which, value in lims:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError(EFBIG) instead of killing us


# ---------------------------------------------------------------------------------------------------------------------
# Bounded scratch directory: a size-limited tmpfs over the working directory, in a private user + mount namespace.

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
SCRATCH_INODES = 1024  # files + directories + hard links: bounds the kernel memory that names can take


def mount_scratch(libc, cfg):
    """True when the working directory is now a tmpfs of cfg['scratch'] bytes that only this process sees."""
    import ctypes

    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        return False  # no unprivileged user namespaces here (e.g. Docker's default seccomp profile)
    try:
        # map our own ids to themselves, so file ownership and os.getuid() look the same as before
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    except OSError:
        return False
    root = cfg["root"].encode()
    # private first, so that nothing mounted here can propagate back to the host's namespace
    if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        return False
    opts = f"size={cfg['scratch']},nr_inodes={SCRATCH_INODES},mode=0700".encode()
    if libc.mount(b"nanochat-scratch", root, b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), opts) != 0:
        return False
    os.chdir(cfg["root"])  # the old cwd is the directory underneath the mount
    return True


def drop_capabilities(libc):
    """Empty effective/permitted/inheritable sets: a root caller (or the namespace above) keeps no privilege, so
    e.g. mknod of a disk device or loading a kernel module is refused even before the filters below."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    return libc.capset(header, data) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Landlock (syscalls 444..446 on every architecture)

LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LL_MAKE_CHAR, LL_MAKE_SOCK, LL_MAKE_BLOCK = 1 << 6, 1 << 9, 1 << 11
LL_TRUNCATE, LL_IOCTL_DEV = 1 << 14, 1 << 15
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV  # rights a file can carry


def apply_landlock(libc, cfg, scratch):
    import ctypes
    import struct

    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return []
    fs_all = (1 << 13) - 1  # every right of ABI 1 (EXECUTE .. MAKE_SYM)
    fs_all |= (1 << 13 if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0) | (LL_IOCTL_DEV if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, handled with no rule: all TCP denied
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL: nothing outside this domain
    attr = struct.pack("QQQ", fs_all, net, scoped)[: 8 if abi < 4 else (16 if abi < 6 else 24)]
    rs = libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if rs < 0:
        return []

    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            access &= LL_FILE_RIGHTS
        rule = struct.pack("=Qi", access & fs_all, fd)
        libc.syscall(445, ctypes.c_int(rs), ctypes.c_int(1), ctypes.c_char_p(rule), ctypes.c_uint32(0))
        os.close(fd)

    for d in cfg["read_dirs"]:
        allow(d, LL_EXECUTE | LL_READ_FILE | LL_READ_DIR)
    allow("/dev/null", LL_WRITE_FILE | LL_READ_FILE)
    allow("/dev/urandom", LL_READ_FILE)
    if scratch:  # a bounded tmpfs: anything but device nodes and sockets
        allow(cfg["root"], fs_all & ~(LL_MAKE_CHAR | LL_MAKE_BLOCK | LL_MAKE_SOCK))
    else:  # no bound on the disk below: no new files at all, so nothing can be written there
        allow(cfg["root"], LL_READ_FILE | LL_READ_DIR | LL_WRITE_FILE | LL_TRUNCATE)
    ok = libc.syscall(446, ctypes.c_int(rs), ctypes.c_uint32(0)) == 0
    os.close(rs)
    if not ok:
        return []
    return ["landlock"] + (["landlock-net"] if net else []) + (["landlock-scope"] if scoped else [])


# ---------------------------------------------------------------------------------------------------------------------
# seccomp: a deny list (errno EPERM) on the native architecture; every other architecture's syscalls are refused.

# name -> (x86_64 number, aarch64 number); None where the architecture has no such syscall
DENIED_SYSCALLS = {
    # starting programs (clone is inspected below: threads only)
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    # every socket: TCP, UDP, netlink, and Unix sockets by path (which Landlock does not govern)
    "socket": (41, 198), "socketpair": (53, 199),
    # io_uring can open sockets and files without going through the syscalls filtered here
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    # reaching into other processes
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "pidfd_getfd": (438, 438),
    # storage the scratch bound does not count: anonymous in-memory files, and SysV / POSIX IPC objects and keys,
    # which outlive the process
    "memfd_create": (319, 279), "shmget": (29, 194), "msgget": (68, 186), "semget": (64, 190),
    "mq_open": (240, 180), "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    # namespaces and mounts: the sandbox set its own up already
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    # kernel attack surface nothing here needs
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
}
AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # AUDIT_ARCH_* and the column above
CLONE_NR, CLONE3_NR, CLONE_THREAD = {"x86_64": 56, "aarch64": 220}, 435, 0x00010000
# open / openat and the offset of their flags word in seccomp_data: O_TMPFILE makes an unnamed file that Landlock's
# MAKE_REG right does not govern (without the scratch tmpfs it would write to the disk below without bound)
OPEN_FLAGS_AT = {"x86_64": ((2, 24), (257, 32)), "aarch64": ((56, 32),)}
O_TMPFILE_BIT, OPENAT2_NR = 0o20000000, 437  # __O_TMPFILE (generic and x86); openat2's flags sit behind a pointer


def seccomp_program(machine):
    """The BPF program as (code, jt, jf, k) tuples, or None on an architecture we have no table for."""
    if machine not in AUDIT_ARCH:
        return None
    audit, col = AUDIT_ARCH[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # seccomp_data: nr at 0, arch at 4, args[0] (low word, little endian) at 16
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, EPERM)]  # e.g. i386 syscalls through `int 0x80`
    prog += [(LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # x32 numbers on x86_64
    for numbers in DENIED_SYSCALLS.values():
        if numbers[col] is not None:
            prog += [(JEQ, 0, 1, numbers[col]), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, CLONE3_NR), (RET, 0, 0, ENOSYS)]  # glibc then falls back to clone(), which we can inspect
    prog += [(JEQ, 0, 1, OPENAT2_NR), (RET, 0, 0, ENOSYS)]  # callers fall back to openat(), which we can inspect
    for nr, offset in OPEN_FLAGS_AT[machine]:  # open/openat: EPERM with O_TMPFILE, else allowed right here
        prog += [(JEQ, 0, 4, nr), (LD, 0, 0, offset), (JSET, 0, 1, O_TMPFILE_BIT), (RET, 0, 0, EPERM),
                 (RET, 0, 0, ALLOW)]
    prog += [(JEQ, 0, 3, CLONE_NR[machine]), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, EPERM)]
    prog += [(RET, 0, 0, ALLOW)]
    return prog


def apply_seccomp(libc):
    import ctypes
    import platform
    import struct

    prog = seccomp_program(platform.machine())
    if prog is None:
        return []
    filt = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(filt, ctypes.c_void_p))
    return ["seccomp"] if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0 else []  # SECCOMP_MODE_FILTER


def apply_kernel_layers(cfg):
    """Scratch mount, capability drop, Landlock, seccomp, in that order (each later step forbids the earlier)."""
    if not sys.platform.startswith("linux"):
        return []
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    features = []
    scratch = bool(cfg["scratch"]) and mount_scratch(libc, cfg)
    features += ["tmpfs"] if scratch else []
    features += ["nocaps"] if drop_capabilities(libc) else []
    if not cfg["kernel"]:
        return features
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required for unprivileged seccomp / Landlock
        return features
    features += apply_landlock(libc, cfg, scratch)
    features += apply_seccomp(libc)
    return features


# ---------------------------------------------------------------------------------------------------------------------
# The Python-level guard (like upstream's): clear errors, and the only layer on machines without the kernel ones.


def python_guard(cfg):
    import faulthandler
    import io
    import posix
    import shutil
    import subprocess

    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    root = cfg["root"]
    real_open, real_os_open, realpath, pid = builtins.open, os.open, os.path.realpath, os.getpid()

    def resolve(file):
        p = os.fsdecode(os.fspath(file))
        return realpath(p if p.startswith("/") else root + "/" + p)

    def check(file, writing):
        if isinstance(file, int):
            return
        p = resolve(file)
        if writing and not (p == root or p.startswith(root + "/")):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {p}")
        parts = p.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != pid:
            raise PermissionError(f"sandbox: reading other processes' /proc entries is not allowed: {p}")

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & wflags))
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open
    # upstream's list minus putenv (numpy calls it at import; it only changes this child's environment)
    for name in ("kill", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
                 # beyond upstream's list: every way to start another program
                 "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "setsid", "setpgid", "symlink", "link", "mkfifo", "mknod"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    subprocess._fork_exec = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "_posixsubprocess", "pty",
                 "multiprocessing"):
        sys.modules[name] = None


def limit_processes():
    """Without seccomp: RLIMIT_NPROC 0, no new processes (but also no threads: the limit counts both, and root
    ignores it). With seccomp, clone is refused unless it makes a thread, so threads keep working."""
    import resource

    if hasattr(resource, "RLIMIT_NPROC") and os.getuid() != 0:
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        except (ValueError, OSError):
            pass


def apply(cfg):
    set_rlimits(cfg)
    try:
        features = apply_kernel_layers(cfg)
    except Exception:  # a kernel layer that fails half-way must not stop the (weaker) layers after it
        features = []
    if "seccomp" not in features:
        limit_processes()
    if cfg["report"]:
        print(",".join(features), flush=True)
    python_guard(cfg)
