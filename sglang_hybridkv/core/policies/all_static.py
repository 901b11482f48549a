"""Ablation: every head static (text-prior pruning with need-weighted budgets; fastest, least accurate)."""

from __future__ import annotations

import torch

from ..plan import LayerStats
from .hybridkv import HybridKVPolicy


class AllStaticPolicy(HybridKVPolicy):
    name = "all_static"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        return torch.ones(stats.num_kv_heads, dtype=torch.bool)
