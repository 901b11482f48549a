"""Per-page channel-wise min and max keys (the chunk summaries dynamic heads are scored by).

Built at compaction for every media page of a dynamic head, and refreshed for a page whenever tokens are
appended to it (only the touched pages are passed in).
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def page_minmax(k_pages: torch.Tensor, page_ids: torch.Tensor, page_lens: torch.Tensor,
                use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max key over the valid tokens of each listed page.

    Args:
        k_pages: ``(num_pages, page_size, head_dim)``.
        page_ids: ``(P,)`` int pages to summarise.
        page_lens: ``(P,)`` int valid tokens per page, 1..page_size.
    Returns: ``kmin, kmax`` each ``(P, head_dim)`` in ``k_pages``' dtype.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(k_pages.device)
    if use_triton and page_ids.numel():
        return _page_minmax_triton(k_pages, page_ids, page_lens)
    return page_minmax_reference(k_pages, page_ids, page_lens)


def page_minmax_reference(k_pages, page_ids, page_lens):
    k = k_pages[page_ids.long()].float()  # (P, page, D)
    valid = torch.arange(k.shape[1], device=k.device)[None, :, None] < page_lens.to(k.device)[:, None, None]
    kmin = torch.where(valid, k, float("inf")).amin(1)
    kmax = torch.where(valid, k, float("-inf")).amax(1)
    return kmin.to(k_pages.dtype), kmax.to(k_pages.dtype)


if triton is not None:

    @triton.jit
    def _minmax_kernel(K, Ids, Lens, Min, Max, D: tl.constexpr, PAGE: tl.constexpr, D_PAD: tl.constexpr):
        i = tl.program_id(0)
        page = tl.load(Ids + i).to(tl.int64)
        n = tl.load(Lens + i)
        t = tl.arange(0, PAGE)
        d = tl.arange(0, D_PAD)
        ok = (t[:, None] < n) & (d[None, :] < D)
        k = tl.load(K + (page * PAGE + t[:, None]) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        kmin = tl.min(tl.where(ok, k, float("inf")), 0)
        kmax = tl.max(tl.where(ok, k, float("-inf")), 0)
        tl.store(Min + i * D + d, kmin.to(Min.dtype.element_ty), mask=d < D)
        tl.store(Max + i * D + d, kmax.to(Max.dtype.element_ty), mask=d < D)


def _page_minmax_triton(k_pages, page_ids, page_lens):
    p, d = page_ids.numel(), k_pages.shape[2]
    kmin = torch.empty(p, d, dtype=k_pages.dtype, device=k_pages.device)
    kmax = torch.empty_like(kmin)
    _minmax_kernel[(p,)](k_pages, page_ids, page_lens, kmin, kmax, D=d, PAGE=k_pages.shape[1],
                         D_PAD=next_pow2(d))
    return kmin, kmax
