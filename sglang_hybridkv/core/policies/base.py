"""Base class of compression policies: the shared mechanics; subclasses answer two questions.

A policy decides, per layer, (1) which KV heads are static, (2) how the layer's device rows (see
``core/budget.py``) are shared among its heads and, optionally, (3) whether the types still hold once the
rows are known (:meth:`CompressionPolicy.settle`). Everything else — scoring media by the observation window, pooling, keeping text/sink/recent
tokens, choosing what goes to the host tier — is the same for every policy and lives here.
"""

from __future__ import annotations

import json
from functools import cached_property

import torch

from ...config import HybridKVConfig
from ..budget import HeadBudget, allocate, media_rows
from ..classify import concentration
from ..device_copy import to_device
from ..plan import LayerPlan, LayerStats
from ..select import always_kept, pool_scores, select_tokens
from ..shard import gather_heads
from ..window import group_mean

REACH_SHARE = 4  # see forward_reach


class CompressionPolicy:
    """One compression policy. Subclasses set ``name`` and override :meth:`head_types` / :meth:`budgets`."""

    name = "base"
    needs_window = True

    def __init__(self, config: HybridKVConfig) -> None:
        self.config = config

    # ---- the two questions --------------------------------------------------------------------------
    def head_types(self, stats: LayerStats, media_idx: torch.Tensor, need: torch.Tensor, share: int) -> torch.Tensor:
        """``(H,)`` bool, True for static heads; ``share`` is the media rows per head the budget gives."""
        raise NotImplementedError

    def uses_prior(self) -> bool:
        """Whether static heads rank tokens by the cross-layer prior (``config.prior == "late"``) rather than
        their own layer's window attention; the caller computes it over all layers before planning any."""
        return False

    def budgets(self, static: torch.Tensor, need: torch.Tensor, n_media: int, rows: float) -> HeadBudget:
        """Per-head device budget out of the layer's media ``rows`` (see :func:`core.budget.allocate`)."""
        c = self.config
        return allocate(static, need, n_media, rows, c.chunk_size, c.static_ratio, c.top_k_chunks,
                        charge_summaries=c.budget_unit == "device", need_weight=c.need_weight)

    def settle(self, stats: LayerStats, budget: HeadBudget, scores: torch.Tensor, media_idx: torch.Tensor,
               need: torch.Tensor, rows: float) -> HeadBudget:
        """Revise head types once the budget is known; the default keeps it.

        ``budget`` and ``need`` cover every head of the layer (all ranks', on the host); ``media_idx`` is on the
        keys' device; ``scores`` (``(h, L)`` pooled) and ``stats`` this rank's heads: what a revision needs from
        the other ranks it gathers (``stats.shard``), and every rank takes the same branches, so the collectives
        match."""
        return budget

    # ---- shared mechanics ---------------------------------------------------------------------------
    def plan(self, stats: LayerStats) -> LayerPlan:
        """Decide what each head of one layer keeps. See :class:`LayerPlan`.

        What depends on the media mask alone is host arithmetic; the device values the decisions need (each
        head's θ-mass count and type, and in :meth:`settle` the coverages) come to the host in one read each, so
        on a GPU a layer's plan waits for the device once (twice where :meth:`settle` compares coverages)."""
        c = self.config
        h = stats.num_kv_heads
        keep_always = always_kept(stats.media_mask, c.sink, c.recent)
        media_idx = (~keep_always).nonzero().flatten()
        n_media = media_idx.numel()
        probs = stats.window_probs
        dev = stats.keys.device if stats.keys is not None else probs.device if probs is not None else "cpu"
        media_dev = to_device(media_idx, dev)
        # Rows and shares count every head of the layer (all ranks'): the allocation is global.
        rows = media_rows(c.budget, c.budget_unit, keep_always.numel(), n_media, keep_always.numel() - n_media,
                          stats.all_kv_heads)
        need = concentration(probs, media_dev, h, c.theta) if n_media else torch.zeros(h, dtype=torch.long, device=dev)
        static = self.head_types(stats, media_dev, need, int(rows // stats.all_kv_heads))
        static, need = torch.stack([static.to(need.device, torch.long), need]).cpu()  # the one read
        static = static.bool()
        if stats.prior is None:
            scores = head_scores(probs, h, c, forward_reach(c, stats.media_mask))
        else:
            scores = stats.prior[None].expand(h, -1).float()
        static_all, need_all = gather_heads(stats.shard, static, need)
        budget = self.settle(stats, self.budgets(static_all, need_all, n_media, rows), scores, media_dev, need_all,
                             rows)
        if stats.shard is not None:  # this rank's heads of the all-heads budget
            budget = HeadBudget(stats.shard.local(budget.static), stats.shard.local(budget.tokens), budget.top_k)
        static = budget.static
        per_head = torch.where(static, budget.tokens, torch.zeros_like(budget.tokens))
        keep_idx, keep_len = select_tokens(scores, keep_always, per_head)
        host_idx = media_idx if bool((~static).any()) else media_idx[:0]
        return LayerPlan(static, keep_idx, keep_len, host_idx, budget.top_k, c.chunk_size, need)

    @cached_property
    def head_profile(self) -> list[list[bool]] | None:
        """Per-layer static flags loaded from ``config.head_profile`` (None when not set)."""
        path = self.config.head_profile
        if path is None:
            return None
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("static"), list):
            raise ValueError(f"head_profile {path!r} must be a JSON object with a 'static' list per layer")
        return data["static"]

    def profile_types(self, stats: LayerStats) -> torch.Tensor | None:
        """Static flags for this layer from the head profile, or None when no profile is loaded."""
        prof = self.head_profile
        if prof is None:
            return None
        if stats.layer_idx >= len(prof) or len(prof[stats.layer_idx]) != stats.all_kv_heads:
            raise ValueError(f"head_profile {self.config.head_profile!r} has no entry of {stats.all_kv_heads} "
                             f"KV heads for layer {stats.layer_idx}")
        flags = torch.tensor(prof[stats.layer_idx], dtype=torch.bool)
        return flags if stats.shard is None else stats.shard.local(flags)


def head_scores(window_probs: torch.Tensor, num_kv_heads: int, config: HybridKVConfig, reach: int) -> torch.Tensor:
    """``(H, seq_len)`` what a head ranks tokens by: its GQA group's window attention, pooled with forward
    reach ``reach`` (from :func:`forward_reach`)."""
    return pool_scores(group_mean(window_probs.mean(1), num_kv_heads), config.pool_kernel, reach)


def forward_reach(config: HybridKVConfig, media_mask: torch.Tensor) -> int:
    """The forward reach a request's scores are pooled with: ``config.pool_forward``, capped at a
    ``REACH_SHARE``-th of the media rows one head may spend (``media_mask``: ``(L,)`` from
    :func:`core.compress.prompt_media_mask`).

    Why: the reach spreads every peak of the question's attention over the ``reach`` tokens after it. Where a
    head can keep only a handful of media tokens, spans that wide crowd out the other peaks (the digits
    themselves) and the answer is lost. Measured (``benchmarks/fidelity.py --sweep``, hybridkv, 20 captioned-video
    tasks of ~610 tokens, the reach fixed): at budget 0.05 (~9 media rows per head) reach 0/1/2 answer 5 of 20,
    3 answers 3, 4 and 8 answer 1; at 0.1 (~40 rows) reach 4 and 8 answer 20, 0-3 answer 19. A quarter of the
    share gives 2 and 8 there.
    """
    keep = always_kept(media_mask, config.sink, config.recent)
    n_media = int((~keep).sum())
    share = media_rows(config.budget, config.budget_unit, keep.numel(), n_media, keep.numel() - n_media, 1)
    return min(config.pool_forward, int(share) // REACH_SHARE)
