"""The compressed regions of all running requests of one scheduler process, owned by the attention backend.

A :class:`Region` is what one compacted request holds: pool slots (its device tier, see ``pool_region``),
host-tier pages, and the decode tables. :class:`Regions` keys them by the request's row in SGLang's
``ReqToTokenPool`` and is attached to that pool through SGLang's aux-cache protocol
(``ReqToTokenPool.attach_aux_cache``), so SGLang itself calls :meth:`Regions.free` whenever it frees a row
(finish, abort, retraction, beam members) and :meth:`Regions.clear` when it flushes its pools: every slot and
page is released exactly once, by the code path that releases the row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .host_tier import HostTier
from .pool_region import RegionTables

logger = logging.getLogger("sglang_hybridkv")


@dataclass
class Region:
    """One compacted request.

    Attributes:
        rid: request id. prompt_len: prompt tokens covered by the region (decode reads later tokens from the
            request's row as usual). Decode step ``s`` is the one with ``seq_len == prompt_len + 1 + s``
            (retrieval intervals count from it). decode_start: sequence length at compaction (more than
            ``prompt_len`` after a retraction); the first step that reads the region refills its buffers.
        slots: pool slots held (device tier). pages: host-tier pages held.
        staging_freed: prompt slots compaction gave back to the pool while SGLang still counts them as the
            request's (radix cache off); the busy-time memory check subtracts them.
        tables: decode tables (``pool_region.RegionTables``).
        host_bytes: bytes of the host tier held.
    """

    rid: str
    prompt_len: int
    decode_start: int
    retrieval_interval: int
    slots: torch.Tensor
    pages: torch.Tensor
    staging_freed: int
    tables: RegionTables
    host_bytes: int


class Regions:
    """Live regions by request row, with counters that prove nothing leaks (``/server_info``)."""

    def __init__(self, free_slots: Callable[[torch.Tensor], None], host: HostTier, capacity: int) -> None:
        self._free_slots = free_slots
        self.host = host
        self.dense_capacity = capacity  # aux-cache protocol: compression does not change SGLang's token capacity
        self.by_row: dict[int, Region] = {}
        self.compacted = 0
        self.released = 0
        self.slots_held = 0
        self.staging_freed = 0
        self.host_bytes = 0
        self.host_bytes_peak = 0
        self.version = 0  # bumped on every change, so per-batch decode tables know when to rebuild
        self.admission_seen = 0  # ``compacted`` when the scheduler last reopened admission

    def add(self, row: int, region: Region) -> None:
        if row in self.by_row:
            raise RuntimeError(f"row {row} already holds the compressed region of request {self.by_row[row].rid}")
        self.by_row[row] = region
        self.compacted += 1
        self.slots_held += int(region.slots.numel())
        self.staging_freed += region.staging_freed
        self.host_bytes += region.host_bytes
        self.host_bytes_peak = max(self.host_bytes_peak, self.host_bytes)
        self.version += 1

    def get(self, row: int) -> Region | None:
        return self.by_row.get(row)

    # ---- SGLang's aux-cache protocol (ReqToTokenPool) ------------------------------------------------
    def free(self, row: int) -> None:
        region = self.by_row.pop(int(row), None)
        if region is None:
            return
        self._drop(region)
        if region.slots.numel():
            self._free_slots(region.slots)
        if region.pages.numel():
            self.host.free(region.pages)

    def clear(self) -> None:
        """SGLang flushed its pools (the allocator was reset), so no slot is freed here; pages are."""
        for region in self.by_row.values():
            self._drop(region)
        self.by_row.clear()
        self.host.clear()

    def reset_allocator(self) -> None:
        self.clear()

    def alloc_to_lengths(self, **_) -> None:
        """Regions never grow during decode (generated tokens take ordinary slots)."""

    def _drop(self, region: Region) -> None:
        self.released += 1
        self.slots_held -= int(region.slots.numel())
        self.staging_freed -= region.staging_freed
        self.host_bytes -= region.host_bytes
        self.version += 1

    @property
    def live(self) -> int:
        return len(self.by_row)

    def busy_adjustment(self) -> int:
        """Slots that SGLang's busy-time check must add to what it counts for running requests."""
        return self.slots_held - self.staging_freed
