"""A short digest of what a request keeps, so that two runs (chunked vs whole prefill, HF vs server, before
and after retraction) can be compared by one string."""

from __future__ import annotations

import hashlib

import torch

from .plan import LayerPlan


def kept_digest(plans: dict[int, LayerPlan]) -> str:
    """Hex digest over every layer's head types, each head's kept prompt positions, the host-tier positions
    of dynamic heads and their per-step chunk count (16 hex digits)."""
    h = hashlib.sha1()
    for layer in sorted(plans):
        p = plans[layer]
        h.update(f"L{layer}:k{p.top_k}:c{p.chunk_size}:".encode())
        h.update(p.static.to(torch.int8).cpu().numpy().tobytes())
        for head in range(p.keep_idx.shape[0]):
            h.update(p.keep_idx[head, : int(p.keep_len[head])].to(torch.int64).cpu().numpy().tobytes())
            h.update(b"|")
        h.update(p.host_idx.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
