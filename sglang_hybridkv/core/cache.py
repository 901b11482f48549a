"""The compressed KV of one layer of one request: device tier, host tier, chunk metadata, generated tokens.

Built from a :class:`LayerPlan` and the layer's full prompt KV at the end of prefill (compaction). The full
prompt KV is not referenced afterwards, so its memory is really released. Byte counts are what is resident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunks import chunk_summaries
from .device_copy import to_device
from .plan import LayerPlan, device_rows


@dataclass
class KVBytes:
    """Resident KV bytes of a request (or layer), per tier.

    ``device`` counts KV payload and the retrieval buffer; ``metadata`` (chunk summaries and page tables,
    also on the device) is separate so both can be reported; ``full`` is what the uncompressed cache holds.
    """

    full: int = 0
    device: int = 0
    host: int = 0
    metadata: int = 0

    def __add__(self, other: "KVBytes") -> "KVBytes":
        return KVBytes(self.full + other.full, self.device + other.device, self.host + other.host,
                       self.metadata + other.metadata)

    @property
    def device_total(self) -> int:
        return self.device + self.metadata

    @property
    def ratio(self) -> float:
        """Full bytes / device bytes (metadata included)."""
        return self.full / max(1, self.device_total)


class CompressedLayer:
    """Compacted KV of one layer.

    Shapes: ``H`` KV heads, ``D`` head dim, ``P`` longest device prompt, ``H_d`` dynamic heads, ``n`` host
    tokens per dynamic head, ``C = ceil(n / chunk)``, ``G`` generated tokens so far.
    Attributes:
        k_dev, v_dev: ``(H, P, D)`` kept prompt KV per head, valid up to ``dev_len``.
        dyn_heads: ``(H_d,)`` indices of dynamic heads.
        k_host, v_host: ``(H_d, n, D)`` the dynamic heads' media KV (host tier).
        kmin, kmax: ``(H_d, C, D)`` chunk summaries (device).
        k_gen, v_gen: ``(H, G, D)`` decoded tokens, kept for every head.
    """

    def __init__(self, plan: LayerPlan, keys: torch.Tensor, values: torch.Tensor,
                 host_device: torch.device | str = "cpu") -> None:
        h, seq_len, d = keys.shape
        self.seq_len = seq_len
        self.plan = plan
        idx = plan.keep_idx.to(keys.device)[..., None].expand(-1, -1, d)
        self.k_dev = keys.gather(1, idx)
        self.v_dev = values.gather(1, idx)
        self.dev_len = to_device(plan.keep_len, keys.device)
        self.dyn_heads = to_device((~plan.static).nonzero().flatten(), keys.device)
        self.top_k = plan.top_k
        self.chunk_size = plan.chunk_size
        host_idx = to_device(plan.host_idx, keys.device)
        if self.dyn_heads.numel() and host_idx.numel():
            self.k_host = keys[self.dyn_heads][:, host_idx].to(host_device)
            self.v_host = values[self.dyn_heads][:, host_idx].to(host_device)
            self.kmin, self.kmax = chunk_summaries(keys[self.dyn_heads][:, host_idx], self.chunk_size)
        else:
            self.k_host = self.v_host = keys.new_empty(self.dyn_heads.numel(), 0, d)
            self.kmin = self.kmax = keys.new_empty(self.dyn_heads.numel(), 0, d)
        self.k_gen = keys.new_empty(h, 0, d)
        self.v_gen = values.new_empty(h, 0, d)
        self.steps = 0
        self.selection: torch.Tensor | None = None  # (H_d, k) chunk ids of the last retrieval

    @property
    def num_heads(self) -> int:
        return self.k_dev.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k_dev.shape[2]

    @property
    def retrieved(self) -> int:
        """Chunks a dynamic head holds in its device buffer."""
        return min(self.top_k, math.ceil(self.k_host.shape[1] / self.chunk_size))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add ``T`` decoded tokens: ``k_new``/``v_new`` are ``(T, H, D)``."""
        self.k_gen = torch.cat([self.k_gen, k_new.transpose(0, 1).to(self.k_gen.dtype)], dim=1)
        self.v_gen = torch.cat([self.v_gen, v_new.transpose(0, 1).to(self.v_gen.dtype)], dim=1)

    def nbytes(self) -> KVBytes:
        """Resident bytes of this layer per tier (see :class:`KVBytes`); rows as :func:`core.plan.device_rows`."""
        tok = 2 * self.head_dim * self.k_dev.element_size()  # one row: one token's K and V of one head
        h, g = self.num_heads, self.k_gen.shape[1]
        n_dyn, n_host = self.dyn_heads.numel(), self.k_host.shape[1]
        summary_rows = n_dyn * math.ceil(n_host / self.chunk_size)
        pages = sum(math.ceil(int(n) / self.chunk_size) for n in self.plan.keep_len) + n_dyn * self.retrieved
        return KVBytes(
            full=h * (self.seq_len + g) * tok,
            device=(device_rows(self.plan, g) - summary_rows) * tok,
            host=n_dyn * n_host * tok,
            metadata=summary_rows * tok + 4 * pages,
        )
