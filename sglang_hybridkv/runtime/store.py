"""The compressed region: each request's compressed KV per (layer, KV head), and its accounting.

Keyed by the request's row in SGLang's ``ReqToTokenPool``; a row's compressed KV is released exactly once, when
SGLang frees the row (finish, abort or retraction) — the plugin hooks ``ReqToTokenPool.free_rows``. Counters
let tests and the idle check prove that nothing leaks. Per-request stats outlive the row until they are
reported in the response's ``meta_info["hybridkv"]``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from ..config import HybridKVConfig
from ..core.cache import CompressedLayer, KVBytes

logger = logging.getLogger("sglang_hybridkv")


@dataclass
class RequestKV:
    """One request's compressed prompt KV (all layers) and what it was compressed under."""

    rid: str
    config: HybridKVConfig
    prompt_len: int
    layers: dict[int, CompressedLayer] = field(default_factory=dict)

    def nbytes(self) -> KVBytes:
        total = KVBytes()
        for layer in self.layers.values():
            total = total + layer.nbytes()
        return total

    def stats(self) -> dict:
        b = self.nbytes()
        n_static = sum(int(l.plan.static.sum()) for l in self.layers.values())
        n_heads = sum(l.plan.static.numel() for l in self.layers.values())
        return {"policy": self.config.policy, "budget": self.config.budget, "prompt_tokens": self.prompt_len,
                "kv_bytes_full": b.full, "kv_bytes_device": b.device_total, "kv_bytes_host": b.host,
                "kv_bytes_metadata": b.metadata, "static_heads": n_static, "dynamic_heads": n_heads - n_static}


class CompressedStore:
    """Compressed KV of all running requests of one scheduler process."""

    def __init__(self) -> None:
        self.by_row: dict[int, RequestKV] = {}
        self.stats_by_rid: dict[str, dict] = {}
        self.pending: dict[int, dict] = {}  # row -> request info of the extend batch being prepared
        self.compacted = 0
        self.released = 0
        self._lock = threading.Lock()

    def add(self, row: int, req: RequestKV) -> None:
        with self._lock:
            if row in self.by_row:
                raise RuntimeError(f"row {row} already holds compressed KV of request {self.by_row[row].rid}")
            self.by_row[row] = req
            self.compacted += 1

    def get(self, row: int) -> RequestKV | None:
        return self.by_row.get(row)

    def finish_compaction(self, row: int) -> None:
        req = self.by_row[row]
        self.stats_by_rid[req.rid] = req.stats()
        s = self.stats_by_rid[req.rid]
        logger.info("hybridkv: compressed request %s (%d prompt tokens, %s @ %.2f): %d static / %d dynamic heads, "
                    "device KV %d -> %d bytes (%.1fx), host tier %d bytes", req.rid, req.prompt_len,
                    req.config.policy, req.config.budget, s["static_heads"], s["dynamic_heads"], s["kv_bytes_full"],
                    s["kv_bytes_device"], s["kv_bytes_full"] / max(1, s["kv_bytes_device"]), s["kv_bytes_host"])

    def release_rows(self, rows) -> None:
        with self._lock:
            for row in rows:
                self.pending.pop(int(row), None)
                if self.by_row.pop(int(row), None) is not None:
                    self.released += 1

    def release_all(self) -> None:
        with self._lock:
            self.released += len(self.by_row)
            self.by_row.clear()
            self.pending.clear()

    @property
    def live(self) -> int:
        return len(self.by_row)

    def resident(self) -> KVBytes:
        total = KVBytes()
        for req in list(self.by_row.values()):
            total = total + req.nbytes()
        return total


STORE = CompressedStore()
