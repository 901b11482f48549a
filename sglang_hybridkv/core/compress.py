"""The one compression step both engines run at the end of a request's prefill, layer by layer.

The HF reference path (``hf/runner.py``) and the SGLang backend (``runtime/backend.py``) call these two
functions and nothing else to decide what survives, so a fidelity figure measured on the HF path is the
server's: same media span, same window attention, same plan.
"""

from __future__ import annotations

import torch

from .plan import LayerPlan, LayerStats
from .policies.base import CompressionPolicy
from .window import window_attention


def prompt_media_mask(seq_len: int, window: int, media_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompt's selectable span: media tokens outside the observation window.

    Args:
        seq_len: prompt length ``L``.
        window: observation window length ``w`` (clamped to ``[0, L]``); its positions are the question and
            are never media, whatever ``media_mask`` says.
        media_mask: ``(L,)`` bool, True on media tokens; None for a text-only request, whose long context
            before the window then plays the role of the media span.
    Returns: ``(L,)`` bool on the CPU, a fresh tensor (the caller's mask is never modified).
    """
    if media_mask is None:
        mask = torch.ones(seq_len, dtype=torch.bool)
    else:
        if media_mask.numel() != seq_len:
            raise ValueError(f"media_mask has {media_mask.numel()} entries for a {seq_len}-token prompt")
        mask = media_mask.detach().to("cpu", torch.bool).clone()
    w = max(0, min(window, seq_len))
    mask[seq_len - w:] = False
    return mask


def plan_layer(policy: CompressionPolicy, q_window: torch.Tensor | None, keys: torch.Tensor,
               media_mask: torch.Tensor, layer_idx: int, scaling: float) -> LayerPlan:
    """Plan one layer: window attention (when the policy scores keys), then the policy's per-head plan.

    Args:
        policy: from :func:`core.policies.make_policy`.
        q_window: ``(Hq, w, D)`` post-RoPE queries of the prompt's last ``w`` positions (the observation
            window; ``w`` is the caller's clamped window); may be None when ``policy.needs_window`` is False.
        keys: ``(H, L, D)`` post-RoPE prompt keys of the layer.
        media_mask: ``(L,)`` bool from :func:`prompt_media_mask`.
        layer_idx: the layer's index (head profiles are per layer).
        scaling: softmax scale of the layer.
    Returns: the layer's :class:`LayerPlan`.
    """
    probs = None
    if policy.needs_window:
        if q_window is None:
            raise ValueError(f"policy {policy.name!r} scores keys with the observation window: q_window is required")
        probs = window_attention(q_window, keys, scaling)
    return policy.plan(LayerStats(probs, media_mask, keys.shape[0], layer_idx, q_window, keys))
