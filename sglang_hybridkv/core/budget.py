"""Stage 2: top-down budget allocation, layer budget -> head type -> single heads.

The unit is a *device row*: one prompt token's K and V of one KV head, what SGLang's pool stores per head
per slot. A compressed layer occupies (:func:`core.plan.device_rows`): each head's kept tokens (text, window,
sink, recent and, for static heads, selected media) plus, per dynamic head, one row per chunk summary (min
keys in the K row, max keys in the V row) and a retrieval buffer of ``top_k * chunk`` rows.

With ``budget_unit="device"`` (default) a layer may hold ``budget * H * L`` rows, ``L`` the prompt length:
everything resident is charged, so budget 0.1 means 10x less device KV. Rows left after the always-kept
tokens go to media: split between head types (by head count, or ``static_ratio``), dynamic heads in equal
shares that pay their summaries and buffer, static heads by a mix of equal shares and shares in proportion
to what they need (their θ-mass token count; ``need_weight``), capped at ``n_media``. With ``budget_unit="media"`` (the paper's reading) the media rows are
``budget * n_media * H`` and summaries and text are not charged.

A dynamic head that cannot afford its summaries plus one chunk is demoted to static (fewest needed tokens
first): retrieval with no buffer is useless, and its rows serve a static head better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class HeadBudget:
    """Per-KV-head budget of one layer.

    Attributes:
        static: ``(num_kv_heads,)`` bool (after demotion).
        tokens: ``(num_kv_heads,)`` long; static heads: media tokens kept; dynamic heads: ``top_k * chunk``
            (the device retrieval buffer), capped at ``n_media``.
        top_k: chunks each dynamic head retrieves per step (0 when the layer has no dynamic head).
    """

    static: torch.Tensor
    tokens: torch.Tensor
    top_k: int


def media_rows(budget: float, unit: str, seq_len: int, n_media: int, n_always: int, num_heads: int) -> float:
    """Device rows one layer may spend on media (kept media tokens, chunk summaries, retrieval buffers).

    Args:
        unit: "device" charges everything against ``budget * num_heads * seq_len``, so the always-kept
            ``n_always`` tokens of every head come off first (never below 0: a budget under that floor keeps
            just the floor); "media": ``budget * n_media * num_heads``.
    """
    if unit == "media":
        return budget * n_media * num_heads
    if unit == "device":
        return max(0.0, num_heads * (budget * seq_len - n_always))
    raise ValueError(f"budget_unit={unit!r} is not allowed: choose one of ['device', 'media']")


def within_budget(kv_fraction_device: float, budget: float, unit: str) -> bool:
    """Whether a compressed request keeps what its budget promised: ``kv_fraction_device`` is its device KV,
    every byte counted, as a fraction of its full KV. Only the "device" unit promises bytes (2 % covers slot
    packing and row tables). A policy goes over when its floor is above the budget: the always-kept text and
    window, and for all_dynamic the chunk summaries and one chunk per head."""
    return unit != "device" or kv_fraction_device <= budget * 1.02


def dynamic_rows(top_k: int, n_media: int, chunk_size: int, charge_summaries: bool) -> int:
    """Device rows of one dynamic head: its retrieval buffer, plus its chunk summaries when charged."""
    summaries = math.ceil(n_media / chunk_size) if charge_summaries else 0
    return min(top_k * chunk_size, n_media) + summaries


def allocate(static: torch.Tensor, need: torch.Tensor, n_media: int, rows: float, chunk_size: int,
             static_ratio: float | None = None, top_k_chunks: int | None = None, charge_summaries: bool = True,
             demote: bool = True, need_weight: float = 1.0) -> HeadBudget:
    """Split one layer's media rows over its KV heads.

    Args:
        static: ``(H,)`` bool head types from classification.
        need: ``(H,)`` media tokens each head needs (its θ-mass count); weights static shares and decides
            which dynamic heads are demoted first.
        n_media: selectable media tokens in the prompt.
        rows: the layer's media rows, from :func:`media_rows`.
        static_ratio: share of ``rows`` for static heads; None splits by head count.
        top_k_chunks: fixed chunks per dynamic head (may exceed ``rows``); None derives it from the share.
        charge_summaries: dynamic heads pay one row per chunk summary (the "device" unit).
        demote: turn dynamic heads that cannot afford one chunk into static ones (off for the all-dynamic
            ablation, whose heads then get one chunk each, over budget if need be).
        need_weight: static shares are proportional to ``(1 - need_weight) * mean(need) + need_weight * need``:
            1 weights by need alone, 0 gives equal shares.
    """
    h = static.numel()
    static = static.clone()
    tokens = torch.zeros(h, dtype=torch.long)
    if n_media == 0 or h == 0:
        return HeadBudget(static, tokens, 0)
    n_chunks = math.ceil(n_media / chunk_size)
    one_chunk = dynamic_rows(1, n_media, chunk_size, charge_summaries)

    def dynamic_share() -> float:
        n_d = int((~static).sum())
        if n_d == 0:
            return 0.0
        part = rows if n_d == h else rows * ((n_d / h) if static_ratio is None else 1.0 - static_ratio)
        return part / n_d

    if demote and top_k_chunks is None:
        while bool((~static).any()) and dynamic_share() < one_chunk:
            dyn = (~static).nonzero().flatten()
            static[dyn[need[dyn].argmin()]] = True

    top_k = 0
    n_d = int((~static).sum())
    if n_d:
        share = dynamic_share()
        summaries = n_chunks if charge_summaries else 0
        # A share whose buffer alone covers the span takes every chunk (so budget 1.0 is exact even for the
        # all-dynamic ablation, a little over budget by its summaries).
        auto = n_chunks if share >= n_media else max(1, int(share - summaries) // chunk_size)
        top_k = min(top_k_chunks if top_k_chunks is not None else auto, n_chunks)
        tokens[~static] = min(top_k * chunk_size, n_media)
    n_s = h - n_d
    if n_s:
        # Static heads take what the dynamic heads leave, rounding remainders included.
        left = rows - n_d * dynamic_rows(top_k, n_media, chunk_size, charge_summaries)
        weights = need[static].float().clamp_min(1.0)
        weights = (1.0 - need_weight) * weights.mean() + need_weight * weights
        tokens[static] = _water_fill(weights, max(0.0, left), n_media)
    return HeadBudget(static, tokens, top_k)


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
