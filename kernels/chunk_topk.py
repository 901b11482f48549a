"""Score every chunk of every dynamic (request, KV head) sequence and pick the top-k, for a whole batch.

Summaries are CSR like pages: sequence ``i`` owns summary rows ``sum_indptr[i]:sum_indptr[i+1]`` (one per
host chunk, in chunk order) and the matching host page ids ``chunk_pages``. Scores follow
``core.chunks.score_chunks``: ``q·mid + scale*|q|·half`` of the min/max box, max over the GQA group. One
launch scores the batch into a padded ``(N, C_max)`` matrix; ``torch.topk`` then picks per row, and the
chosen chunks come back as page ids, ready to append to the decode page lists.
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def score_chunks_batched(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sum_indptr: torch.Tensor,
                         scale: float, use_triton: bool | None = None) -> torch.Tensor:
    """Chunk scores of a batch.

    Args:
        q: ``(N, group, head_dim)`` the current queries of each dynamic sequence.
        kmin, kmax: ``(total_chunks, head_dim)`` summaries, CSR by ``sum_indptr (N+1,)``.
    Returns: ``(N, C_max)`` float32, ``-inf`` past each sequence's chunk count.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q.device)
    if use_triton and q.shape[0]:
        return _score_triton(q, kmin, kmax, sum_indptr, scale)
    return score_chunks_reference(q, kmin, kmax, sum_indptr, scale)


def score_chunks_reference(q, kmin, kmax, sum_indptr, scale):
    n = q.shape[0]
    counts = (sum_indptr[1:] - sum_indptr[:-1]).long()
    c_max = int(counts.max()) if n else 0
    slot = torch.arange(c_max, device=q.device)[None]
    ok = slot < counts[:, None]
    rows = (sum_indptr[:-1].long()[:, None] + slot).clamp(max=max(kmin.shape[0] - 1, 0))
    mid = (kmin.float() + kmax.float()) * 0.5
    half = (kmax.float() - kmin.float()) * 0.5
    if kmin.shape[0] == 0:
        return torch.full((n, c_max), float("-inf"), device=q.device)
    s = torch.einsum("ngd,ncd->ngc", q.float(), mid[rows]) + scale * torch.einsum("ngd,ncd->ngc", q.float().abs(), half[rows])
    return s.amax(1).masked_fill(~ok, float("-inf"))


def select_pages(scores: torch.Tensor, top_k: int, sum_indptr: torch.Tensor, chunk_pages: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` chunks per row as host page ids.

    Returns: ``pages (N, k)`` int32 (ascending chunk order; entries past a row's chunk count are -1) and
    ``counts (N,)`` of valid entries.
    """
    n, c_max = scores.shape
    k = min(top_k, c_max)
    counts = torch.minimum((sum_indptr[1:] - sum_indptr[:-1]).long(), torch.tensor(k))
    if k == 0:
        return torch.full((n, 0), -1, dtype=torch.int32, device=scores.device), counts
    ids = scores.topk(k, dim=-1).indices
    # Padding (-inf) sorts last in topk; put real ids first in ascending order, padding after.
    valid = torch.arange(k, device=scores.device)[None] < counts[:, None]
    ids = torch.where(valid, ids, c_max).sort(dim=-1).values
    flat = (sum_indptr[:-1].long()[:, None] + ids).clamp(max=max(chunk_pages.numel() - 1, 0))
    pages = torch.where(ids < c_max, chunk_pages.long()[flat], -1).to(torch.int32)
    return pages, counts


if triton is not None:

    @triton.jit
    def _score_kernel(Q, Kmin, Kmax, Indptr, Out, scale, c_max, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                      D: tl.constexpr, BLOCK_C: tl.constexpr):
        seq = tl.program_id(0)
        blk = tl.program_id(1)
        start = tl.load(Indptr + seq)
        count = tl.load(Indptr + seq + 1) - start
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < count
        q = tl.load(Q + (seq * GROUP + g[:, None]) * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)
        lo = tl.load(Kmin + (start + c[:, None]) * D + d[None, :], mask=c_ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(Kmax + (start + c[:, None]) * D + d[None, :], mask=c_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans((lo + hi) * 0.5)) + scale * tl.dot(tl.abs(q), tl.trans((hi - lo) * 0.5))
        s = tl.where((g < GROUP)[:, None], s, float("-inf"))
        best = tl.max(s, 0)
        best = tl.where(c_ok, best, float("-inf"))
        tl.store(Out + seq * c_max + c, best, mask=c < c_max)


def _score_triton(q, kmin, kmax, sum_indptr, scale):
    n, g, d = q.shape
    counts = sum_indptr[1:] - sum_indptr[:-1]
    c_max = int(counts.max())
    out = torch.empty(n, c_max, dtype=torch.float32, device=q.device)
    if c_max == 0:
        return out
    block = 64
    _score_kernel[(n, triton.cdiv(c_max, block))](q.contiguous(), kmin, kmax, sum_indptr, out, scale, c_max,
                                                  GROUP=g, G_PAD=next_pow2(g, 16), D=d, BLOCK_C=block)
    return out
