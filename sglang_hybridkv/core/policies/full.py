"""Full cache: keep every token of every head (the reference every other policy is measured against)."""

from __future__ import annotations

import torch

from ..plan import LayerPlan, LayerStats
from .base import CompressionPolicy


class FullPolicy(CompressionPolicy):
    name = "full"
    needs_window = False

    def plan(self, stats: LayerStats) -> LayerPlan:
        h, n = stats.num_kv_heads, stats.media_mask.numel()
        idx = torch.arange(n).expand(h, n).clone()
        zeros = torch.zeros(h, dtype=torch.long)
        return LayerPlan(torch.ones(h, dtype=torch.bool), idx, torch.full((h,), n), idx[0, :0], 0,
                         self.config.chunk_size, zeros)
