"""Decode attention over flattened (request, KV head) sequences with per-sequence page lists.

One launch per layer covers the whole batch: every flattened sequence has one KV head and its GQA group as
query heads, so heads of one request may keep different tokens (static heads their pruned set, dynamic heads
text plus retrieved chunks). Long sequences are split along the KV axis (split-K) and merged by log-sum-exp.

Plan once per decode step, run in every layer::

    plan = PagedDecodePlan(indptr, last_page_len, page_size, group, head_dim)
    out = paged_decode(plan, q, k_pages, v_pages, indices, scale)   # (N, group, head_dim)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backend import next_pow2, triton_available

try:  # Triton is optional: the torch path serves CPUs without the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class PagedDecodePlan:
    """Host-side planning of one decode step, shared by all layers.

    Attributes:
        indptr: ``(N+1,)`` int32 CSR offsets into the page-id list.
        last_page_len: ``(N,)`` int32 valid tokens of each sequence's last page (1..page_size; any value
            for a sequence with no page).
        page_size, group, head_dim: layout.
        pages_per_split: pages one program handles (split-K granularity).
    """

    indptr: torch.Tensor
    last_page_len: torch.Tensor
    page_size: int
    group: int
    head_dim: int
    pages_per_split: int = 16

    def __post_init__(self) -> None:
        n_pages = (self.indptr[1:] - self.indptr[:-1]).to(torch.int64)
        self.num_seqs = int(n_pages.numel())
        self.max_pages = int(n_pages.max()) if self.num_seqs else 0
        self.num_splits = max(1, math.ceil(self.max_pages / self.pages_per_split))
        self.seq_lens = torch.where(n_pages > 0, (n_pages - 1) * self.page_size + self.last_page_len.to(torch.int64),
                                    torch.zeros_like(n_pages))


def paged_decode(plan: PagedDecodePlan, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 indices: torch.Tensor, scale: float, use_triton: bool | None = None) -> torch.Tensor:
    """Attention of each sequence's ``group`` queries over its pages.

    Args:
        q: ``(N, group, head_dim)``.
        k_pages, v_pages: ``(num_pages, page_size, head_dim)``.
        indices: ``(nnz_pages,)`` int32 page ids, CSR by ``plan.indptr``.
    Returns: ``(N, group, head_dim)`` in ``q``'s dtype; a sequence with no tokens gives zeros.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q.device)
    if use_triton:
        return _paged_decode_triton(plan, q, k_pages, v_pages, indices, scale)
    return paged_decode_reference(plan, q, k_pages, v_pages, indices, scale)


def paged_decode_reference(plan: PagedDecodePlan, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch: gather each sequence's pages into a padded batch, masked softmax (also the CPU path)."""
    n, g, d = q.shape
    if n == 0 or plan.max_pages == 0:
        return torch.zeros_like(q)
    ps = plan.page_size
    counts = (plan.indptr[1:] - plan.indptr[:-1]).to(torch.int64)
    slot = torch.arange(plan.max_pages, device=q.device)[None]
    valid_page = slot < counts[:, None]
    flat = (plan.indptr[:-1].to(torch.int64)[:, None] + slot).clamp(max=max(indices.numel() - 1, 0))
    page_ids = torch.where(valid_page, indices.to(torch.int64)[flat] if indices.numel() else flat, 0)
    k = k_pages[page_ids].reshape(n, plan.max_pages * ps, d)
    v = v_pages[page_ids].reshape(n, plan.max_pages * ps, d)
    valid = torch.arange(plan.max_pages * ps, device=q.device)[None] < plan.seq_lens.to(q.device)[:, None]
    s = torch.einsum("ngd,nld->ngl", q.float(), k.float()) * scale
    s.masked_fill_(~valid[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("ngl,nld->ngd", p, v.float()).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_split_kernel(Q, K, V, Indptr, Indices, LastLen, OutAcc, OutLse, scale,
                             GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                             PAGES_PER_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr):
        seq = tl.program_id(0)
        split = tl.program_id(1)
        start = tl.load(Indptr + seq)
        end = tl.load(Indptr + seq + 1)
        last_len = tl.load(LastLen + seq)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        t = tl.arange(0, PAGE)
        g_ok = g < GROUP
        q = tl.load(Q + (seq * GROUP + g[:, None]) * D + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        first = start + split * PAGES_PER_SPLIT
        for i in range(PAGES_PER_SPLIT):
            p = first + i
            if p < end:
                page = tl.load(Indices + p).to(tl.int64)
                n_valid = tl.where(p == end - 1, last_len, PAGE)
                t_ok = t < n_valid
                k = tl.load(K + (page * PAGE + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
                v = tl.load(V + (page * PAGE + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * scale
                s = tl.where(t_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp(m - m_new)
                pr = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(pr, 1)
                acc = acc * alpha[:, None] + tl.dot(pr, v)
                m = m_new
        base = seq * NUM_SPLITS + split
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(OutAcc + (base * GROUP + g[:, None]) * D + d[None, :], out, mask=g_ok[:, None])
        lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(OutLse + base * GROUP + g, lse, mask=g_ok)

    @triton.jit
    def _merge_splits_kernel(Acc, Lse, Out, GROUP: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             S_PAD: tl.constexpr):
        seq = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D)
        s_ok = s < NUM_SPLITS
        lse = tl.load(Lse + (seq * NUM_SPLITS + s) * GROUP + g, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - m_safe), 0.0)
        acc = tl.load(Acc + ((seq * NUM_SPLITS + s[:, None]) * GROUP + g) * D + d[None, :], mask=s_ok[:, None], other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + (seq * GROUP + g) * D + d, out.to(Out.dtype.element_ty))


def _paged_decode_triton(plan: PagedDecodePlan, q, k_pages, v_pages, indices, scale):
    n, g, d = q.shape
    out = torch.empty_like(q)
    if n == 0:
        return out
    if d != next_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of two for the Triton decode kernel")
    s = plan.num_splits
    acc = torch.empty(n, s, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, s, g, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _decode_split_kernel[(n, s)](q, k_pages, v_pages, plan.indptr, indices, plan.last_page_len, acc, lse, scale,
                                 GROUP=g, G_PAD=next_pow2(g, 16), D=d, PAGE=plan.page_size,
                                 PAGES_PER_SPLIT=plan.pages_per_split, NUM_SPLITS=s)
    _merge_splits_kernel[(n, g)](acc, lse, out, GROUP=g, D=d, NUM_SPLITS=s, S_PAD=next_pow2(s))
    return out
