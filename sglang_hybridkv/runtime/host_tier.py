"""The host tier: dynamic heads' full media KV, in pages of one chunk of one KV head, per layer.

Page ``p`` of layer ``l`` holds ``chunk`` consecutive media tokens of one dynamic head (K in ``k[l][p]``, V in
``v[l][p]``); a request takes the same page ids in every layer (``pool_region.host_pages_needed``). One flat
tensor per layer lets a decode step fetch the selected chunks of every request of the batch with one gather.

The tier lives in host RAM. On a GPU server it is pinned, and each decode step's selected chunks are read in
place by one kernel (``kernels/row_copy.py``, unified virtual addressing: no host sync, CUDA-graph capturable),
so dynamic heads hold only their text, window and retrieval buffer in device memory. Where the device cannot
read pinned pages (the start-up probe fails), the tier is allocated on the device instead, with a warning, and
its bytes are reported as device bytes (``on_device``), never hidden.

Capacity grows on demand (doubling); pages are freed exactly once when the owning request's row is freed.
"""

from __future__ import annotations

import logging

import torch

from ..kernels.row_copy import pinned_reads_supported

logger = logging.getLogger(__name__)


class HostTier:
    """Paged store of dynamic heads' media KV. See the module docstring."""

    def __init__(self, num_layers: int, page: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", initial_pages: int = 256) -> None:
        """``device``: where decode runs (the pool's device); the pages' own location follows from it."""
        self.num_layers, self.page, self.head_dim, self.dtype = num_layers, page, head_dim, dtype
        compute = torch.device(device)
        self.pinned = compute.type == "cuda" and pinned_reads_supported(compute)
        self.on_device = compute.type != "cpu" and not self.pinned
        if self.on_device:
            logger.warning("hybridkv: %s cannot read pinned host memory; the host tier is allocated on the device "
                           "and counted as device KV", compute)
        self.device = compute if self.on_device else torch.device("cpu")
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._free = torch.empty(0, dtype=torch.long)
        self.capacity = 0
        self._grow(initial_pages)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in all layers (K and V)."""
        return 2 * self.num_layers * self.page * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def used_pages(self) -> int:
        return self.capacity - self._free.numel()

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

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` page ids (grows the tier when it is full)."""
        if n > self._free.numel():
            self._grow(max(n - self._free.numel(), self.capacity))
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
