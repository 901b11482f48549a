"""Each running request's compressed KV: the pool slots holding its device tier, its host tier, and the counters.

Keyed by the request's row in SGLang's ``ReqToTokenPool``. A row's compressed KV is released exactly once, when
SGLang frees the row (finish, abort or retraction; the plugin hooks ``ReqToTokenPool.free_rows``): its pool
slots go back to SGLang's allocator and its host-tier tensors are dropped. The host tier is a separate,
separately accounted pool (on a CPU machine the same RAM). Counters let tests and the idle check prove that
nothing leaks. Per-request stats outlive the row until they are reported in ``meta_info["hybridkv"]``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import HybridKVConfig
from ..core.cache import CompressedLayer, KVBytes
from .pool_region import LayerRows

logger = logging.getLogger("sglang_hybridkv")


@dataclass
class RequestKV:
    """One request's compressed prompt KV (all layers), where it lives, and what it was compressed under.

    ``slots`` are the pool slots of the device tier (see ``pool_region``); ``rows[layer]`` places each layer
    in them; the layers' own tensors hold only the host tier between decode steps.
    """

    rid: str
    config: HybridKVConfig
    prompt_len: int
    media_tokens: int = 0  # image/video positions (0 for text-only requests)
    layers: dict[int, CompressedLayer] = field(default_factory=dict)
    slots: torch.Tensor | None = None
    rows: dict[int, LayerRows] = field(default_factory=dict)
    nbytes: KVBytes = field(default_factory=KVBytes)  # device = the pool slots held; set at compaction
    shared_prefix: bool = False  # radix cache on: the uncompressed prompt stays in the tree, unlocked after prefill

    def stats(self) -> dict:
        b = self.nbytes
        n_static = sum(int(l.plan.static.sum()) for l in self.layers.values())
        n_heads = sum(l.plan.static.numel() for l in self.layers.values())
        return {"policy": self.config.policy, "budget": self.config.budget, "prompt_tokens": self.prompt_len,
                "media_tokens": self.media_tokens, "compressed": self.slots is not None, "kv_slots_device": 0 if self.slots is None else int(self.slots.numel()),
                "kv_bytes_full": b.full, "kv_bytes_device": b.device_total, "kv_bytes_host": b.host,
                "kv_bytes_metadata": b.metadata, "static_heads": n_static, "dynamic_heads": n_heads - n_static}


class CompressedStore:
    """Compressed KV of all running requests of one scheduler process."""

    def __init__(self) -> None:
        self.free_slots: Callable[[torch.Tensor], None] | None = None  # SGLang's allocator, bound by the backend
        self.tree_cache = None  # SGLang's prefix cache, bound by the scheduler hooks (evicted for room)
        self.freed_by_compaction = False  # set when compaction gave slots back; reopens admission
        self.by_row: dict[int, RequestKV] = {}
        self.stats_by_rid: dict[str, dict] = {}
        self.pending: dict[int, dict] = {}  # row -> request info of the extend batch being prepared
        self.compacted = 0
        self.released = 0
        self.slots_held = 0
        self.host_bytes = 0
        self.host_bytes_peak = 0
        self._lock = threading.Lock()

    def add(self, row: int, req: RequestKV) -> None:
        with self._lock:
            if row in self.by_row:
                raise RuntimeError(f"row {row} already holds compressed KV of request {self.by_row[row].rid}")
            self.by_row[row] = req
            self.compacted += 1
            self.slots_held += 0 if req.slots is None else int(req.slots.numel())
            self.host_bytes += req.nbytes.host
            self.host_bytes_peak = max(self.host_bytes_peak, self.host_bytes)

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
                req = self.by_row.pop(int(row), None)
                if req is not None:
                    self._drop(req)
                    if req.slots is not None and req.slots.numel():
                        self.free_slots(req.slots)

    def release_all(self) -> None:
        """After SGLang cleared its pools (cache flush): the allocator was reset, so no slot is freed here."""
        with self._lock:
            for req in self.by_row.values():
                self._drop(req)
            self.by_row.clear()
            self.pending.clear()

    def _drop(self, req: RequestKV) -> None:
        self.released += 1
        self.slots_held -= 0 if req.slots is None else int(req.slots.numel())
        self.host_bytes -= req.nbytes.host

    @property
    def live(self) -> int:
        return len(self.by_row)

    def resident(self) -> KVBytes:
        total = KVBytes()
        for req in list(self.by_row.values()):
            total = total + req.nbytes
        return total


STORE = CompressedStore()
