"""Ablation: every head dynamic (chunk retrieval everywhere; accurate, most host traffic)."""

from __future__ import annotations

import torch

from ..budget import HeadBudget, allocate
from ..plan import LayerStats
from .hybridkv import HybridKVPolicy


class AllDynamicPolicy(HybridKVPolicy):
    name = "all_dynamic"

    def uses_prior(self) -> bool:
        return False  # no static head ranks anything

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        return torch.zeros(stats.num_kv_heads, dtype=torch.bool)

    def budgets(self, static: torch.Tensor, need: torch.Tensor, n_media: int, rows: float) -> HeadBudget:
        # The ablation keeps every head dynamic: one chunk each at least, even past the budget (reports show it).
        c = self.config
        return allocate(static, need, n_media, rows, c.chunk_size, c.static_ratio, c.top_k_chunks,
                        charge_summaries=c.budget_unit == "device", demote=False, need_weight=c.need_weight)

    def settle(self, stats: LayerStats, budget: HeadBudget, scores: torch.Tensor, media_idx: torch.Tensor,
               need: torch.Tensor, rows: float) -> HeadBudget:
        return budget  # the ablation keeps every head dynamic, paying or not
