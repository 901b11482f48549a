"""Decode attention over flattened (request, KV head) sequences that read pool rows in place.

SGLang's MHA pool holds a layer's keys as ``(slots, H, D)``; viewed as ``(slots * H, D)`` (a free ``view``),
row ``slot * H + h`` is head ``h`` of token ``slot``. Each flattened sequence (one request, one KV head) lists
the rows it attends to in one row of an index matrix, so heads of one request may keep different tokens
(static heads their pruned set, dynamic heads text plus the chunks retrieved this step) and compressed and
uncompressed requests share one call per layer. Its queries are the GQA group of that KV head.

Padded layout (fixed shapes, so a CUDA graph can capture the call once ``W`` is fixed)::

    idx:   (N, W) int  rows of k_rows / v_rows; entries where ``valid`` is False are ignored (any row in range)
    valid: (N, W) bool
    out = row_decode(q, k_rows, v_rows, idx, valid, scale)        # (N, group, D)

The Triton kernel splits ``W`` into ``num_splits`` parts (split-K) and merges them by log-sum-exp; the torch
reference gathers the rows into a padded batch and runs a masked softmax (it is also the CPU path).
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:  # Triton is optional: the torch path serves CPUs without the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def row_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, idx: torch.Tensor,
               valid: torch.Tensor, scale: float, use_triton: bool | None = None) -> torch.Tensor:
    """Attention of each sequence's ``group`` queries over its valid rows.

    Args:
        q: ``(N, group, D)``.
        k_rows, v_rows: ``(R, D)`` the pool's flattened per-head rows.
        idx: ``(N, W)`` int32/int64 row ids; valid: ``(N, W)`` bool.
    Returns: ``(N, group, D)`` in ``q``'s dtype; a sequence with no valid row gives zeros.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q.device)
    if use_triton:
        return _row_decode_triton(q, k_rows, v_rows, idx, valid, scale)
    return row_decode_reference(q, k_rows, v_rows, idx, valid, scale)


def row_decode_reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, idx: torch.Tensor,
                         valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch: gather rows into ``(N, W, D)``, masked softmax in float32."""
    n, g, d = q.shape
    if n == 0 or idx.shape[1] == 0:
        return torch.zeros_like(q)
    flat = idx.reshape(-1).long()
    k = k_rows.index_select(0, flat).view(n, -1, d)
    v = v_rows.index_select(0, flat).view(n, -1, d)
    s = torch.bmm(q.float(), k.float().transpose(1, 2)) * scale  # (N, G, W)
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
    return torch.bmm(p, v.float()).to(q.dtype)


if triton is not None:

    @triton.jit
    def _row_split_kernel(Q, K, V, Idx, Valid, OutAcc, OutLse, scale, W, cols_per_split,
                          GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        seq = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        j = tl.arange(0, BLOCK)
        g_ok = g < GROUP
        q = tl.load(Q + (seq * GROUP + g[:, None]) * D + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        start = split * cols_per_split
        end = tl.minimum(start + cols_per_split, W)
        for col in range(start, end, BLOCK):
            c = col + j
            in_range = c < end
            ok = (tl.load(Valid + seq * W + c, mask=in_range, other=0) != 0) & in_range
            row = tl.load(Idx + seq * W + c, mask=ok, other=0).to(tl.int64)
            k = tl.load(K + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None] + tl.dot(pr, v)
            m = m_new
        base = seq * num_splits + split
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(OutAcc + (base * GROUP + g[:, None]) * D + d[None, :], out, mask=g_ok[:, None])
        lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(OutLse + base * GROUP + g, lse, mask=g_ok)

    @triton.jit
    def _merge_splits_kernel(Acc, Lse, Out, num_splits, GROUP: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr):
        seq = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D)
        s_ok = s < num_splits
        lse = tl.load(Lse + (seq * num_splits + s) * GROUP + g, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - m_safe), 0.0)
        acc = tl.load(Acc + ((seq * num_splits + s[:, None]) * GROUP + g) * D + d[None, :], mask=s_ok[:, None],
                      other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + (seq * GROUP + g) * D + d, out.to(Out.dtype.element_ty))


def _row_decode_triton(q, k_rows, v_rows, idx, valid, scale, block: int = 32, cols_per_split: int = 256):
    n, g, d = q.shape
    out = torch.empty_like(q)
    if n == 0:
        return out
    if d != next_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of two for the Triton decode kernel")
    w = idx.shape[1]
    splits = max(1, -(-w // cols_per_split))
    acc = torch.empty(n, splits, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, splits, g, dtype=torch.float32, device=q.device)
    _row_split_kernel[(n, splits)](q.contiguous(), k_rows, v_rows, idx.contiguous(), valid.contiguous(), acc, lse,
                                   scale, w, cols_per_split, GROUP=g, G_PAD=next_pow2(g, 16), D=d, BLOCK=block)
    # The split count is a runtime argument (only its power-of-two padding is compiled in), so a growing
    # sequence does not recompile the kernels every cols_per_split tokens.
    _merge_splits_kernel[(n, g)](acc, lse, out, splits, GROUP=g, D=d, S_PAD=next_pow2(splits))
    return out
