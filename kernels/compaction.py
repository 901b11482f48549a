"""Compaction: copy each head's surviving tokens from the staging token pool into its own pages.

Flattened sequence ``s`` is one (request, KV head): it reads head ``head_of[s]`` of the staging slots
``tok_slots[tok_indptr[s]:tok_indptr[s+1]]`` (in order) and writes them densely into pages
``dst_pages[page_indptr[s]:...]``; the last page may be partly filled.
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def compact_to_pages(k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     head_of: torch.Tensor, tok_indptr: torch.Tensor, tok_slots: torch.Tensor,
                     page_indptr: torch.Tensor, dst_pages: torch.Tensor, use_triton: bool | None = None) -> None:
    """In place: ``k_pages/v_pages (num_pages, page, D)`` receive tokens from ``k_buf/v_buf (slots, H, D)``."""
    if use_triton is None:
        use_triton = triton is not None and triton_available(k_buf.device)
    if use_triton and head_of.numel():
        _compact_triton(k_buf, v_buf, k_pages, v_pages, head_of, tok_indptr, tok_slots, page_indptr, dst_pages)
    else:
        compact_to_pages_reference(k_buf, v_buf, k_pages, v_pages, head_of, tok_indptr, tok_slots, page_indptr,
                                   dst_pages)


def compact_to_pages_reference(k_buf, v_buf, k_pages, v_pages, head_of, tok_indptr, tok_slots, page_indptr,
                               dst_pages):
    page = k_pages.shape[1]
    counts = (tok_indptr[1:] - tok_indptr[:-1]).long()
    if int(counts.sum()) == 0:
        return
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    i = torch.arange(int(counts.sum()), device=counts.device) - tok_indptr[:-1].long()[seq]
    src = tok_slots.long()
    dst_page = dst_pages.long()[page_indptr[:-1].long()[seq] + i // page]
    heads = head_of.long()[seq]
    k_pages[dst_page, i % page] = k_buf[src, heads].to(k_pages.dtype)
    v_pages[dst_page, i % page] = v_buf[src, heads].to(v_pages.dtype)


if triton is not None:

    @triton.jit
    def _compact_kernel(Kb, Vb, Kp, Vp, HeadOf, TokPtr, TokSlots, PagePtr, DstPages, H: tl.constexpr,
                        D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr):
        s = tl.program_id(0)
        p = tl.program_id(1)
        start = tl.load(TokPtr + s)
        count = tl.load(TokPtr + s + 1) - start
        if p * PAGE < count:
            head = tl.load(HeadOf + s).to(tl.int64)
            page = tl.load(DstPages + tl.load(PagePtr + s) + p).to(tl.int64)
            t = tl.arange(0, PAGE)
            d = tl.arange(0, D_PAD)
            t_ok = p * PAGE + t < count
            ok = t_ok[:, None] & (d[None, :] < D)
            slot = tl.load(TokSlots + start + p * PAGE + t, mask=t_ok, other=0).to(tl.int64)
            src = ((slot * H + head) * D)[:, None] + d[None, :]
            dst = ((page * PAGE + t) * D)[:, None] + d[None, :]
            tl.store(Kp + dst, tl.load(Kb + src, mask=ok).to(Kp.dtype.element_ty), mask=ok)
            tl.store(Vp + dst, tl.load(Vb + src, mask=ok).to(Vp.dtype.element_ty), mask=ok)


def _compact_triton(k_buf, v_buf, k_pages, v_pages, head_of, tok_indptr, tok_slots, page_indptr, dst_pages):
    page = k_pages.shape[1]
    h, d = k_buf.shape[1], k_buf.shape[2]
    max_pages = int(((tok_indptr[1:] - tok_indptr[:-1] + page - 1) // page).max())
    if max_pages == 0:
        return
    _compact_kernel[(head_of.numel(), max_pages)](k_buf, v_buf, k_pages, v_pages, head_of, tok_indptr, tok_slots,
                                                  page_indptr, dst_pages, H=h, D=d, D_PAD=next_pow2(d), PAGE=page)
