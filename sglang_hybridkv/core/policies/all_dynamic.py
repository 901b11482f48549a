"""Ablation: every head dynamic (chunk retrieval everywhere; accurate, most host traffic)."""

from __future__ import annotations

import torch

from ..plan import LayerStats
from .hybridkv import HybridKVPolicy


class AllDynamicPolicy(HybridKVPolicy):
    name = "all_dynamic"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        return torch.zeros(stats.num_kv_heads, dtype=torch.bool)
