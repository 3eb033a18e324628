"""python -m pytest tests/test_execution.py -q

The code sandbox (nanochat/execution.py): normal programs work, and a list of hostile programs is refused or
contained while the host (a canary directory and file, an environment secret, a bystander process, a listening
socket) stays untouched. Cases that only the kernel filters (Landlock / seccomp) can stop skip themselves, with the
reason, on machines that lack them.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from nanochat.execution import _build_program, _run, execute_code, sandbox_features

FEATURES = sandbox_features()
SECRET = "hunter2-canary-secret"


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Things hostile code will aim at; checked unchanged after every test."""
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("untouched")
    monkeypatch.setenv("NANOCHAT_CANARY_SECRET", SECRET)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    env = {"DIR": str(canary_dir), "FILE": str(canary), "PID": bystander.pid, "PORT": listener.getsockname()[1]}
    yield env
    try:
        assert sorted(os.listdir(canary_dir)) == ["canary.txt"], "sandboxed code created or removed host files"
        assert canary.read_text() == "untouched"
        assert os.environ["NANOCHAT_CANARY_SECRET"] == SECRET
        assert bystander.poll() is None, "sandboxed code killed a host process"
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing connected to the host's socket
    finally:
        bystander.kill()
        bystander.wait()
        listener.close()


# -----------------------------------------------------------------------------
# Normal programs


def test_happy_path_and_libraries():
    r = execute_code("import math, json\nprint(math.factorial(10), json.dumps([1]))")
    assert r.success and r.stdout == "3628800 [1]\n" and r.error is None
    r = execute_code("import numpy as np\nprint(int(np.arange(5).sum()))")
    assert r.success and r.stdout == "10\n"
    r = execute_code("import threading\nt = threading.Thread(target=print, args=('thread ok',))\nt.start(); t.join()")
    assert r.success and r.stdout == "thread ok\n"


def test_exception_is_captured():
    r = execute_code("print('before')\n1/0")
    assert not r.success and r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero"


def test_stdin_disabled():
    r = execute_code("input()")
    assert not r.success and "EOFError" in r.error


def test_writes_land_in_a_deleted_temp_dir():
    before = set(os.listdir("."))
    r = execute_code("import os\nopen('landmine.txt', 'w').write('x')\nprint(open('landmine.txt').read(), "
                     "os.readlink('/proc/self/cwd'))")
    assert r.success and r.stdout.startswith("x ")
    sandbox_path = os.path.join(r.stdout.split()[1], "landmine.txt")
    assert not os.path.exists(sandbox_path), "the sandbox directory should be deleted afterwards"
    assert set(os.listdir(".")) == before


def test_fresh_globals_and_tricky_quoting():
    r = execute_code("print(sorted(k for k in globals() if not k.startswith('__')))")
    assert r.success and r.stdout == "[]\n"
    r = execute_code('''s = 'it\\'s "quoted" \\\\ {braces} {{x}} \\n'\nprint(len(s))''')
    assert r.success and r.stdout == "32\n"


def test_bad_arguments():
    with pytest.raises(ValueError):
        execute_code(b"print(1)")
    with pytest.raises(ValueError):
        execute_code("print(1)", timeout=0)


# -----------------------------------------------------------------------------
# Hostile programs: (id, code template, what must hold, kernel feature needed or None)

HOSTILE = [
    ("os_system", "import os; os.system('rm -rf {DIR}')", None),
    ("subprocess_run", "import subprocess; subprocess.run(['rm', '-rf', '{DIR}'])", None),
    ("subprocess_popen", "import subprocess; subprocess.Popen(['touch', '{DIR}/pwned'])", None),
    ("os_exec", "import os; os.execv('/bin/rm', ['rm', '-rf', '{DIR}'])", None),
    ("wrap_close_globals", "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
                           ".__init__.__globals__['system']('rm -rf {DIR}')", None),
    ("popen_via_subclasses", "P = [c for c in object.__subclasses__() if c.__name__ == 'Popen'][0]\n"
                             "P(['touch', '{DIR}/pwned'])", None),
    ("open_write_abs", "open('{FILE}', 'w').write('pwned')", None),
    ("open_append_rel", "open('../../../../../../../..{FILE}', 'a').write('pwned')", None),
    ("pathlib_write", "import pathlib; pathlib.Path('{DIR}/pwned').write_text('x')", None),
    ("os_open_write", "import os; os.open('{FILE}', os.O_WRONLY | os.O_TRUNC)", None),
    ("os_remove", "import os; os.remove('{FILE}')", None),
    ("os_rename", "import os; os.rename('{FILE}', '{DIR}/moved')", None),
    ("shutil_rmtree", "import shutil; shutil.rmtree('{DIR}')", None),
    ("os_kill", "import os; os.kill({PID}, 9)", None),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()", None),
    ("env_secret", "import os; print(os.environ.get('NANOCHAT_CANARY_SECRET')); "
                   "print(open('/proc/self/environ').read())", None),
    ("parent_environ", "import os; print(open(f'/proc/{{os.getppid()}}/environ').read())", None),
    # The Python-level guard is bypassable; these need the kernel filters.
    ("fileio_bypass", "import _io; _io.FileIO('{FILE}', 'w').write(b'pwned')", "landlock"),
    ("parent_environ_bypass", "import _io, os; print(_io.FileIO(f'/proc/{{os.getppid()}}/environ').read())",
     "landlock"),
    ("read_etc", "import _io; print(_io.FileIO('/etc/passwd').read())", "landlock"),
    ("ctypes_system", "import sys\nfor m in ('ctypes', '_ctypes'): del sys.modules[m]\nimport ctypes\n"
                      "assert ctypes.CDLL(None).system(b'rm -rf {DIR}') == 0", "seccomp"),
    ("ctypes_kill", "import sys\nfor m in ('ctypes', '_ctypes'): del sys.modules[m]\nimport ctypes\n"
                    "assert ctypes.CDLL(None).kill({PID}, 9) == 0", "landlock-scope"),
    ("tcp_connect", "import socket; socket.create_connection(('127.0.0.1', {PORT}), timeout=1)", "landlock-net"),
]


@pytest.mark.parametrize("name,template,needs", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_code_is_refused(host, name, template, needs):
    if needs and needs not in FEATURES:
        pytest.skip(f"this machine's kernel does not offer {needs} (available: {FEATURES or 'none'})")
    r = execute_code(template.format(**host), timeout=5.0)
    assert not r.success, f"{name} succeeded: stdout={r.stdout!r}"
    assert not r.timeout
    assert SECRET not in r.stdout + r.stderr


def test_infinite_loop_is_killed():
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.5)
    assert r.timeout and not r.success and r.error == "Execution timed out (process killed)"
    assert time.time() - t0 < 4


def test_huge_allocation_hits_memory_limit():
    for code in ("x = bytearray(2 ** 34)", "x = [0] * (10 ** 9)", "x = ' ' * (512 * 1024 * 1024)"):
        r = execute_code(code)
        assert not r.success and r.memory_exceeded, code


def test_deep_recursion_is_contained():
    r = execute_code("def f(n):\n    return f(n + 1)\nf(0)")
    assert not r.success and "RecursionError" in r.error
    r = execute_code("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)", timeout=3)
    assert not r.success  # a C-stack overflow kills only the child


def test_output_and_file_size_are_capped():
    r = execute_code("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))")
    assert not r.success and "File too large" in r.error
    r = execute_code("import sys\nfor _ in range(64):\n    sys.stdout.write('x' * 1024 * 1024)", timeout=10)
    assert not r.success and len(r.stdout) <= 8 * 1024 * 1024


def test_timeout_kills_the_whole_process_group(tmp_path):
    # Runs an unguarded program through the runner to prove that grandchildren die with the child on timeout.
    program = ("import subprocess, time\n"
               "p = subprocess.Popen(['sleep', '60'], start_new_session=False)\n"
               "print(p.pid, flush=True)\n"
               "time.sleep(60)\n")
    rc, stdout, _ = _run(program, str(tmp_path), timeout=1.0)
    assert rc is None
    pid = int(stdout.split()[0])
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting to be reaped by init
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


def test_ctypes_fork_bomb_forks_nothing():
    if "seccomp" not in FEATURES:
        pytest.skip(f"this machine's kernel does not offer seccomp (available: {FEATURES or 'none'})")
    code = ("import sys\nfor m in ('ctypes', '_ctypes'): del sys.modules[m]\nimport ctypes\n"
            "libc = ctypes.CDLL(None)\nprint(sum(libc.fork() == -1 for _ in range(500)), flush=True)")
    r = execute_code(code)
    assert r.success and r.stdout == "500\n"  # one process, every fork refused


def test_kernel_filters_are_what_stop_the_bypasses(tmp_path):
    """Negative control: without the kernel layer the same bypass writes a host file, so the hostile tests above
    would catch a sandbox that relied on the Python guard alone."""
    if "landlock" not in FEATURES:
        pytest.skip(f"this machine's kernel does not offer landlock (available: {FEATURES or 'none'})")
    target = tmp_path / "outside.txt"
    root = tmp_path / "root"
    root.mkdir()
    code = f"import _io; _io.FileIO({str(target)!r}, 'w').write(b'escaped')"
    program = _build_program(code, str(root), 5.0, 256 * 1024 * 1024)
    assert "    _g_kernel_filters()\n" in program
    rc, _, _ = _run(program.replace("    _g_kernel_filters()\n", "    pass\n"), str(root), 5.0)
    assert rc == 0 and target.read_text() == "escaped"
    target.unlink()
    rc, _, stderr = _run(program, str(root), 5.0)
    assert rc != 0 and "Permission denied" in stderr and not target.exists()
