"""The host tier: dynamic heads' full media KV, in pages of one chunk of one KV head, per layer.

Page ``p`` of layer ``l`` holds ``chunk`` consecutive media tokens of one dynamic head (K in ``k[l][p]``, V in
``v[l][p]``); a request takes the same page ids in every layer (``pool_region.host_pages_needed``). One flat
tensor per layer lets a decode step fetch the selected chunks of every request of the batch with one gather.

On a CPU server the tier is ordinary RAM. On a GPU server it is allocated on the device (selected chunks are
then copied device-to-device into the retrieval buffers, which a CUDA graph can capture); its bytes are then
reported as device bytes, never hidden.

Capacity grows on demand (doubling); pages are freed exactly once when the owning request's row is freed.
"""

from __future__ import annotations

import torch


class HostTier:
    """Paged store of dynamic heads' media KV. See the module docstring."""

    def __init__(self, num_layers: int, page: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", initial_pages: int = 256) -> None:
        self.num_layers, self.page, self.head_dim, self.dtype = num_layers, page, head_dim, dtype
        self.device = torch.device(device)
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
        shape = (pages, self.page, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if self.capacity:
            new_k = [torch.cat([a, b]) for a, b in zip(self.k, new_k)]
            new_v = [torch.cat([a, b]) for a, b in zip(self.v, new_v)]
        self.k, self.v = new_k, new_v
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
