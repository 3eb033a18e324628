"""A real HTTP file server for tests: serves a directory on a free loopback port, with per-path fault injection.

    from tests.httpserver import FileServer

    with FileServer(directory) as srv:                 # threaded, one thread per connection
        srv.fail("shard_00001.parquet", "500", "500")  # next two GETs of that path answer 500, then it is served
        srv.fail("shard_00002.parquet", "stall:5")     # next GET sends headers, then stalls 5 s before the body
        srv.fail("shard_00003.parquet", "truncate")    # next GET promises the full length, sends half, closes
        srv.fail("shard_00004.parquet", "garbage")     # next GET answers 200 with bytes that are not the file
        srv.fail("shard_00005.parquet", "hold")        # next GET waits (nothing sent) until srv.release()
        srv.held                                       # how many GETs are being held right now
        url = srv.url("shard_00001.parquet")           # http://127.0.0.1:PORT/shard_00001.parquet
        srv.requests["shard_00001.parquet"]            # how many GETs that path received

A fault given as `"500*"` (trailing star) repeats forever. Unknown paths answer 404.
"""

import collections
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server_version = "nanochat-test/1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        owner = self.server.owner
        name = self.path.lstrip("/").split("?")[0]
        fault = owner._next_fault(name)
        path = os.path.join(owner.directory, name)
        if fault is not None and fault.startswith("500"):
            self.send_error(500, "injected failure")
            return
        if fault == "hold":
            owner._hold(self)
        if not name or not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        with open(path, "rb") as f:
            data = f.read()
        if fault == "garbage":
            data = b"this is not a parquet file " * 10
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if fault is not None and fault.startswith("stall"):
                self.wfile.flush()
                time.sleep(float(fault.split(":")[1]) if ":" in fault else 5.0)
            if fault == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its read timeout fired during a stall)


class FileServer:
    def __init__(self, directory):
        self.directory = str(directory)
        self.requests = collections.Counter()
        self._faults = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.held = 0
        self._server = None
        self._thread = None

    def fail(self, name, *faults):
        with self._lock:
            self._faults[name].extend(faults)

    def release(self):
        """Let every held GET (and every later one) through."""
        self._released.set()

    def _hold(self, handler):
        with self._lock:
            self.held += 1
        self._released.wait()
        with self._lock:
            self.held -= 1

    def _next_fault(self, name):
        with self._lock:
            self.requests[name] += 1
            queue = self._faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            if fault.endswith("*"):
                return fault[:-1]
            return queue.popleft()

    @property
    def base_url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name=""):
        return f"{self.base_url}/{name}"

    def start(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the kernel picks a free one
        self._server.daemon_threads = True
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._released.set()  # no handler thread stays parked
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
