"""Score every chunk of every flattened (request, KV head) sequence of a batch, straight from pool rows.

A dynamic head's chunk summaries live in the pool (``runtime/pool_region``): chunk ``c``'s per-channel min
key in a row of the layer's key buffer and its max key in the same row of the value buffer. Sequence ``i``
lists its summary rows in ``sum_rows[i, :n_chunks[i]]`` (static heads and uncompressed requests have none).
The score is ``core.chunks.score_chunks``'s: ``q·mid + scale*|q|·half`` of the min/max box, max over the
GQA group. :func:`select_chunks` then picks the top-k per sequence with fixed shapes (no host sync).
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def score_chunks_rows(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, sum_rows: torch.Tensor,
                      n_chunks: torch.Tensor, scale: float, use_triton: bool | None = None) -> torch.Tensor:
    """Chunk scores of a batch.

    Args:
        q: ``(N, group, D)`` current queries of each sequence.
        k_rows, v_rows: ``(R, D)`` flattened pool rows (min keys in ``k_rows``, max keys in ``v_rows``).
        sum_rows: ``(N, C)`` int summary rows; n_chunks: ``(N,)`` valid entries per sequence.
    Returns: ``(N, C)`` float32, ``-inf`` past each sequence's chunk count.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q.device)
    if use_triton and q.shape[0] and sum_rows.shape[1]:
        return _score_triton(q, k_rows, v_rows, sum_rows, n_chunks, scale)
    return score_chunks_rows_reference(q, k_rows, v_rows, sum_rows, n_chunks, scale)


def score_chunks_rows_reference(q, k_rows, v_rows, sum_rows, n_chunks, scale):
    n, c = sum_rows.shape
    if n == 0 or c == 0:
        return torch.full((n, c), float("-inf"), device=q.device)
    flat = sum_rows.reshape(-1).long()
    lo = k_rows.index_select(0, flat).view(n, c, -1).float()
    hi = v_rows.index_select(0, flat).view(n, c, -1).float()
    qf = q.float()
    s = torch.bmm(qf, (lo + hi).mul_(0.5).transpose(1, 2)) + scale * torch.bmm(qf.abs(), (hi - lo).mul_(0.5).transpose(1, 2))
    ok = torch.arange(c, device=q.device)[None] < n_chunks[:, None]
    return s.amax(1).masked_fill_(~ok, float("-inf"))


def select_chunks(scores: torch.Tensor, top_k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top chunks per sequence with a fixed output width.

    Args:
        scores: ``(N, C)`` from :func:`score_chunks_rows`.
        top_k: ``(N,)`` chunks each sequence retrieves (0 for sequences without retrieval).
        k_max: output width, ``>= top_k.max()`` and ``<= C``.
    Returns: ``ids (N, k_max)`` chunk ids (any value where not ``ok``), ``ok (N, k_max)`` bool.
    """
    n = scores.shape[0]
    if k_max == 0 or n == 0:
        return (torch.zeros(n, k_max, dtype=torch.long, device=scores.device),
                torch.zeros(n, k_max, dtype=torch.bool, device=scores.device))
    top = scores.topk(k_max, dim=-1)
    ok = (torch.arange(k_max, device=scores.device)[None] < top_k[:, None]) & torch.isfinite(top.values)
    return top.indices, ok


if triton is not None:

    @triton.jit
    def _score_kernel(Q, Kr, Vr, Rows, NChunks, Out, scale, C, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                      D: tl.constexpr, BLOCK_C: tl.constexpr):
        seq = tl.program_id(0)
        blk = tl.program_id(1)
        count = tl.load(NChunks + seq)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = c < C
        c_ok = (c < count) & c_in
        row = tl.load(Rows + seq * C + c, mask=c_ok, other=0).to(tl.int64)
        q = tl.load(Q + (seq * GROUP + g[:, None]) * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)
        lo = tl.load(Kr + row[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(Vr + row[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans((lo + hi) * 0.5)) + scale * tl.dot(tl.abs(q), tl.trans((hi - lo) * 0.5))
        s = tl.where((g < GROUP)[:, None], s, float("-inf"))
        best = tl.where(c_ok, tl.max(s, 0), float("-inf"))
        tl.store(Out + seq * C + c, best, mask=c_in)


def _score_triton(q, k_rows, v_rows, sum_rows, n_chunks, scale):
    n, g, d = q.shape
    c = sum_rows.shape[1]
    out = torch.empty(n, c, dtype=torch.float32, device=q.device)
    block = 32
    _score_kernel[(n, triton.cdiv(c, block))](q.contiguous(), k_rows, v_rows, sum_rows.contiguous(),
                                              n_chunks.contiguous(), out, scale, c, GROUP=g, G_PAD=next_pow2(g, 16),
                                              D=d, BLOCK_C=block)
    return out
