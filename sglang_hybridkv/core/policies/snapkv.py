"""SnapKV: every head keeps the same number of media tokens, chosen by pooled observation-window attention.

Budget unit and always-kept text are the same as HybridKV's, so the comparison isolates HybridKV's two
additions: need-weighted allocation and chunk retrieval for dynamic heads.
"""

from __future__ import annotations

import torch

from ..budget import HeadBudget
from ..plan import LayerStats
from .base import CompressionPolicy


class SnapKVPolicy(CompressionPolicy):
    name = "snapkv"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        return torch.ones(stats.num_kv_heads, dtype=torch.bool)

    def budgets(self, static: torch.Tensor, need: torch.Tensor, n_media: int, rows: float) -> HeadBudget:
        share = min(n_media, int(rows // max(1, static.numel())))
        return HeadBudget(static.clone(), torch.full_like(need, share), 0)
