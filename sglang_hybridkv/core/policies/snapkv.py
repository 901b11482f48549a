"""SnapKV: every head keeps an equal share of media tokens, chosen by pooled observation-window attention.

Budget unit, always-kept text, scoring and allocation code are HybridKV's (every head static, equal shares:
``need_weight`` 0), so the comparison isolates HybridKV's two additions: need-weighted allocation and chunk
retrieval for dynamic heads.
"""

from __future__ import annotations

import torch

from ..budget import HeadBudget, allocate
from ..plan import LayerStats
from .base import CompressionPolicy


class SnapKVPolicy(CompressionPolicy):
    name = "snapkv"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        return torch.ones(stats.num_kv_heads, dtype=torch.bool)

    def budgets(self, static: torch.Tensor, need: torch.Tensor, n_media: int, rows: float) -> HeadBudget:
        return allocate(static, need, n_media, rows, self.config.chunk_size, need_weight=0.0)
