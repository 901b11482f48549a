"""What a policy decides for one layer of one request, before any KV is moved."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .shard import HeadShard


@dataclass
class LayerStats:
    """Per-layer inputs of a policy, computed once at the end of prefill.

    Attributes:
        window_probs: ``(num_q_heads, w, seq_len)`` observation-window attention (None for the full policy).
        media_mask: ``(seq_len,)`` bool on the host, True on media tokens (what planning derives from it alone
            is host arithmetic: no device read).
        num_kv_heads: KV heads of the layer on this rank (all of them without tensor parallelism).
        layer_idx: index of the layer (head profiles are per layer).
        queries: ``(num_q_heads, w, head_dim)`` the window's post-RoPE queries, and
        keys: ``(num_kv_heads, seq_len, head_dim)`` the prompt's post-RoPE keys: hybridkv scores chunks with them
            to decide whether a dynamic head pays (None where no policy needs them).
        shard: under tensor parallelism, which of the layer's heads these are and how to gather the other
            ranks' per-head figures (``core/shard.py``); None on one rank. The plan covers this rank's heads.
        prior: ``(seq_len,)`` the score static heads rank tokens by when the policy uses a cross-layer prior
            (:func:`core.compress.cross_layer_prior`); None: each head's own pooled window attention.
    """

    window_probs: torch.Tensor | None
    media_mask: torch.Tensor
    num_kv_heads: int
    layer_idx: int = 0
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    shard: HeadShard | None = None
    prior: torch.Tensor | None = None

    @property
    def all_kv_heads(self) -> int:
        """KV heads of the layer over all ranks (what the budget is split over)."""
        return self.num_kv_heads * (1 if self.shard is None else self.shard.size)


@dataclass
class LayerPlan:
    """Which prompt tokens each KV head keeps and where.

    Attributes:
        static: ``(H,)`` bool on the host; dynamic heads are the others.
        keep_idx: ``(H, P)`` long prompt positions each head keeps, on the KV's device, ascending, padded with 0.
        keep_len: ``(H,)`` long on the host, valid entries of ``keep_idx``.
        host_idx: ``(n_host,)`` long on the host, prompt positions a dynamic head moves to the host tier
            (selectable media), empty when the layer has no dynamic head.
        top_k: chunks a dynamic head retrieves per decode step.
        chunk_size: tokens per chunk.
        need: ``(H,)`` long on the host, θ-mass token count per head (0 where not computed), for reports.
    """

    static: torch.Tensor
    keep_idx: torch.Tensor
    keep_len: torch.Tensor
    host_idx: torch.Tensor
    top_k: int
    chunk_size: int
    need: torch.Tensor

    @property
    def num_static(self) -> int:
        return int(self.static.sum())

    @property
    def num_dynamic(self) -> int:
        return int((~self.static).sum())


def device_rows(plan: LayerPlan, generated: int = 0) -> int:
    """Device rows the compressed layer occupies; a row is one token's K and V of one KV head.

    Counted: every head's kept prompt tokens; per dynamic head one row per chunk summary (min keys in the K
    row, max keys in the V row) and a retrieval buffer of ``min(top_k * chunk_size, n_host)`` rows; and
    ``generated`` decoded tokens, one row in every head each. This is what the budget (``core/budget.py``)
    charges and what the SGLang pool region holds (before packing into whole slots); the full cache of the
    same request holds ``H * (L + generated)`` rows.
    """
    n_host = plan.host_idx.numel()
    n_dyn = plan.num_dynamic if n_host else 0
    chunks = math.ceil(n_host / plan.chunk_size)
    buffer = min(min(plan.top_k, chunks) * plan.chunk_size, n_host)
    return int(plan.keep_len.sum()) + n_dyn * (chunks + buffer) + plan.static.numel() * generated

