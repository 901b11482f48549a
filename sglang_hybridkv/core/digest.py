"""A short digest of what a request keeps, so that two runs (chunked vs whole prefill, HF vs server, before
and after retraction, one rank vs tensor parallelism) can be compared by one string.

The digest is built per (layer, KV head) and then combined in (layer, head) order, so that ranks that each
hold a slice of the heads give the one-rank digest: each hashes its own heads, the per-head hashes are
gathered (``core/shard.py``), and every rank combines the same all-heads table.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from .plan import LayerPlan


def head_digests(plans: dict[int, LayerPlan]) -> torch.Tensor:
    """``(H, num_layers)`` int64: per KV head and layer (sorted), a hash of the layer's retrieval width and
    chunk size, the head's type and kept prompt positions and, for a dynamic head, its host-tier positions.

    The kept positions of every layer come to the host in one read (they live on the KV's device)."""
    layers = sorted(plans)
    h = plans[layers[0]].static.numel() if layers else 0
    out = torch.zeros(h, len(layers), dtype=torch.int64)
    if not layers:
        return out
    kept = [plans[layer].keep_idx.to(torch.int64) for layer in layers]
    kept = torch.cat([k.flatten() for k in kept]).cpu().split([k.numel() for k in kept])
    for j, layer in enumerate(layers):
        p = plans[layer]
        host = p.host_idx.to(torch.int64).numpy().tobytes()
        keep_idx = kept[j].view(h, -1)
        for head in range(h):
            dig = hashlib.sha1(f"L{layer}:k{p.top_k}:c{p.chunk_size}:".encode())
            static = bool(p.static[head])
            dig.update(b"s" if static else b"d")
            dig.update(keep_idx[head, : int(p.keep_len[head])].numpy().tobytes())
            if not static:
                dig.update(b"|" + host)
            out[head, j] = int(np.frombuffer(dig.digest()[:8], dtype=np.int64)[0])
    return out


def combine_digests(heads: torch.Tensor) -> str:
    """16 hex digits over an all-heads ``(H, num_layers)`` table from :func:`head_digests`."""
    return hashlib.sha1(heads.t().contiguous().numpy().tobytes()).hexdigest()[:16]


def kept_digest(plans: dict[int, LayerPlan], gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """Digest of every layer's head types, each head's kept prompt positions, dynamic heads' host-tier
    positions and per-step chunk count (16 hex digits).

    Args:
        plans: layer index -> plan, for this rank's heads.
        gather: under tensor parallelism, ``HeadShard.gather`` (all ranks' heads in rank order), so that every
            rank returns the one-rank digest; None on one rank.
    """
    heads = head_digests(plans)
    return combine_digests(heads if gather is None else gather(heads))
