"""HybridKV: classify heads, allocate top-down, prune static heads, retrieve chunks for dynamic heads.

A head stays dynamic only where retrieval pays under the device budget. A dynamic head spends its rows on
chunk summaries (one row per chunk of the media span) before its retrieval buffer, so at small budgets on
short spans its buffer holds a chunk or two while the same rows as a static head hold many chosen tokens.
After allocation, :meth:`HybridKVPolicy.settle` compares, per dynamic head, the window's media attention its
retrieved chunks would cover (chunks scored as decode scores them) with what its static selection of an equal
share would cover, and makes it static where retrieval covers no more: hybridkv is then never worse than its
static half for want of rows. Without this test, on SmolLM2 at budget 0.1, hybridkv scored 0.56 / 0.67 on the
two task families against 0.89 / 1.00 for its all-static half (``benchmarks/results/fidelity-*.json`` of the
previous run; the current figures are in the README).
"""

from __future__ import annotations

import torch

from ..budget import HeadBudget
from ..classify import classify_static, media_mass, retrieval_coverage, static_coverage
from ..plan import LayerStats
from ..shard import gather_heads
from .base import CompressionPolicy


class HybridKVPolicy(CompressionPolicy):
    name = "hybridkv"

    def uses_prior(self) -> bool:
        return self.config.prior == "late"

    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        fixed = self.profile_types(stats)
        if fixed is not None:
            return fixed
        c = self.config
        return classify_static(stats.window_probs, media_idx, stats.num_kv_heads, c.theta, max(1, share),
                               c.classifier, need)  # ``need``: plan's θ-mass counts, not sorted again

    def settle(self, stats: LayerStats, budget: HeadBudget, scores: torch.Tensor, media_idx: torch.Tensor,
               need: torch.Tensor, rows: float) -> HeadBudget:
        """Dynamic heads whose retrieval would cover no more of the window's attention than static selection
        become static (a loaded head profile is the operator's decision and is kept)."""
        dynamic = ~budget.static
        if not bool(dynamic.any()) or self.head_profile is not None:
            return budget
        if stats.queries is None or stats.keys is None:
            raise ValueError("hybridkv needs the window queries and prompt keys (core.compress.plan_layer passes them)")
        c = self.config
        h = stats.num_kv_heads
        probs = media_mass(stats.window_probs, media_idx)
        kept = static_coverage(probs, scores.index_select(1, media_idx), int(rows // stats.all_kv_heads), h)
        got = retrieval_coverage(probs, stats.queries, stats.keys.index_select(1, media_idx), budget.top_k, c.chunk_size,
                                 c.chunk_score_scale)
        kept, got = torch.stack([kept, got.to(kept.dtype)]).cpu()  # one read of the device for both
        kept, got = gather_heads(stats.shard, kept, got)  # every head's, as one rank computes them
        unpaid = dynamic & (got <= kept)
        if not bool(unpaid.any()):
            return budget
        return self.budgets(budget.static | unpaid, need, media_idx.numel(), rows)
