"""Counters the server keeps, exported to Prometheus and to the v2 ModelStatistics RPC.

One set of plain Python numbers, updated on the event loop thread where a request or batch
ends, is the single source: `ModelStatistics` reads it, and a custom Prometheus collector
turns it into metrics only when /metrics is scraped.  Updating it costs a bisect and a few
integer additions, far less than prometheus_client's locked metric objects would on every
request.
"""
from __future__ import annotations

import bisect
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Buckets, sum and count; observe() is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's counts and sum (the same bounds): a snapshot's."""
        for i, c in enumerate(counts[:len(self.counts)]):
            self.counts[i] += int(c)
        self.sum += float(total)
        self.count += sum(int(c) for c in counts[:len(self.counts)])

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, c in zip((*map(_le, self.bounds), "+Inf"), self.counts):
            total += c
            out.append((bound, total))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


def failed(code: str) -> bool:
    """Whether a request's code is a failure: a gRPC status name other than OK, or (api "http")
    an HTTP status of 400 or more."""
    return code != "OK" and not (code.isdigit() and int(code) < 400)


class MethodStats:
    """Per (api, method): requests by status code (a gRPC status name, or for api "http" the
    HTTP status as a string), images, latency."""

    __slots__ = ("api", "method", "codes", "images", "latency")

    def __init__(self, api: str, method: str) -> None:
        self.api, self.method = api, method
        self.codes: dict[str, int] = {}
        self.images = 0
        self.latency = Histogram(LATENCY_BUCKETS)

    def record(self, code: str, images: int, seconds: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.images += images
        self.latency.observe(seconds)


@dataclass
class Stats:
    """Everything counted.  Times in seconds (Prometheus) and summed ns (ModelStatistics)."""

    methods: dict[tuple[str, str], MethodStats] = field(default_factory=dict)
    queue: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))  # per request
    compute: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))  # per batch
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # images per batch
    # Per batch size: [executions, compute seconds] (v2 InferBatchStatistics).
    batches: dict[int, list] = field(default_factory=dict)
    # Requests that reached the model: ok and failed, count and summed seconds (end to end).
    model_ok: list = field(default_factory=lambda: [0, 0.0])
    model_fail: list = field(default_factory=lambda: [0, 0.0])
    # Each request is charged its batch's compute time, as Triton does.
    request_compute: list = field(default_factory=lambda: [0, 0.0])
    dropped: dict[str, int] = field(default_factory=dict)  # "cancelled", "deadline"
    rejected_images: int = 0  # refused because the queue was full
    last_inference_ms: int = 0
    queue_depth: callable = lambda: 0  # set by the batcher: images waiting now
    model_info: callable = lambda: {}  # set by the server: sha256, path, loaded_at

    def method(self, api: str, method: str) -> MethodStats:
        key = (api, method)
        m = self.methods.get(key)
        if m is None:
            m = self.methods[key] = MethodStats(api, method)
        return m

    def record_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.compute.observe(seconds)
        b = self.batches.get(images)
        if b is None:
            b = self.batches[images] = [0, 0.0]
        b[0] += 1
        b[1] += seconds
        self.request_compute[0] += requests
        self.request_compute[1] += seconds * requests
        self.last_inference_ms = int(time.time() * 1000)

    def record_model_request(self, ok: bool, seconds: float) -> None:
        s = self.model_ok if ok else self.model_fail
        s[0] += 1
        s[1] += seconds

    def inference_count(self) -> int:
        """Images computed."""
        return sum(size * b[0] for size, b in self.batches.items())

    def execution_count(self) -> int:
        """Batches computed."""
        return sum(b[0] for b in self.batches.values())

    # -- across processes (serve --workers: each worker's Stats, summed by the parent) -------

    def snapshot(self) -> dict:
        """Every count as plain JSON values (Stats.summed adds such snapshots up)."""
        h = lambda x: [list(x.counts), x.sum]  # noqa: E731
        return {"methods": [[m.api, m.method, dict(m.codes), m.images, *h(m.latency)] for m in list(self.methods.values())],
                "queue": h(self.queue), "compute": h(self.compute), "batch_size": h(self.batch_size),
                "batches": [[size, *b] for size, b in list(self.batches.items())],
                "model_ok": list(self.model_ok), "model_fail": list(self.model_fail),
                "request_compute": list(self.request_compute), "dropped": dict(self.dropped),
                "rejected_images": self.rejected_images, "last_inference_ms": self.last_inference_ms,
                "queue_depth": self.queue_depth(), "model_info": self.model_info()}

    @classmethod
    def summed(cls, snapshots: list[dict], live: list[dict] = ()) -> "Stats":
        """One Stats counting what all `snapshots` counted (dead workers' included: a total
        never goes down); the gauges (queue depth, the model) from the `live` ones only."""
        total = cls()
        for snap in snapshots:
            for api, method, codes, images, counts, seconds in snap["methods"]:
                m = total.method(api, method)
                for code, n in codes.items():
                    m.codes[code] = m.codes.get(code, 0) + n
                m.images += images
                m.latency.add(counts, seconds)
            for name in ("queue", "compute", "batch_size"):
                getattr(total, name).add(*snap[name])
            for size, n, seconds in snap["batches"]:
                b = total.batches.setdefault(int(size), [0, 0.0])
                b[0] += n
                b[1] += seconds
            for name in ("model_ok", "model_fail", "request_compute"):
                pair = getattr(total, name)
                pair[0] += snap[name][0]
                pair[1] += snap[name][1]
            for reason, n in snap["dropped"].items():
                total.dropped[reason] = total.dropped.get(reason, 0) + n
            total.rejected_images += snap["rejected_images"]
            total.last_inference_ms = max(total.last_inference_ms, snap["last_inference_ms"])
        depth = sum(snap["queue_depth"] for snap in live)
        info = max((snap["model_info"] for snap in live if snap["model_info"]), default={},
                   key=lambda i: i.get("loaded_at", 0.0))
        total.queue_depth = lambda: depth
        total.model_info = lambda: info
        return total


# A worker's Stats in the metrics folder (serve --workers): named by its pid and its start, so
# a new process that is given a dead one's pid does not write over the dead one's counts.
SNAPSHOT = "worker-{pid}-{start}.json"
_STARTED = time.time_ns()


def write_snapshot(stats: Stats, folder: Path) -> None:
    """Write `stats` as folder/worker-<pid>.json whole: aside, then renamed over (a reader never
    sees half a file)."""
    path = folder / SNAPSHOT.format(pid=os.getpid(), start=_STARTED)
    aside = path.with_name(f".{path.name}.new")
    aside.write_text(json.dumps(stats.snapshot(), separators=(",", ":")))
    os.replace(aside, path)


def read_snapshots(folder: Path, live_pids: Callable[[], set[int]]) -> Stats:
    """The whole server's Stats: every worker's snapshot in `folder` summed, those of workers
    that died included; the gauges from the workers alive now."""
    snapshots, live = [], []
    alive = live_pids()
    for path in sorted(folder.glob(SNAPSHOT.format(pid="*", start="*"))):
        try:
            snap = json.loads(path.read_text())
            pid = int(path.stem.split("-")[1])
        except (OSError, ValueError):
            continue  # not ours, or gone: skip it rather than fail the scrape
        snapshots.append(snap)
        if pid in alive:
            live.append(snap)
    return Stats.summed(snapshots, live)


class StatsCollector(Collector):
    """Prometheus view of Stats, built at scrape time (`stats`: a Stats, or a function that
    returns one at each scrape)."""

    def __init__(self, stats: Stats | Callable[[], Stats]) -> None:
        self.stats = stats
        self._lock = threading.Lock()  # scrapes come from the HTTP server's thread

    def collect(self):
        s = self.stats if isinstance(self.stats, Stats) else self.stats()
        with self._lock:
            methods = list(s.methods.values())
            requests = CounterMetricFamily("network3_requests", "Requests finished, by API, method and status code (gRPC name; HTTP status for api=http).",
                                           labels=["api", "method", "code"])
            failures = CounterMetricFamily("network3_request_failures", "Requests that failed: a gRPC status other than OK, an HTTP status of 400 or more.",
                                           labels=["api", "method", "code"])
            images = CounterMetricFamily("network3_images", "Images received, by API and method.", labels=["api", "method"])
            latency = HistogramMetricFamily("network3_request_duration_seconds", "RPC latency in the server, by API and method.",
                                            labels=["api", "method"])
            for m in methods:
                for code, n in list(m.codes.items()):
                    requests.add_metric([m.api, m.method, code], n)
                    if failed(code):
                        failures.add_metric([m.api, m.method, code], n)
                images.add_metric([m.api, m.method], m.images)
                latency.add_metric([m.api, m.method], m.latency.cumulative(), m.latency.sum)
            yield requests
            yield failures
            yield images
            yield latency
            yield _histogram("network3_queue_duration_seconds", "Time a request waited in the batcher's queue.", s.queue)
            yield _histogram("network3_compute_duration_seconds", "onnxruntime time per batch.", s.compute)
            yield _histogram("network3_batch_size", "Images per batch run by onnxruntime.", s.batch_size)
            depth = GaugeMetricFamily("network3_queue_depth", "Images waiting in the batcher's queue.")
            depth.add_metric([], s.queue_depth())
            yield depth
            dropped = CounterMetricFamily("network3_dropped_requests", "Requests dropped before compute, by reason.",
                                          labels=["reason"])
            for reason, n in list(s.dropped.items()):
                dropped.add_metric([reason], n)
            yield dropped
            yield CounterMetricFamily("network3_rejected_images", "Images refused because the queue was full.",
                                      value=s.rejected_images)
            info = s.model_info()
            if info:
                model = GaugeMetricFamily("network3_model_info", "The model being served (value 1).",
                                          labels=["name", "sha256", "path"])
                model.add_metric([info.get("name", ""), info.get("sha256", ""), info.get("path", "")], 1)
                yield model
                yield GaugeMetricFamily("network3_model_loaded_timestamp_seconds", "When the served model was loaded.",
                                        value=info.get("loaded_at", 0.0))


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    m = HistogramMetricFamily(name, doc)
    m.add_metric([], h.cumulative(), h.sum)
    return m


def registry_for(stats: Stats | Callable[[], Stats]) -> CollectorRegistry:
    """A registry of our own (not the global one), so several servers can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


def start_metrics_server(stats: Stats | Callable[[], Stats], port: int, host: str = "127.0.0.1"):
    """Serve /metrics on host:port in a daemon thread.  Returns the HTTP server (call shutdown())."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry_for(stats))
    return server
