"""Stage 1: classify each KV head as static (concentrated attention) or dynamic (spread attention).

Reference rule (DESIGN.md §2): ``m_h`` is the fewest media tokens that hold ``theta`` of a head's media
attention mass; a head is static when ``m_h`` fits in the per-head share of the budget. Two alternatives are
kept to measure agreement: the entropy rule (effective token count ``exp(H)``) and a per-query top-k mass rule
(every window query, not only their mean, must put ``theta`` of its media mass in the share).

Whether a dynamic head pays is a second question, asked after the budget is known: :func:`static_coverage`
and :func:`retrieval_coverage` measure how much of the window's media attention each role would keep with
the rows it would get (``policies/hybridkv.py`` keeps a head dynamic only where retrieval keeps more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunks import chunk_summaries, score_chunks, top_chunks
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
                    share: int, method: str = "mass", need: torch.Tensor | None = None) -> torch.Tensor:
    """``(num_kv_heads,)`` bool: True where the head is static.

    Args:
        share: media tokens per head the budget would give (``budget * n_media``).
        method: "mass" (reference), "entropy" or "topk_mass".
        need: ``(num_kv_heads,)`` :func:`concentration` of the same inputs when the caller already has it (the
            "mass" rule then does not compute it again).
    """
    n_media = media_idx.numel()
    if n_media == 0:
        return torch.ones(num_kv_heads, dtype=torch.bool, device=window_probs.device)
    if method == "mass":
        if need is None:
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



def static_coverage(media_probs: torch.Tensor, scores: torch.Tensor, share: int, num_kv_heads: int) -> torch.Tensor:
    """Window attention mass a head keeps as a static head with ``share`` media tokens.

    Args:
        media_probs: ``(num_q_heads, w, n_media)`` from :func:`media_mass` on the window probabilities.
        scores: ``(num_kv_heads, n_media)`` pooled text-prior scores (what static selection ranks by).
    Returns: ``(num_kv_heads,)`` mean over the GQA group and the window of the mass in the top-``share`` set.
    """
    hq, w, n = media_probs.shape
    keep = torch.zeros(num_kv_heads, n, device=media_probs.device)
    keep.scatter_(1, scores.topk(max(0, min(share, n)), dim=-1).indices, 1.0)
    covered = (media_probs.reshape(num_kv_heads, hq // num_kv_heads, w, n) * keep[:, None, None]).sum(-1)
    return covered.mean((1, 2))


def retrieval_coverage(media_probs: torch.Tensor, queries: torch.Tensor, media_keys: torch.Tensor, top_k: int,
                       chunk_size: int, score_scale: float) -> torch.Tensor:
    """Window attention mass a head keeps as a dynamic head retrieving ``top_k`` chunks per query.

    Each window query selects chunks exactly as decode does (:func:`core.chunks.score_chunks` on the chunk
    summaries, max over the GQA group), so this is what retrieval would recover had the question's queries been
    decode steps — not an oracle.

    Args:
        media_probs: ``(num_q_heads, w, n_media)`` from :func:`media_mass`.
        queries: ``(num_q_heads, w, D)`` window queries.
        media_keys: ``(num_kv_heads, n_media, D)`` keys of the media span (the host tier's order).
    Returns: ``(num_kv_heads,)`` mean over the GQA group and the window.
    """
    hq, w, n = media_probs.shape
    h = media_keys.shape[0]
    g = hq // h
    if top_k <= 0 or n == 0:
        return torch.zeros(h, device=media_probs.device)
    kmin, kmax = chunk_summaries(media_keys, chunk_size)
    c = kmin.shape[1]
    ids = top_chunks(score_chunks(queries.reshape(h, g, w, -1).permute(2, 0, 1, 3), kmin, kmax, score_scale),
                     top_k)  # (w, h, k)
    chunk_mass = F.pad(media_probs, (0, c * chunk_size - n)).reshape(h, g, w, c, chunk_size).sum(-1)
    picked = chunk_mass.gather(-1, ids.permute(1, 0, 2)[:, None].expand(h, g, w, ids.shape[-1]))
    return picked.sum(-1).mean((1, 2))
