"""Layout of a request's compressed region inside SGLang's own KV pool, and its decode tables.

One slot of SGLang's MHA pool holds, in every layer, one token's K and V for all ``H`` KV heads. Viewed as
rows (``(slots * H, D)``, row ``slot * H + h``), the ``S`` slots of a request give ``S * H`` rows per layer,
packed per layer in this order:

- each head's kept prompt tokens (K rows in the key buffer, V rows in the value buffer);
- each dynamic head's chunk summaries (min key in the key buffer, max key in the value buffer: one row per
  chunk);
- each dynamic head's retrieval buffer, ``min(top_k * chunk, n_host)`` rows: every decode step copies into it
  the chunks selected for the current query that it does not hold yet, from the host tier.

``S = max over layers of ceil(rows / H)``; rows a layer does not use are packing waste, counted in the device
bytes every report gives. :func:`layout` returns the tables the batched decode path reads (all ``(L, H, ·)``,
padded per request), so decode never touches per-layer Python objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.cache import CompressedLayer
from ..core.device_copy import to_device
from ..core.plan import device_rows


@dataclass
class RegionTables:
    """Where a compressed request's rows live, per layer ``L`` and KV head ``H`` (row ids of the pool view).

    Attributes:
        kept_rows: ``(L, H, P)`` rows of each head's kept prompt tokens, valid up to ``kept_len``.
        kept_len: ``(L, H)``.
        sum_rows: ``(L, H, C)`` summary rows of each dynamic head's chunks, valid up to ``n_chunks``.
        n_chunks: ``(L, H)`` (0 for static heads).
        host_pages: ``(L, H, C)`` host-tier page of each chunk.
        n_host: ``(L, H)`` tokens a dynamic head keeps in the host tier.
        buf_rows: ``(L, H, R)`` retrieval-buffer rows, valid up to ``buf_len``.
        buf_len: ``(L, H)``.
        top_k: ``(L, H)`` chunks retrieved per step.
    """

    kept_rows: torch.Tensor
    kept_len: torch.Tensor
    sum_rows: torch.Tensor
    n_chunks: torch.Tensor
    host_pages: torch.Tensor
    n_host: torch.Tensor
    buf_rows: torch.Tensor
    buf_len: torch.Tensor
    top_k: torch.Tensor


def rows_needed(layer: CompressedLayer) -> int:
    """Pool rows (one head, one token) that ``layer`` occupies: the budget's own count (``core.plan.device_rows``)."""
    return device_rows(layer.plan)


def slots_needed(layers: dict[int, CompressedLayer]) -> int:
    if not layers:
        return 0
    h = next(iter(layers.values())).num_heads
    return max(math.ceil(rows_needed(cl) / h) for cl in layers.values())


def host_pages_needed(layers: dict[int, CompressedLayer]) -> int:
    """Host-tier pages (one chunk of one head) the request needs; every layer uses the same page ids."""
    return max((cl.kmin.shape[0] * cl.kmin.shape[1] for cl in layers.values()), default=0)


def _dynamic_heads(layer: CompressedLayer) -> torch.Tensor:
    """``(H_d,)`` long on the host: the layer's dynamic heads, from its plan (``layer.dyn_heads`` is on the device)."""
    return (~layer.plan.static).nonzero().flatten()


def _buffer_len(layer: CompressedLayer) -> int:
    return min(layer.retrieved * layer.chunk_size, layer.k_host.shape[1])


def layout(layers: dict[int, CompressedLayer], slots: torch.Tensor, pages: torch.Tensor) -> RegionTables:
    """Assign every layer's kept KV, summaries and buffers to rows of ``slots``; dynamic heads' chunks to
    host ``pages`` (``layers`` must cover layers ``0..L-1``)."""
    num_layers = len(layers)
    first = layers[0]
    h = first.num_heads
    # Host arithmetic on the plans' host-side lengths and head types; the slots and pages are read once.
    rows = (slots.cpu().long()[:, None] * h + torch.arange(h)).flatten()
    pages = pages.cpu().long()
    p = max(int(cl.plan.keep_len.max()) if h else 0 for cl in layers.values())
    c = max(cl.kmin.shape[1] for cl in layers.values())
    r = max(_buffer_len(cl) for cl in layers.values())
    z = lambda *shape: torch.zeros(*shape, dtype=torch.long)
    t = RegionTables(z(num_layers, h, p), z(num_layers, h), z(num_layers, h, c), z(num_layers, h),
                     z(num_layers, h, c), z(num_layers, h), z(num_layers, h, r), z(num_layers, h), z(num_layers, h))
    for l in range(num_layers):
        cl = layers[l]
        if rows_needed(cl) > rows.numel():
            raise ValueError(f"layer {l} needs {rows_needed(cl)} pool rows but {slots.numel()} slots give {rows.numel()}")
        dev_len = cl.plan.keep_len.long()
        starts = torch.cumsum(dev_len, 0) - dev_len
        offs = torch.arange(p)[None]
        kept = (starts[:, None] + offs).clamp(max=max(rows.numel() - 1, 0))
        t.kept_rows[l] = torch.where(offs < dev_len[:, None], rows[kept] if rows.numel() else 0, 0)
        t.kept_len[l] = dev_len
        dyn = _dynamic_heads(cl)
        n_dyn, n_c = cl.kmin.shape[0], cl.kmin.shape[1]
        if n_dyn == 0 or n_c == 0:
            continue
        base = int(dev_len.sum())
        summaries = rows[base: base + n_dyn * n_c].view(n_dyn, n_c)
        b = _buffer_len(cl)
        buffers = rows[base + n_dyn * n_c: base + n_dyn * (n_c + b)].view(n_dyn, b)
        t.sum_rows[l, dyn, :n_c] = summaries
        t.n_chunks[l, dyn] = n_c
        t.host_pages[l, dyn, :n_c] = pages[: n_dyn * n_c].view(n_dyn, n_c)
        t.n_host[l, dyn] = cl.k_host.shape[1]
        t.buf_rows[l, dyn, :b] = buffers
        t.buf_len[l, dyn] = b
        t.top_k[l, dyn] = cl.retrieved
    return t


def write(k_buffer: torch.Tensor, v_buffer: torch.Tensor, layer: CompressedLayer, tables: RegionTables,
          layer_id: int) -> None:
    """Copy ``layer``'s kept KV and chunk summaries into the pool (``k_buffer``/``v_buffer``: ``(slots, H, D)``)."""
    d = layer.head_dim
    k_flat, v_flat = k_buffer.view(-1, d), v_buffer.view(-1, d)
    dev = k_flat.device
    # Which (head, position) entries are kept, from the plan's host lengths: indices go to the device, no mask
    # (a boolean-mask index on a device tensor reads its size back to the host).
    valid = torch.arange(layer.k_dev.shape[1])[None] < layer.plan.keep_len[:, None]
    idx = to_device(tables.kept_rows[layer_id, :, : layer.k_dev.shape[1]][valid], dev)
    head, pos = (to_device(i, layer.k_dev.device) for i in valid.nonzero(as_tuple=True))
    k_flat[idx] = layer.k_dev[head, pos].to(k_flat.dtype)
    v_flat[idx] = layer.v_dev[head, pos].to(v_flat.dtype)
    n_dyn, n_c = layer.kmin.shape[0], layer.kmin.shape[1]
    if n_dyn and n_c:
        rows = to_device(tables.sum_rows[layer_id, _dynamic_heads(layer), :n_c].flatten(), dev)
        k_flat[rows] = layer.kmin.reshape(-1, d).to(k_flat.dtype)
        v_flat[rows] = layer.kmax.reshape(-1, d).to(v_flat.dtype)
