"""`network3 serve --workers N`: N worker processes serve the same gRPC and HTTP ports
(SO_REUSEPORT: the kernel spreads new connections over them), each a whole Network3Server
with its own batcher and onnxruntime session; one parent supervises them.

Why processes from multiprocessing's spawn context: a worker gets the parent's ServerOptions
as they are (ports resolved, no command line to rebuild) and a pipe to the parent (ready,
reload) from one call; spawn, not fork, because gRPC's core and the parent's event loop must
not be forked.

The parent:
- proves the ports free by binding them without SO_REUSEPORT (a port that is taken fails at
  once, with one line, as with one process; port 0 becomes a real port for all workers), then
  keeps those sockets bound, with SO_REUSEPORT turned on but never listening: only sockets of
  this user with SO_REUSEPORT can join (our workers), another server's plain bind fails, and
  so does another `--workers` parent's, which binds without SO_REUSEPORT first;
- prints the start-up lines once every worker serves, and serves /metrics (--metrics-port) for
  the whole server: each worker writes its counters to the metrics folder every second and
  when it stops (metrics.write_snapshot), the parent sums every file, those of workers that
  died included, so a total never goes down (a SIGKILLed worker's last second is lost);
  the gauges (queue depth, the model) come from the live workers' files, up to a second old;
- replaces a worker that dies at once, with exponential backoff only while replacements keep
  dying within RESTART_WINDOW_S; logged;
- SIGTERM/SIGINT: forwards SIGTERM to every worker (each drains as one server does), waits
  up to --grace + STOP_MARGIN_S (then SIGKILL) and exits 0;
- SIGHUP (and --watch-interval): reloads every worker in two phases: each loads and warms up
  the file without serving it; only if every worker loaded the same file (sha256) do all
  switch to it, else all keep the old one (one ERROR line).  The token and TLS files are read
  again by each worker, as by one server.

Health: each worker answers its own health checks, and a probe reaches one of them; a worker
that cannot serve exits and is replaced, so every worker that is up is SERVING, and all say
NOT_SERVING together once the parent drains them.  Workers die with the parent, even when it
is SIGKILLed: PR_SET_PDEATHSIG (Linux), and the pipe to the parent closing (anywhere).
ModelStatistics counts the worker that answers (it says so: api/inference.statistics_scope).
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from .metrics import SNAPSHOT, read_snapshots, start_metrics_server, write_snapshot
from .watch import watch, watched_files

log = logging.getLogger("network3.workers")

SNAPSHOT_S = 1.0  # how often a worker writes its counters for the parent's /metrics
RESTART_WINDOW_S = 10.0  # a worker that dies younger than this is "still dying": back off
MAX_BACKOFF_S = 30.0
STOP_MARGIN_S = 10.0  # past --grace, what a draining worker gets before SIGKILL
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class WorkersFailed(Exception):
    """The workers could not start (a port taken, a bad model file): one line."""


def cpu_count(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """`--workers auto`: the CPUs this process may use: those it may run on, and no more than
    its cgroup's CPU quota (cgroup v2 `cpu.max`, "200000 100000": 2 CPUs; a Kubernetes CPU
    limit), rounded up."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or no quota
    return n


# ------------------------------------------------------------------------------ the ports --

def host_port(host: str, port: int | str) -> str:
    """host:port as gRPC, URLs and people read it: an IPv6 literal in brackets ([::]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hold_port(host: str, port: int, what: str) -> tuple[int, list[socket.socket]]:
    """Bind `port` (0: any free one) on every address of `host` without SO_REUSEPORT (it must
    be free), then turn SO_REUSEPORT on so that our workers can join.  The sockets never
    listen: the kernel gives connections only to listening sockets (the workers')."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise WorkersFailed(f"cannot listen on {what}{host_port(host, port)}: {e.strerror}") from None
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            s = socket.socket(family, kind, proto)
            held.append(s)
            try:
                s.bind((address[0], port, *address[2:]))
            except OSError as e:
                if len(held) > 1 and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    held.pop().close()  # e.g. no IPv6 here: the workers will not bind it either
                    continue
                raise WorkersFailed(f"cannot listen on {what}{host_port(host, port)}: {os.strerror(e.errno)}") from None
            port = s.getsockname()[1]  # port 0: the others take the same one
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        for s in held:
            s.close()
        raise
    return port, held


# ---------------------------------------------------------------------------- the worker --

def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux; the pipe is the fallback)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker(server_class, options, conn, parent: int, log_level: int, expect: str) -> None:
    """A worker process: one Network3Server (`server_class`, passed in so that this module does
    not import the server) on the shared ports, until SIGTERM or the parent goes.  `expect`:
    the sha256 the other workers serve (a replacement must serve the same), or ""."""
    _die_with_parent(parent)
    logging.basicConfig(level=log_level, stream=sys.stderr, format=LOG_FORMAT)
    try:
        if expect:
            _check_file(options.model, expect)
        code = asyncio.run(_serve(server_class(options), options, conn))
    except BaseException as e:  # noqa: BLE001  (a worker reports, never prints a traceback)
        _send(conn, ("failed", _one_line(e)))
        code = 1
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # not multiprocessing's exit: nothing of the parent's to run here


def _check_file(path: Path, expect: str) -> None:
    try:
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return  # the load says why
    if sha != expect:
        raise WorkersFailed(_changed(path, sha, expect))


def _changed(path, sha: str, expect: str) -> str:
    return (f"{path} is sha256 {sha[:12]} where the other workers serve {expect[:12]}: the file changed "
            f"since the last reload (SIGHUP reloads every worker)")


async def _serve(server, options, conn) -> int:
    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except Exception as e:
        _send(conn, ("failed", _one_line(e)))
        return 1
    tasks: set[asyncio.Task] = set()
    pending = []  # the model a "prepare" loaded, until "commit" (True: serve it; False: drop it)

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def prepare() -> None:
        pending.clear()
        try:
            pending.append(await server.load_model())
            _send(conn, ("prepared", pending[0].sha256))
        except Exception as e:
            _send(conn, ("prepare-failed", _one_line(e)))

    def commit(use_model: bool) -> None:
        server.reload_credentials()
        if use_model and pending:
            server.use_model(pending[0])
        pending.clear()

    def on_message() -> None:
        try:
            kind, *args = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(conn.fileno())
            log.warning("the parent is gone: stopping")
            spawn(server.stop())
            return
        if kind == "prepare":
            spawn(prepare())
        elif kind == "commit":
            commit(*args)

    loop.add_signal_handler(signal.SIGTERM, lambda: spawn(server.stop()))
    # Ctrl-C reaches the whole process group: the parent drains the workers (SIGTERM), and
    # a worker that stopped on its own first would be replaced.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    # All workers reload together, from the parent: a SIGHUP sent to one alone changes nothing.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("SIGHUP ignored: send it to the parent, pid %d",
                                                                os.getppid()))
    loop.add_reader(conn.fileno(), on_message)
    _send(conn, ("ready", server.serving.model.sha256, server.http_url))
    folder = options.metrics_dir
    if folder is not None:
        spawn(_snapshots(server.stats, folder))
    await server.wait()
    if folder is not None:
        write_snapshot(server.stats, folder)
    return 0


async def _snapshots(stats, folder: Path) -> None:
    while True:
        try:
            write_snapshot(stats, folder)
        except OSError as e:
            log.error("cannot write metrics to %s: %s", folder, e)
        await asyncio.sleep(SNAPSHOT_S)


def _send(conn, message) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass  # the parent is gone; PR_SET_PDEATHSIG or the pipe's end stops us


def _one_line(e: BaseException) -> str:
    """Our own errors (a bad model, a port taken) are one line already; others get their type."""
    text = " ".join(str(e).split())
    ours = type(e).__module__.partition(".")[0] in ("serving", "__mp_main__")  # __mp_main__: `-m serving.server`
    return text if text and ours else f"{type(e).__name__}: {text}".rstrip(": ")


# ---------------------------------------------------------------------------- the parent --

@dataclasses.dataclass
class Worker:
    slot: int
    process: multiprocessing.Process
    conn: object
    started: float
    pid: int = 0
    ready: asyncio.Future | None = None  # resolves when it serves (or raises: it failed)
    reply: asyncio.Future | None = None  # a reload's answer
    error: str = ""


class Supervisor:
    def __init__(self, options, server_class) -> None:
        self.options = options
        self.server_class = server_class
        self.workers: dict[int, Worker] = {}  # slot -> the worker in it now
        self.deaths = [0] * options.workers  # per slot: deaths in a row, each younger than RESTART_WINDOW_S
        self.started = self.stopping = False
        self.sha256 = ""
        self._held: list[socket.socket] = []
        self._own_dir: Path | None = None
        self._metrics = None
        self._gone = asyncio.Event()  # stopping, and every worker has exited
        self._stopped = asyncio.Event()
        self.http_url: str | None = None
        self._reloading = False
        self._tasks: set[asyncio.Task] = set()
        self._ctx = multiprocessing.get_context("spawn")

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        o = self.options
        port, held = hold_port(o.host, o.port, "")
        self._held += held
        http_port = None
        if o.http_port is not None:
            try:
                http_port, held = hold_port(o.host, o.http_port, "http ")
            except WorkersFailed:
                self._release()
                raise
            self._held += held
        folder = None
        if o.metrics_port is not None:
            folder = o.metrics_dir
            if folder is None:
                folder = self._own_dir = Path(tempfile.mkdtemp(prefix="network3-metrics-"))
            else:
                folder.mkdir(parents=True, exist_ok=True)
                for old in folder.glob(SNAPSHOT.format(pid="*", start="*")):  # a previous run's: its counts are not ours
                    old.unlink()
        self.worker_options = dataclasses.replace(o, port=port, http_port=http_port, metrics_port=None,
                                                  watch_interval=0.0, metrics_dir=folder)
        self.port, self.http_port = port, http_port
        if folder is not None:  # before the workers start: a taken port fails at once
            try:
                self._metrics = start_metrics_server(lambda: read_snapshots(folder, self.live_pids), o.metrics_port,
                                                     o.host)
            except OSError as e:
                self._release()
                raise WorkersFailed(f"cannot listen on metrics {host_port(o.host, o.metrics_port)}: "
                                    f"{os.strerror(e.errno) if e.errno else e}") from None
        for slot in range(o.workers):
            self._start(slot)
        try:
            await asyncio.gather(*(w.ready for w in self.workers.values()))
        except WorkersFailed:
            await self.stop(quiet=True)
            raise
        self.started = True
        if o.watch_interval > 0:
            self._spawn(watch(watched_files(o), o.watch_interval, self.reload))
        log.info("%d workers serving %s as %r on %s (pids %s)%s%s", o.workers, o.model, o.model_name, host_port(o.host, port),
                 " ".join(map(str, self.pids())), f", http on :{http_port}" if http_port is not None else "",
                 f", metrics on :{self._metrics.server_port}/metrics" if self._metrics else "")

    def _start(self, slot: int) -> Worker:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker, name=f"network3-worker-{slot}", daemon=True,
                                    args=(self.server_class, self.worker_options, theirs, os.getpid(),
                                          logging.getLogger().level, self.sha256 if self.started else ""))
        process.start()
        theirs.close()
        loop = asyncio.get_running_loop()
        w = Worker(slot, process, ours, time.monotonic(), process.pid, ready=loop.create_future())
        self.workers[slot] = w
        loop.add_reader(ours.fileno(), self._on_message, w)
        loop.add_reader(process.sentinel, self._on_exit, w)
        return w

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers.values()]

    def live_pids(self) -> set[int]:
        return {w.pid for w in self.workers.values() if w.process.exitcode is None}

    # -- what the workers say ---------------------------------------------------------------

    def _on_message(self, w: Worker) -> None:
        try:
            kind, *args = w.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(w.conn.fileno())
            return  # it exited: _on_exit
        if kind == "ready":
            if self.started and args[0] != self.sha256:
                # A replacement must serve what the others serve: the file changed on disk since
                # the last reload.  Retried (with backoff) until a reload makes them agree.
                w.error = _changed(self.options.model, args[0], self.sha256)
                _signal(w.pid, signal.SIGTERM)
                return
            self.sha256 = self.sha256 or args[0]
            self.http_url = self.http_url or args[1]
            if not w.ready.done():
                w.ready.set_result(None)
        elif kind == "failed":
            w.error = args[0]
        elif kind in ("prepared", "prepare-failed") and w.reply is not None and not w.reply.done():
            w.reply.set_result((kind, args[0]))

    def _on_exit(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.process.sentinel)
        try:
            loop.remove_reader(w.conn.fileno())
        except (OSError, ValueError):
            pass
        w.process.join()
        w.conn.close()
        code = w.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        why = f"{how}: {w.error}" if w.error else how
        for future in (w.ready, w.reply):
            if future is not None and not future.done():
                future.set_exception(WorkersFailed(w.error or f"worker pid {w.pid} exited ({how})"))
                future.exception()  # retrieved: whoever awaits it still gets it, nobody else is told
        if self.workers.get(w.slot) is w:
            del self.workers[w.slot]
        if self.stopping:
            if not self.workers:
                self._gone.set()
            return
        if not self.started:
            return  # at start: start() fails
        young = time.monotonic() - w.started < RESTART_WINDOW_S
        self.deaths[w.slot] = self.deaths[w.slot] + 1 if young else 1
        delay = 0.0 if self.deaths[w.slot] <= 1 else min(MAX_BACKOFF_S, 0.5 * 2 ** (self.deaths[w.slot] - 2))
        log.error("worker pid %d %s; %s", w.pid, why,
                  f"replacing it in {delay:g} s ({self.deaths[w.slot]} deaths in a row)" if delay else "replacing it")
        self._spawn(self._replace(w.slot, w.pid, delay))

    async def _replace(self, slot: int, old: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping:
            return
        w = self._start(slot)
        try:
            await w.ready
        except WorkersFailed:
            return  # logged by _on_exit, which replaces it again
        log.info("worker pid %d serves, replacing pid %d (pids now %s)", w.pid, old, " ".join(map(str, self.pids())))

    # -- reload -----------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Every worker loads the file; all switch to it only if all loaded the same one."""
        if self._reloading or self.stopping:
            log.warning("reload ignored: %s", "a reload is running" if self._reloading else "shutting down")
            return False
        self._reloading = True
        try:
            workers = [w for w in self.workers.values() if w.ready.done() and w.process.exitcode is None]
            if not workers:
                log.warning("reload ignored: no worker is serving")
                return False
            loop = asyncio.get_running_loop()
            for w in workers:
                w.reply = loop.create_future()
                _send(w.conn, ("prepare",))
            results = await asyncio.gather(*(w.reply for w in workers), return_exceptions=True)
            failed = [(w, r) for w, r in zip(workers, results) if isinstance(r, BaseException) or r[0] != "prepared"]
            shas = {r[1] for r in results if not isinstance(r, BaseException) and r[0] == "prepared"}
            ok = not failed and len(shas) == 1
            for w in workers:
                _send(w.conn, ("commit", ok))
            if ok:
                new = shas.pop()
                log.info("reloaded %s in all %d workers: sha256 %s -> %s", self.options.model, len(workers),
                         self.sha256[:12], new[:12])
                self.sha256 = new
            else:
                why = (f"worker pid {failed[0][0].pid}: " + (str(failed[0][1]) if isinstance(failed[0][1], BaseException)
                                                             else failed[0][1][1]) if failed
                       else "the workers loaded different files (it changed during the reload)")
                log.error("model reload failed, all %d workers still serving sha256 %s: %s", len(workers),
                          self.sha256[:12], why)
            return ok
        finally:
            self._reloading = False

    # -- stop -------------------------------------------------------------------------------

    async def stop(self, quiet: bool = False) -> None:
        """Drain every worker (SIGTERM), SIGKILL any still there after --grace + STOP_MARGIN_S."""
        if self.stopping:
            return
        self.stopping = True
        if not quiet:
            log.info("draining %d workers", len(self.workers))
        for w in list(self.workers.values()):
            _signal(w.pid, signal.SIGTERM)
        if self.workers:
            try:
                await asyncio.wait_for(self._gone.wait(), self.options.grace + STOP_MARGIN_S)
            except asyncio.TimeoutError:
                for w in list(self.workers.values()):
                    log.error("worker pid %d still running %.0f s after SIGTERM: SIGKILL", w.pid,
                              self.options.grace + STOP_MARGIN_S)
                    _signal(w.pid, signal.SIGKILL)
                await self._gone.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._metrics is not None:
            self._metrics.shutdown()
        self._release()
        if not quiet:
            log.info("stopped")
        self._stopped.set()

    def _release(self) -> None:
        for s in self._held:
            s.close()
        self._held.clear()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def supervise(options, server_class) -> int:
    """`serve --workers N` (N > 1): start the workers, print the start-up lines, supervise until
    SIGTERM/SIGINT (drain all, exit 0).  SIGHUP reloads all workers (Supervisor.reload)."""
    sup = Supervisor(options, server_class)
    await sup.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("%s received", signal.Signals(s).name),
                                                    sup._spawn(sup.stop())))
    loop.add_signal_handler(signal.SIGHUP, lambda: (log.info("SIGHUP received: reloading every worker"),
                                                    sup._spawn(sup.reload())))
    if sup.http_url is not None:
        print(f"network3 http on {sup.http_url}", file=sys.stderr, flush=True)
    print(f"network3 workers {options.workers}: pids {' '.join(map(str, sup.pids()))}", file=sys.stderr, flush=True)
    print(f"network3 serving on {host_port(options.host, sup.port)}", file=sys.stderr, flush=True)
    await sup._stopped.wait()
    return 0
