"""python -m pytest tests/test_chat_commands.py -q

The chat commands as a user runs them: `python -m serve.tiny` writes a checkpoint, `python -m serve.chat_web` serves
it (its own embedded Ray, HTTP on a free loopback port, the UI at /), and `python -m serve.chat_cli --url` holds a
multi-turn conversation with it over stdin: the second reply is the server's answer to the whole conversation (the
CLI sends the history), not to the last message alone. Ctrl-C (SIGINT) stops the server.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]
START_TIMEOUT_S = 600  # Ray + Serve + a replica on a loaded 2-core machine; only a hang gets near it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminal_sigint():
    """In the server: Ctrl-C's default action, as in a terminal. A pytest started in the background of a
    non-interactive shell (as some CI runners do) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the server would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def chat_web(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_web_base")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOCHAT_DTYPE": "float32"}
    env.pop("RAY_ADDRESS", None)
    # a context long enough for the CLI's 256-token replies after a few turns
    subprocess.run([sys.executable, "-m", "serve.tiny", "--base-dir", str(base), "--sequence-len", "1024"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=300)  # fmt: skip
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.chat_web", "--base-dir", str(base), "--host", "127.0.0.1",
                             "-p", str(port), "-m", "16"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_terminal_sigint)  # fmt: skip
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "Server ready at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(1):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "".join(lines)[-4000:]
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "lines": lines, "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the server's own session: its Ray processes only
                proc.wait()


def _reply(url, messages) -> str:
    body = {"messages": messages, "temperature": 0.0, "top_k": 50, "max_tokens": 256}
    text = ""
    with requests.post(url + "/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                data = json.loads(line[6:])
                assert "error" not in data, data
                text += data.get("token", "")
    return text


def test_chat_web_serves_api_and_ui(chat_web):
    url = chat_web["url"]
    assert requests.get(url + "/health", timeout=60).status_code == 200
    page = requests.get(url + "/", timeout=120)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert _reply(url, [{"role": "user", "content": "hello"}])


def test_chat_cli_multi_turn_conversation_with_the_server(chat_web):
    url = chat_web["url"]
    # bytes, decoded here: text mode would turn the model's "\r" into "\n" (universal newlines)
    cli = subprocess.run([sys.executable, "-m", "serve.chat_cli", "--url", url, "-t", "0"], cwd=ROOT,
                         env={**chat_web["env"], "PYTHONIOENCODING": "utf-8"},
                         input=b"hello\nwhat is 2 plus 2?\nquit\n", capture_output=True, timeout=600)  # fmt: skip
    stdout = cli.stdout.decode("utf-8")
    assert cli.returncode == 0, stdout[-3000:] + cli.stderr.decode("utf-8", "replace")[-3000:]
    assert "Goodbye!" in stdout and "[error" not in stdout
    replies = [part.split("\n\nUser: ")[0] for part in stdout.split("\nAssistant: ")[1:]]
    assert len(replies) == 2 and all(replies), stdout
    first = [{"role": "user", "content": "hello"}]
    assert replies[0] == _reply(url, first)
    whole = [*first, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "what is 2 plus 2?"}]
    assert replies[1] == _reply(url, whole)  # the CLI sent the conversation so far
    assert replies[1] != _reply(url, whole[-1:])  # ...which changes the answer: it is not a single-turn request


def test_sigint_stops_the_server(chat_web):
    proc = chat_web["proc"]
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not stop within 300 s of Ctrl-C:\n" + "".join(chat_web["lines"])[-3000:])
    assert code == 0, "".join(chat_web["lines"])[-3000:]
    assert "Shutting down" in "".join(chat_web["lines"])
