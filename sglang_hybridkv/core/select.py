"""Stage 3a: text-prior selection for static heads (and SnapKV).

Every text token is kept; so are the first ``sink`` and last ``recent`` prompt tokens. Of the media tokens,
each head keeps the ``budget_h`` whose pooled window attention is highest; the rest are dropped for good.

Pooling has two parts. A symmetric average of width ``pool_kernel`` keeps neighbours of a hit together (one
object spans several tokens). A forward reach of ``pool_forward`` tokens lets every token score at least as
high as the best of the tokens just before it: the question attends to the *cue* it names ("the sign with
the number"), while decoding needs what *follows* the cue (the digits it copies). Measured on SmolLM2
(captioned video, 48 frames, budget 0.1 device unit, 10 tasks): SnapKV 0.0 -> 0.8 accuracy with a forward
reach of 8 (full cache 0.9); the sweep in ``benchmarks/results/fidelity-sweep.json`` chose the defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .device_copy import to_device


def pool_scores(scores: torch.Tensor, kernel: int, forward: int = 0) -> torch.Tensor:
    """Pool ``(H, seq_len)`` scores along the sequence (same shape out).

    Args:
        kernel: odd width of the centred average (1: none).
        forward: each position then takes the max of itself and the ``forward`` positions before it (0: none).
    """
    if scores.shape[-1] == 0:
        return scores
    out = scores.float()
    if kernel > 1:
        out = F.avg_pool1d(out[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
    if forward > 0:
        out = F.max_pool1d(F.pad(out[:, None], (forward, 0), value=float("-inf")), forward + 1, stride=1)[:, 0]
    return out


def always_kept(media_mask: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``(seq_len,)`` bool: tokens every head keeps on the device: text, sink and recent tokens."""
    seq_len = media_mask.numel()
    pos = torch.arange(seq_len, device=media_mask.device)
    return ~media_mask | (pos < sink) | (pos >= seq_len - recent)


def select_tokens(scores: torch.Tensor, keep_always: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices each head keeps: ``keep_always`` plus its ``budget[h]`` best-scoring other tokens.

    Every count is taken from the host inputs, so on a GPU this reads no device value (compaction plans every
    layer of a request with it, inside the forward).

    Args:
        scores: ``(H, seq_len)`` pooled scores (any device; finite where not ``keep_always``).
        keep_always: ``(seq_len,)`` bool on the host.
        budget: ``(H,)`` long on the host, selectable tokens kept per head (clipped to what is selectable).
    Returns:
        ``indices``: ``(H, max_kept)`` long on ``scores.device``, ascending positions per head, padded with 0
        beyond ``lengths``;
        ``lengths``: ``(H,)`` long on the host.
    """
    h, seq_len = scores.shape
    n_always = int(keep_always.sum())
    b = budget.clamp(min=0, max=seq_len - n_always)
    # The top-b of the masked scores are b distinct selectable tokens (keep_always ones score -inf, the rest are
    # finite), so each head keeps exactly n_always + b[h].
    lengths = b + n_always
    k, width = (int(b.max()), int(lengths.max())) if h else (0, 0)
    always = to_device(keep_always, scores.device)
    keep = always[None].expand(h, seq_len).clone()
    if k > 0:
        top = scores.float().masked_fill(always[None], float("-inf")).topk(k, dim=-1).indices  # (H, k)
        rank_ok = torch.arange(k)[None] < b[:, None]
        keep.scatter_(1, top, to_device(rank_ok, scores.device) | keep.gather(1, top))
    # Stable sort puts kept positions first in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    order = order.masked_fill(to_device(torch.arange(width)[None] >= lengths[:, None], scores.device), 0)
    return order, lengths
