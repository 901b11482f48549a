"""Prometheus metrics of KV compression, served on SGLang's ``/metrics`` next to its own (``--enable-metrics``).

Recorded in the scheduler process the way SGLang's own collectors are: prometheus_client in multiprocess mode
(SGLang sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the scheduler, and its ``/metrics`` endpoint merges
every process's files with ``MultiProcessCollector``), gauges in ``mostrecent`` mode, and the same labels as
SGLang's scheduler series (model_name, engine_type, tp_rank, ...) so that dashboards can join them.

Per compressed request (once per compaction; a request recompressed after a retraction counts again), from
the stats every response carries in ``meta_info["hybridkv"]``:

- ``sglang:hybridkv_compressed_requests_total{policy}``; ``sglang:hybridkv_uncompressed_requests_total{policy}``
  (asked for compression but stayed uncompressed: no room in the pool, or the window was not computed);
- ``sglang:hybridkv_compressed_kv_bytes_full_total``, ``_device_total``, ``_host_total`` ``{policy}``: byte
  sums, so ``rate(full) / rate(device)`` is the fleet's compression ratio;
- histograms ``sglang:hybridkv_compression_ratio{policy}`` (full / device bytes) and
  ``sglang:hybridkv_static_head_share{policy}`` (static KV heads / all KV heads).

Gauges over the requests running now (set after every batch): ``sglang:hybridkv_compressed_requests_running``,
``sglang:hybridkv_kv_bytes_device`` (what they hold on the device), ``sglang:hybridkv_kv_bytes_saved`` (full
minus device), ``sglang:hybridkv_kv_bytes_host``.
"""

from __future__ import annotations

import functools
from typing import Iterable

RATIO_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0)
SHARE_BUCKETS = tuple(i / 10 for i in range(11))


class CompressionMetrics:
    """The plugin's Prometheus series, labelled like SGLang's scheduler series (``labels``)."""

    def __init__(self, labels: dict[str, str]) -> None:
        # Imported here: prometheus_client picks multiprocess mode from the environment at import.
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = dict(labels)
        names = list(self.labels)
        per_policy = names + ["policy"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sglang:hybridkv_{name}", doc, labelnames=per_policy)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sglang:hybridkv_{name}", doc, labelnames=names, multiprocess_mode="mostrecent")

        self.compressed = counter("compressed_requests", "Requests whose KV cache was compressed after prefill.")
        self.uncompressed = counter("uncompressed_requests",
                                    "Requests that asked for compression and stayed uncompressed.")
        self.bytes_full = counter("compressed_kv_bytes_full", "Full (uncompressed) KV bytes of the compressed requests.")
        self.bytes_device = counter("compressed_kv_bytes_device", "Device KV bytes the compressed requests kept.")
        self.bytes_host = counter("compressed_kv_bytes_host", "Host-tier KV bytes of the compressed requests.")
        self.ratio = Histogram("sglang:hybridkv_compression_ratio", "Full / device KV bytes per compressed request.",
                               labelnames=per_policy, buckets=RATIO_BUCKETS)
        self.static_share = Histogram("sglang:hybridkv_static_head_share",
                                      "Share of static KV heads per compressed request.",
                                      labelnames=per_policy, buckets=SHARE_BUCKETS)
        self.running = gauge("compressed_requests_running", "Compressed requests running now.")
        self.live_device = gauge("kv_bytes_device", "Device KV bytes held by the compressed requests running now.")
        self.live_saved = gauge("kv_bytes_saved", "Full minus device KV bytes of the compressed requests running now.")
        self.live_host = gauge("kv_bytes_host", "Host-tier KV bytes held by the compressed requests running now.")

    def record(self, stats: dict) -> None:
        """One request's compaction (``meta_info["hybridkv"]``)."""
        by_policy = {**self.labels, "policy": stats["policy"]}
        if not stats["compressed"]:
            self.uncompressed.labels(**by_policy).inc()
            return
        self.compressed.labels(**by_policy).inc()
        self.bytes_full.labels(**by_policy).inc(stats["kv_bytes_full"])
        self.bytes_device.labels(**by_policy).inc(stats["kv_bytes_device"])
        self.bytes_host.labels(**by_policy).inc(stats["kv_bytes_host"])
        self.ratio.labels(**by_policy).observe(stats["kv_bytes_full"] / max(1, stats["kv_bytes_device"]))
        heads = stats["static_heads"] + stats["dynamic_heads"]
        self.static_share.labels(**by_policy).observe(stats["static_heads"] / max(1, heads))

    def set_running(self, running: Iterable[dict]) -> None:
        """The stats of the compressed requests that hold their regions now."""
        running = list(running)
        self.running.labels(**self.labels).set(len(running))
        self.live_device.labels(**self.labels).set(sum(s["kv_bytes_device"] for s in running))
        self.live_saved.labels(**self.labels).set(sum(s["kv_bytes_full"] - s["kv_bytes_device"] for s in running))
        self.live_host.labels(**self.labels).set(sum(s["kv_bytes_host"] for s in running))


@functools.lru_cache(maxsize=1)
def metrics_for(labels: tuple[tuple[str, str], ...]) -> CompressionMetrics:
    """The process's one set of series (prometheus_client refuses to register a name twice)."""
    return CompressionMetrics(dict(labels))
