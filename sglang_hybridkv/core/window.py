"""Observation-window statistics: how the question's last ``w`` queries attend over the prompt.

The scores drive everything that follows (classification, allocation, text-prior selection), so they are
computed once per layer at the end of prefill.
"""

from __future__ import annotations

import torch


def window_attention(q_win: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities of the observation window over all prompt keys.

    Args:
        q_win: ``(num_q_heads, w, head_dim)`` post-RoPE queries of the last ``w`` prompt positions.
        keys: ``(num_kv_heads, seq_len, head_dim)`` post-RoPE keys of the whole prompt; ``w <= seq_len``.
        scaling: softmax scale (usually ``head_dim ** -0.5``).

    Returns:
        ``(num_q_heads, w, seq_len)`` float32 probabilities; window query ``i`` (prompt position
        ``seq_len - w + i``) gives zero weight to later keys.
    """
    hq, w, _ = q_win.shape
    hkv, seq_len, _ = keys.shape
    if hq % hkv:
        raise ValueError(f"num_q_heads={hq} is not a multiple of num_kv_heads={hkv}")
    if w > seq_len:
        raise ValueError(f"window {w} is longer than the prompt ({seq_len} tokens)")
    group = hq // hkv
    k = keys.float().repeat_interleave(group, dim=0)
    logits = torch.einsum("hwd,hld->hwl", q_win.float(), k) * scaling
    q_pos = torch.arange(seq_len - w, seq_len, device=keys.device)
    future = torch.arange(seq_len, device=keys.device)[None, :] > q_pos[:, None]
    logits.masked_fill_(future[None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def group_mean(per_q_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average ``(num_q_heads, ...)`` over each GQA group -> ``(num_kv_heads, ...)``."""
    hq = per_q_head.shape[0]
    return per_q_head.reshape(num_kv_heads, hq // num_kv_heads, *per_q_head.shape[1:]).mean(dim=1)


def group_max(per_q_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Max over each GQA group: the group needs what its most demanding query head needs."""
    hq = per_q_head.shape[0]
    return per_q_head.reshape(num_kv_heads, hq // num_kv_heads, *per_q_head.shape[1:]).amax(dim=1)
