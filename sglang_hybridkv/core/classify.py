"""Stage 1: classify each KV head as static (concentrated attention) or dynamic (spread attention).

Reference rule (DESIGN.md §2): ``m_h`` is the fewest media tokens that hold ``theta`` of a head's media
attention mass; a head is static when ``m_h`` fits in the per-head share of the budget. Two alternatives are
kept to measure agreement: the entropy rule (effective token count ``exp(H)``) and a per-query top-k mass rule
(every window query, not only their mean, must put ``theta`` of its media mass in the share).
"""

from __future__ import annotations

import torch

from .window import group_max


def media_mass(probs: torch.Tensor, media_idx: torch.Tensor) -> torch.Tensor:
    """Attention over media tokens only, renormalised to sum 1 along the last dim.

    Args:
        probs: ``(..., seq_len)`` attention probabilities.
        media_idx: ``(n_media,)`` positions of media tokens.
    Returns: ``(..., n_media)``; rows with no media mass become uniform.
    """
    m = probs.index_select(-1, media_idx).float()
    total = m.sum(-1, keepdim=True)
    uniform = torch.full_like(m, 1.0 / max(1, m.shape[-1]))
    return torch.where(total > 0, m / total.clamp_min(1e-30), uniform)


def tokens_for_mass(mass: torch.Tensor, theta: float) -> torch.Tensor:
    """Fewest tokens holding ``theta`` of ``mass`` (``(..., n)``, rows sum to 1) -> ``(...,)`` long."""
    if mass.shape[-1] == 0:
        return torch.zeros(mass.shape[:-1], dtype=torch.long, device=mass.device)
    csum = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    # A small tolerance so that a row summing to 0.9999999 still reaches theta=1.0.
    need = (csum < theta - 1e-6).sum(-1) + 1
    return need.clamp(max=mass.shape[-1])


def concentration(window_probs: torch.Tensor, media_idx: torch.Tensor, num_kv_heads: int,
                  theta: float) -> torch.Tensor:
    """``m_h`` per KV head: media tokens holding ``theta`` of the window-mean media attention.

    Args:
        window_probs: ``(num_q_heads, w, seq_len)`` from :func:`window.window_attention`.
    Returns: ``(num_kv_heads,)`` long, the max over the GQA group.
    """
    per_q = tokens_for_mass(media_mass(window_probs.mean(1), media_idx), theta)
    return group_max(per_q, num_kv_heads)


def classify_static(window_probs: torch.Tensor, media_idx: torch.Tensor, num_kv_heads: int, theta: float,
                    share: int, method: str = "mass") -> torch.Tensor:
    """``(num_kv_heads,)`` bool: True where the head is static.

    Args:
        share: media tokens per head the budget would give (``budget * n_media``).
        method: "mass" (reference), "entropy" or "topk_mass".
    """
    n_media = media_idx.numel()
    if n_media == 0:
        return torch.ones(num_kv_heads, dtype=torch.bool, device=window_probs.device)
    if method == "mass":
        need = concentration(window_probs, media_idx, num_kv_heads, theta)
        return need <= share
    if method == "entropy":
        p = media_mass(window_probs.mean(1), media_idx)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
        return group_max(ent.exp(), num_kv_heads) <= share
    if method == "topk_mass":
        k = max(1, min(share, n_media))
        p = media_mass(window_probs, media_idx)  # (hq, w, n)
        top = p.topk(k, dim=-1).values.sum(-1)  # (hq, w)
        # Static only if every window query of every query head in the group is concentrated.
        return -group_max(-top.amin(1), num_kv_heads) >= theta
    raise ValueError(f"classifier={method!r} is not allowed: choose one of ['mass', 'entropy', 'topk_mass']")

