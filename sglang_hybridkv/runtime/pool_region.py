"""The compressed region inside SGLang's own KV pool.

Each request's compressed prompt KV lives in pool slots that SGLang's allocator handed out, so the scheduler's
admission, retraction and idle leak check all see it, and memory freed by compaction is really free.

One slot of SGLang's MHA pool holds, in every layer, one token's K and V for all ``H`` KV heads: ``H`` rows of
``D`` in the layer's key buffer and ``H`` in its value buffer. The ``S`` slots of a request are used as
``S * H`` rows per layer, packed per layer in this order:

- each head's kept prompt tokens (K rows in the key buffer, V rows in the value buffer);
- each dynamic head's chunk summaries (min keys in the key buffer, max keys in the value buffer: one row per
  chunk);
- each dynamic head's retrieval buffer, ``min(top_k * chunk, n_host)`` rows, reserved so that the device
  figure is what a GPU needs (there, retrieved chunks are copied into it); the CPU decode reads them from the
  host tier directly.

``S = max over layers of ceil(rows / H)``; rows a layer does not use are the packing waste, counted in the
device bytes every report gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.cache import CompressedLayer


@dataclass
class LayerRows:
    """Where one layer's compressed KV lives in the pool's flattened ``(slots * H, D)`` buffers.

    Attributes:
        dev: ``(H, P)`` rows of each head's kept tokens (entries past ``dev_len`` repeat a valid row; masked).
        summaries: ``(H_d, C)`` rows of the dynamic heads' chunk summaries.
    """

    dev: torch.Tensor
    summaries: torch.Tensor


def rows_needed(layer: CompressedLayer) -> int:
    """Pool rows (one head, one token) that ``layer`` occupies: kept tokens, summaries, retrieval buffers."""
    n_dyn, n_chunks = layer.kmin.shape[0], layer.kmin.shape[1]
    buffer = min(layer.retrieved * layer.chunk_size, layer.k_host.shape[1])
    return int(layer.dev_len.sum()) + n_dyn * (n_chunks + buffer)


def slots_needed(layers: dict[int, CompressedLayer]) -> int:
    if not layers:
        return 0
    h = next(iter(layers.values())).num_heads
    return max(math.ceil(rows_needed(cl) / h) for cl in layers.values())


def place(layer: CompressedLayer, slots: torch.Tensor) -> LayerRows:
    """Assign ``layer``'s tensors to rows of ``slots`` (in the layout of the module docstring)."""
    h = layer.num_heads
    rows = (slots.long()[:, None] * h + torch.arange(h, device=slots.device)).flatten()
    if rows_needed(layer) > rows.numel():
        raise ValueError(f"layer needs {rows_needed(layer)} pool rows but {slots.numel()} slots give {rows.numel()}")
    dev_len = layer.dev_len.to(rows.device)
    starts = torch.cumsum(dev_len, 0) - dev_len
    p = layer.k_dev.shape[1]
    offs = torch.minimum(torch.arange(p, device=rows.device)[None], (dev_len - 1).clamp(min=0)[:, None])
    dev = rows[(starts[:, None] + offs).clamp(max=rows.numel() - 1)] if rows.numel() else \
        torch.zeros(h, p, dtype=torch.long, device=rows.device)
    n_dyn, c = layer.kmin.shape[0], layer.kmin.shape[1]
    first = int(dev_len.sum())
    summaries = rows[first: first + n_dyn * c].view(n_dyn, c)
    return LayerRows(dev, summaries)


def write(k_buffer: torch.Tensor, v_buffer: torch.Tensor, layer: CompressedLayer, where: LayerRows) -> None:
    """Copy ``layer``'s kept KV and summaries into the pool (``k_buffer``/``v_buffer``: ``(slots, H, D)``)."""
    d = layer.head_dim
    k_flat, v_flat = k_buffer.view(-1, d), v_buffer.view(-1, d)
    valid = torch.arange(layer.k_dev.shape[1], device=layer.k_dev.device)[None] < layer.dev_len[:, None]
    idx = where.dev[valid]
    k_flat[idx] = layer.k_dev[valid].to(k_flat.dtype)
    v_flat[idx] = layer.v_dev[valid].to(v_flat.dtype)
    if where.summaries.numel():
        k_flat[where.summaries.flatten()] = layer.kmin.reshape(-1, d).to(k_flat.dtype)
        v_flat[where.summaries.flatten()] = layer.kmax.reshape(-1, d).to(v_flat.dtype)


def load(k_buffer: torch.Tensor, v_buffer: torch.Tensor, layer: CompressedLayer, where: LayerRows) -> None:
    """Point ``layer``'s device tensors at copies read from the pool (for one decode step)."""
    d = k_buffer.shape[-1]
    k_flat, v_flat = k_buffer.view(-1, d), v_buffer.view(-1, d)
    layer.k_dev, layer.v_dev = k_flat[where.dev], v_flat[where.dev]
    layer.kmin, layer.kmax = k_flat[where.summaries], v_flat[where.summaries]


def unload(layer: CompressedLayer) -> None:
    """Drop ``layer``'s device copies; the pool holds the data (empty tensors keep ``H`` and ``D``)."""
    h, d = layer.num_heads, layer.head_dim
    layer.k_dev = layer.v_dev = layer.k_dev.new_empty(h, 0, d)
    layer.kmin = layer.kmax = layer.k_dev.new_empty(layer.dyn_heads.numel(), 0, d)
