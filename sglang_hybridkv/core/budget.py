"""Stage 2: top-down budget allocation, layer budget -> head type -> single heads.

The unit is media tokens per KV head on the device. A layer's budget is ``budget * n_media * num_kv_heads``.
It is split between head types by ``static_ratio`` (default: by head count). Static heads share theirs in
proportion to what they need (their θ-mass token count), capped at ``n_media``; dynamic heads get equal
shares rounded down to whole chunks (at least one chunk), which become their per-step top-k. Chunk
summaries are metadata outside the token budget (charging them would leave a 10 % dynamic head one chunk,
which measurably loses needles); every memory figure still counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class HeadBudget:
    """Per-KV-head budget of one layer.

    Attributes:
        static: ``(num_kv_heads,)`` bool.
        tokens: ``(num_kv_heads,)`` long; static heads: media tokens kept; dynamic heads: ``top_k * chunk``
            (the device retrieval buffer), capped at ``n_media``.
        top_k: chunks each dynamic head retrieves per step (0 when the layer has no dynamic head).
    """

    static: torch.Tensor
    tokens: torch.Tensor
    top_k: int


def allocate(static: torch.Tensor, need: torch.Tensor, n_media: int, budget: float, chunk_size: int,
             static_ratio: float | None = None, top_k_chunks: int | None = None) -> HeadBudget:
    """Split one layer's media budget over its KV heads.

    Args:
        static: ``(H,)`` bool head types.
        need: ``(H,)`` media tokens each head needs (its θ-mass count); weights static shares.
        n_media: media tokens in the prompt.
        budget: fraction of media tokens kept per head on average, in (0, 1].
    """
    h = static.numel()
    tokens = torch.zeros(h, dtype=torch.long)
    if n_media == 0 or h == 0:
        return HeadBudget(static.clone(), tokens, 0)
    total = budget * n_media * h
    n_s = int(static.sum())
    n_d = h - n_s
    ratio = (n_s / h) if static_ratio is None else static_ratio
    t_static = total if n_d == 0 else (0.0 if n_s == 0 else total * ratio)
    t_dynamic = total - t_static

    top_k = 0
    n_chunks = math.ceil(n_media / chunk_size)
    if n_d:
        share = t_dynamic / n_d
        # A share covering the whole span takes every chunk (the last one may be short).
        auto = n_chunks if share >= n_media else max(1, int(share) // chunk_size)
        top_k = top_k_chunks if top_k_chunks is not None else auto
        top_k = min(top_k, n_chunks)
        tokens[~static] = min(top_k * chunk_size, n_media)
    if n_s:
        tokens[static] = _water_fill(need[static].float().clamp_min(1.0), t_static, n_media)
    return HeadBudget(static.clone(), tokens, top_k)


def _water_fill(weights: torch.Tensor, total: float, cap: int) -> torch.Tensor:
    """Integer shares of ``total`` proportional to ``weights``, each at most ``cap``, summing to at most total."""
    share = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    left = min(float(total), cap * weights.numel())
    while free.any() and left > 1e-9:
        w = weights * free
        prop = w / w.sum() * left
        over = free & (share + prop > cap)
        if not over.any():
            share += prop
            break
        left -= float((cap - share[over]).sum())
        share[over] = cap
        free &= ~over
    out = share.floor().long()
    # Hand the rounding remainder to the heads that lost most to flooring.
    rest = int(min(total, cap * weights.numel()) - out.sum())
    if rest > 0:
        frac = (share - out).masked_fill(out >= cap, -1.0)
        out[frac.topk(min(rest, frac.numel())).indices[: rest]] += 1
    return out.clamp(max=cap)
