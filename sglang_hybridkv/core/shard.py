"""Tensor parallelism: this process's slice of a layer's KV heads, and how to see the other slices.

Under tensor parallelism rank ``r`` of ``n`` holds KV heads ``[r * h, (r + 1) * h)`` of ``n * h`` (and their
GQA query heads). Classification is per head, but the budget allocation (``core/budget.py``) is global over a
layer's heads, so a policy gathers the small per-head figures it allocates from (θ-mass need, head type,
coverage), allocates over all heads exactly as one rank would, and keeps its own slice. ``gather`` is the
engine's collective; ``core/`` never imports one (``runtime/compaction.py`` passes SGLang's TP group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class HeadShard:
    """One rank's KV heads.

    Attributes:
        rank: this rank's index in the group, ``0 <= rank < size``.
        size: ranks in the group (each holds the same number of KV heads).
        gather: ``(h, ...) -> (size * h, ...)``, every rank's tensor concatenated along dim 0 in rank order; a
            collective: every rank calls it the same number of times, in the same order, with equal shapes.
    """

    rank: int
    size: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"HeadShard rank={self.rank} is not in [0, size={self.size})")

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an all-heads ``(size * h, ...)`` tensor."""
        h = t.shape[0] // self.size
        return t[self.rank * h: (self.rank + 1) * h]


def gather_heads(shard: HeadShard | None, *per_head: torch.Tensor) -> list[torch.Tensor]:
    """All heads' values of ``(h,)`` per-head tensors (one collective for all of them); no-op without a shard.

    Values travel as float64 (exact for counts and flags) and come back on the CPU in their own dtypes.
    """
    if shard is None:
        return list(per_head)
    packed = torch.stack([t.detach().to("cpu", torch.float64) for t in per_head], dim=1)  # (h, k)
    every = shard.gather(packed)
    return [every[:, i].to(t.dtype) for i, t in enumerate(per_head)]
