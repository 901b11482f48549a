"""Per-step page lists: each dynamic sequence's retrieved chunks joined to its resident pages.

Resident pages (static heads' kept tokens; dynamic heads' text, the media remainder and decoded tokens) form a
CSR whose last page per sequence may be partial. Retrieved chunks are always full pages (the host tier only
holds whole chunks), so they are put *before* a sequence's resident pages and the CSR invariant holds: only
the last page of a sequence is partial. Key order does not matter to attention (positions are in the keys).
"""

from __future__ import annotations

import torch


def join_retrieved(indptr: torch.Tensor, indices: torch.Tensor, dyn_seqs: torch.Tensor, sel_pages: torch.Tensor,
                   sel_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend each dynamic sequence's selected pages to its resident pages.

    Args:
        indptr, indices: resident CSR over ``N`` sequences.
        dyn_seqs: ``(N_d,)`` sequence ids of dynamic heads.
        sel_pages: ``(N_d, k)`` page ids; the first ``sel_counts[r]`` of row ``r`` are valid.
    Returns: the joined ``indptr (N+1,)`` and ``indices`` (int32); ``last_page_len`` is unchanged.
    """
    dev = indices.device
    base = (indptr[1:] - indptr[:-1]).long()
    extra = torch.zeros_like(base)
    extra[dyn_seqs.long()] = sel_counts.long()
    counts = base + extra
    new_indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dev)
    new_indptr[1:] = counts.cumsum(0)
    out = torch.empty(int(new_indptr[-1]), dtype=torch.int32, device=dev)
    # Resident pages, shifted right by the number of retrieved pages of their sequence.
    seq = torch.repeat_interleave(torch.arange(base.numel(), device=dev), base)
    j = torch.arange(int(base.sum()), device=dev) - indptr[:-1].long()[seq]
    out[new_indptr[:-1][seq] + extra[seq] + j] = indices.to(torch.int32)
    # Retrieved pages first.
    k = sel_pages.shape[1]
    if k and dyn_seqs.numel():
        valid = torch.arange(k, device=dev)[None] < sel_counts.long()[:, None]
        dest = new_indptr[:-1][dyn_seqs.long()][:, None] + torch.arange(k, device=dev)[None]
        out[dest[valid]] = sel_pages[valid].to(torch.int32)
    return new_indptr.to(torch.int32), out


def fetch_pages(host_k: torch.Tensor, host_v: torch.Tensor, host_ids: torch.Tensor, dev_k: torch.Tensor,
                dev_v: torch.Tensor, buffer_ids: torch.Tensor) -> None:
    """Copy host-tier pages ``host_ids`` into the device buffer pages ``buffer_ids`` (same shape, ``-1`` skipped).

    On a GPU the host tier is pinned CPU memory and the copy is asynchronous; on a CPU both tiers are RAM.
    """
    ok = host_ids >= 0
    src = host_ids[ok].long().to(host_k.device)
    dst = buffer_ids[ok].long().to(dev_k.device)
    dev_k.index_copy_(0, dst, host_k.index_select(0, src).to(dev_k.device, non_blocking=True))
    dev_v.index_copy_(0, dst, host_v.index_select(0, src).to(dev_v.device, non_blocking=True))
