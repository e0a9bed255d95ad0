"""Start `network3 serve` in a subprocess and wait until it serves: the one way tests,
benchmarks and scripts do it.

    with ServerProcess("models/default.onnx", "--metrics-port", "0") as server:
        grpc.insecure_channel(server.address) ...
        server.metrics_port, server.http_port, server.http_url

The server prints `network3 serving on HOST:PORT` on stderr once the model is loaded and
warmed up and the ports are bound (after its log line `... metrics on :PORT/metrics` when
metrics are on, and its line `network3 http on http://HOST:PORT` when HTTP is on); stderr
goes to a log file, read for those lines.  Torch-free: only the standard library.
"""
from __future__ import annotations

import os
import re
import signal as signals
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = re.compile(r"^network3 serving on (\S+):(\d+)$", re.MULTILINE)
METRICS = re.compile(r"metrics on :(\d+)/metrics")
HTTP = re.compile(r"^network3 http on (https?://\S+):(\d+)$", re.MULTILINE)
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # where the `serving` package lies


class ServerProcess:
    """`python -m serving.server --model MODEL --port 0 ARGS...` (or `command`, e.g. the
    `network3 serve` script), started and waited for.  `--port 0` is added unless ARGS name a
    port, and `--http-port 0` unless ARGS name one or say `--no-http` (so servers started
    side by side never collide on the default ports); `http_port` and `http_url` are then the
    bound HTTP port and its base URL (None with --no-http).  `ready` matches the start-up line
    (groups: host, port); with a `ready` of its own (another server) no --http-port is added.
    Raises RuntimeError with the log's tail when the server exits or does not start within
    `timeout` seconds."""

    def __init__(self, model: str | os.PathLike, *args: str, log: str | os.PathLike | None = None,
                 env: dict | None = None, timeout: float = 120, command: list[str] | None = None,
                 cwd: str | os.PathLike | None = None, ready: re.Pattern = READY) -> None:
        if log is None:
            fd, log = tempfile.mkstemp(prefix="network3-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log)
        argv = [*(command or [sys.executable, "-m", "serving.server"]), "--model", os.fspath(model)]
        if not any(a == "--port" or a.startswith("--port=") for a in args):
            argv += ["--port", "0"]
        if ready is READY and not any(a in ("--http-port", "--no-http") or a.startswith("--http-port=") for a in args):
            argv += ["--http-port", "0"]
        argv += list(args)
        self.argv = argv
        environment = {**os.environ, **(env or {})}
        # `-m serving.server` finds this source tree from any working directory.
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), environment.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._log, env=environment)
        self.pid = self.proc.pid
        self.host = self.address = ""
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.http_url: str | None = None
        try:
            self._wait_ready(timeout, ready, metrics="--metrics-port" in args or any(a.startswith("--metrics-port=") for a in args))
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float, ready: re.Pattern, metrics: bool) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            m = ready.search(text)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                self.address = f"{self.host}:{self.port}"
                mm = METRICS.search(text[:m.start()])
                self.metrics_port = int(mm.group(1)) if mm else None
                mh = HTTP.search(text[:m.start()])
                if mh:
                    self.http_port = int(mh.group(2))
                    self.http_url = f"{mh.group(1)}:{self.http_port}"
                if metrics and self.metrics_port is None:
                    raise RuntimeError(f"server started without its metrics line:\n{text[-3000:]}")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout:g} s:\n{text[-3000:]}")
            time.sleep(0.05)

    # -- what it says ---------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first match of `pattern` in the log, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the server log within {timeout:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    # -- control --------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = 30) -> int:
        return self.proc.wait(timeout)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains and exits 0), SIGKILL if it has not exited by `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signals.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL: nothing drained."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def perf_analyzer() -> tuple[Path, dict] | None:
    """Triton's perf_analyzer from the tritonclient wheel beside this Python, and the environment
    it runs in (PyPI's nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH: it loads libcudart even on a
    CPU), or None when it cannot run here (Debian's libb64-0d missing, say)."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        return None
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # an optional package: only perf_analyzer needs it
        libs = [str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    except ImportError:
        pass
    r = subprocess.run([str(binary), "--version"], capture_output=True, env=env)
    return (binary, env) if r.returncode == 0 else None
