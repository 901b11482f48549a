"""The one compression step both engines run at the end of a request's prefill, layer by layer.

The HF reference path (``hf/runner.py``) and the SGLang backend (``runtime/backend.py``) call these
functions and nothing else to decide what survives, so a fidelity figure measured on the HF path is the
server's: same media span, same window attention, same plan. With a cross-layer prior (``config.prior``
"late", hybridkv's default) planning takes two passes: :func:`layer_prior` per layer, then
:func:`cross_layer_prior` once, then :func:`plan_layer` per layer with it.

Why a cross-layer prior: on SmolLM2 the question's attention in the lower half of the layers is spread
(positional), so each of those layers, ranking by its own attention, drops the needle the upper layers find,
and decoding then copies a truncated or wrong number. Measured on the quickstart's 8 questions (HF path,
budget 0.1): own-layer ranking 3/8, the upper half's mean 5/8 with every answer equal to the full cache's.
Why the max over those layers rather than their mean: when the question names one of several similar cues
("the sign with the number" among signs reading HELLO and SALE), one or two layers look sharply at the answer
while the rest of the upper half still attends by position; the mean dilutes the sharp layer and the digits fall
out of the kept set. Measured (``benchmarks/fidelity.py``, hybridkv): captioned video 20 tasks at budgets
0.05/0.1/0.2, mean 0.05/0.95/1.00, max 0.05/1.00/1.00; 16 tasks of 48 and 96 frames, mean 0.31/0.94/1.00,
max 0.38/1.00/1.00; security log 20 tasks 1.00 at every budget with either; other layer ranges scored 0.85-0.90
at 0.1.
"""

from __future__ import annotations

import torch

from .plan import LayerPlan, LayerStats
from .policies.base import CompressionPolicy, forward_reach, head_scores
from .shard import HeadShard
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


def layer_prior(policy: CompressionPolicy, q_window: torch.Tensor, keys: torch.Tensor, scaling: float,
                media_mask: torch.Tensor, shard: HeadShard | None = None) -> torch.Tensor:
    """One layer's share of the cross-layer prior: ``(seq_len,)`` the mean over the layer's KV heads (every
    rank's) of each head's pooled window attention, normalised to sum 1. Arguments as :func:`plan_layer`'s."""
    reach = forward_reach(policy.config, media_mask)
    s = head_scores(window_attention(q_window, keys, scaling), keys.shape[0], policy.config, reach)
    total = (s / s.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0)
    if shard is not None:  # every rank's heads: the prior is the one-rank figure on every rank
        total = shard.gather(total[None]).sum(0).to(keys.device)
    return total / (keys.shape[0] * (1 if shard is None else shard.size))


def cross_layer_prior(per_layer: dict[int, torch.Tensor], num_layers: int) -> torch.Tensor:
    """``(seq_len,)`` the per-token max of :func:`layer_prior` over the upper half of the layers (index >= L // 2)."""
    late = [p for idx, p in per_layer.items() if idx >= num_layers // 2]
    if not late:
        raise ValueError(f"cross_layer_prior needs the layers >= {num_layers // 2} of {num_layers}; got {sorted(per_layer)}")
    return torch.stack(late).amax(0)


def plan_layer(policy: CompressionPolicy, q_window: torch.Tensor | None, keys: torch.Tensor,
               media_mask: torch.Tensor, layer_idx: int, scaling: float, shard: HeadShard | None = None,
               prior: torch.Tensor | None = None) -> LayerPlan:
    """Plan one layer: window attention (when the policy scores keys), then the policy's per-head plan.

    Args:
        policy: from :func:`core.policies.make_policy`.
        q_window: ``(Hq, w, D)`` post-RoPE queries of the prompt's last ``w`` positions (the observation
            window; ``w`` is the caller's clamped window); may be None when ``policy.needs_window`` is False.
        keys: ``(H, L, D)`` post-RoPE prompt keys of the layer.
        media_mask: ``(L,)`` bool on the host, from :func:`prompt_media_mask`.
        layer_idx: the layer's index (head profiles are per layer).
        scaling: softmax scale of the layer.
        shard: under tensor parallelism, this rank's slice of the KV heads (``q_window`` and ``keys`` hold
            that slice); the plan, for this rank's heads, equals that slice of the one-rank plan.
        prior: from :func:`cross_layer_prior` when ``policy.uses_prior()`` (ignored otherwise). None plans the
            layer as a model of one layer: its own :func:`layer_prior` (unit tests, synthetic benchmarks).
    Returns: the layer's :class:`LayerPlan`.
    """
    probs = None
    if policy.needs_window:
        if q_window is None:
            raise ValueError(f"policy {policy.name!r} scores keys with the observation window: q_window is required")
        probs = window_attention(q_window, keys, scaling)
    if not policy.uses_prior():
        prior = None
    elif prior is None:
        prior = layer_prior(policy, q_window, keys, scaling, media_mask, shard)
    # The mask stays on the host (the policy derives counts and positions from it without reading the device).
    prior = None if prior is None else prior.to(keys.device)
    return policy.plan(LayerStats(probs, media_mask, keys.shape[0], layer_idx, q_window, keys, shard, prior))
