"""The host tier: dynamic heads' full media KV, in pages of one chunk of one KV head, per layer, within a limit.

Page ``p`` of layer ``l`` holds ``chunk`` consecutive media tokens of one dynamic head (K in ``k[l][p]``, V in
``v[l][p]``); a request takes the same page ids in every layer (``pool_region.host_pages_needed``). One flat
tensor per layer lets a decode step fetch the selected chunks of every request of the batch with one gather.

The tier lives in host RAM. On a GPU server it is pinned, and each decode step's selected chunks are read in
place by one kernel (``kernels/row_copy.py``, unified virtual addressing: no host sync, CUDA-graph capturable),
so dynamic heads hold only their text, window and retrieval buffer in device memory. Where the device cannot
read pinned pages (the start-up probe fails), the tier is allocated on the device instead, with a warning, and
its bytes are reported as device bytes (``on_device``), never hidden.

Size: the tier never holds more than ``--hybridkv-host-tier-gb`` (default: a quarter of the machine's memory,
:func:`limit_bytes`). :meth:`HostTier.alloc` refuses what does not fit (compaction then plans the request with
every head static, ``runtime/compaction.py``). On a CPU server the tier is reserved at its limit once, at
start-up, as anonymous private memory: the OS commits a page only when it is first written, so resident memory
follows the pages used and no prefill ever grows or copies the tier. Pinned (or on-device) memory is committed
when allocated, so there the tier starts small and doubles on demand, up to the limit. Pages are freed exactly
once, when the owning request's row is freed.
"""

from __future__ import annotations

import logging
import mmap
import os

import torch

from ..config import ConfigError, HybridKVConfig
from ..kernels.row_copy import pinned_reads_supported
from .requests import active_config

logger = logging.getLogger(__name__)

DEFAULT_SHARE = 4  # the default limit is 1/DEFAULT_SHARE of the machine's memory
GB = 10**9


def machine_memory_bytes() -> int:
    """Memory this process may use: physical memory, or the container's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def limit_bytes(config: HybridKVConfig | None) -> int:
    """The tier's limit for ``config`` (``host_tier_gb``; None or no config: the default share of the machine's
    memory). A limit above the machine's memory is a :class:`ConfigError` naming the knob."""
    machine = machine_memory_bytes()
    gb = None if config is None else config.host_tier_gb
    if gb is None:
        return machine // DEFAULT_SHARE
    if gb * GB > machine:
        raise ConfigError(f"host_tier_gb={gb!r} is more than this machine's memory: allowed (0, {machine / GB:.1f}] "
                          f"GB (default: a quarter, {machine / DEFAULT_SHARE / GB:.1f} GB)")
    return int(gb * GB)


class HostTier:
    """Paged store of dynamic heads' media KV, never above its limit. See the module docstring."""

    def __init__(self, num_layers: int, page: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", limit: int | None = None, initial_pages: int = 256) -> None:
        """``device``: where decode runs (the pool's device); the pages' own location follows from it.
        ``limit``: bytes the pages may take in all; None: the server's ``--hybridkv-host-tier-gb`` (from the
        config in the environment), or the default share of the machine's memory."""
        self.num_layers, self.page, self.head_dim, self.dtype = num_layers, page, head_dim, dtype
        compute = torch.device(device)
        self.pinned = compute.type == "cuda" and pinned_reads_supported(compute)
        self.on_device = compute.type != "cpu" and not self.pinned
        if self.on_device:
            logger.warning("hybridkv: %s cannot read pinned host memory; the host tier is allocated on the device "
                           "and counted as device KV", compute)
        self.device = compute if self.on_device else torch.device("cpu")
        self.limit = limit_bytes(active_config()) if limit is None else int(limit)
        self.max_pages = self.limit // self.page_bytes
        self.refused = 0  # requests refused pages because the limit was reached
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._free = torch.empty(0, dtype=torch.long)
        self.capacity = 0
        if self.device.type == "cpu" and not self.pinned:
            self._reserve()
        else:
            self._grow(min(initial_pages, self.max_pages))

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in all layers (K and V)."""
        return 2 * self.num_layers * self.page * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def used_pages(self) -> int:
        return self.capacity - self._free.numel()

    @property
    def available_pages(self) -> int:
        """Pages an allocation may still take: free ones and those the tier may still grow by."""
        return self._free.numel() + self.max_pages - self.capacity

    def _reserve(self) -> None:
        """The whole limit at once, as anonymous private memory: zero-filled, committed page by page on first
        write (so resident memory follows use)."""
        n = self.max_pages
        if n == 0:
            return
        buf = mmap.mmap(-1, n * self.page_bytes, flags=mmap.MAP_PRIVATE)
        flat = torch.frombuffer(buf, dtype=self.dtype)  # holds ``buf`` alive
        kv = flat.view(2, self.num_layers, n, self.page, self.head_dim)
        self.k, self.v = list(kv[0]), list(kv[1])
        self._free = torch.arange(n)
        self.capacity = n

    def _grow(self, pages: int) -> None:
        shape = (self.capacity + pages, self.page, self.head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.dtype, device=self.device, pin_memory=self.pinned)
            if old is not None:
                new[: self.capacity].copy_(old)
            return new

        self.k = [grown(self.k[l] if self.capacity else None) for l in range(self.num_layers)]
        self.v = [grown(self.v[l] if self.capacity else None) for l in range(self.num_layers)]
        self._free = torch.cat([self._free, torch.arange(self.capacity, self.capacity + pages)])
        self.capacity += pages

    def fits(self, n: int) -> bool:
        """Whether ``n`` more pages stay within the limit (a refusal is counted)."""
        if n <= self.available_pages:
            return True
        self.refused += 1
        return False

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` page ids, or None when they would take the tier over its limit (grows the tier, up to the
        limit, when it is full)."""
        if not self.fits(n):
            return None
        if n > self._free.numel():
            short = n - self._free.numel()
            self._grow(min(max(short, self.capacity), self.max_pages - self.capacity))
        pages, self._free = self._free[:n], self._free[n:]
        return pages

    def free(self, pages: torch.Tensor) -> None:
        self._free = torch.cat([self._free, pages.cpu().long()])

    def clear(self) -> None:
        self._free = torch.arange(self.capacity)

    def write(self, layer_id: int, pages: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``(H_d, n, D)`` media KV of ``layer_id``'s dynamic heads: head ``j``'s chunk ``c`` goes to page
        ``pages[j * C + c]`` with ``C = ceil(n / page)`` (the last page is zero-padded)."""
        h_d, n, d = keys.shape
        c = -(-n // self.page)
        pad = c * self.page - n
        dst = pages[: h_d * c].to(self.device)
        for store, src in ((self.k[layer_id], keys), (self.v[layer_id], values)):
            padded = torch.nn.functional.pad(src.to(self.device, self.dtype), (0, 0, 0, pad))
            store[dst] = padded.reshape(h_d * c, self.page, d)
