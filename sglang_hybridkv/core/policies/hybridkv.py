"""HybridKV: classify heads, allocate top-down, prune static heads, retrieve chunks for dynamic heads."""

from __future__ import annotations

import torch

from ..classify import classify_static
from ..plan import LayerStats
from .base import CompressionPolicy


class HybridKVPolicy(CompressionPolicy):
    name = "hybridkv"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        fixed = self.profile_types(stats)
        if fixed is not None:
            return fixed
        c = self.config
        return classify_static(stats.window_probs, media_idx, stats.num_kv_heads, c.theta, max(1, share),
                               c.classifier)
