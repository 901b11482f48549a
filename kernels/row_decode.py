"""Decode attention over flattened (request, KV head) sequences that read pool rows in place, split into items.

SGLang's MHA pool holds a layer's keys as ``(slots, H, D)``; viewed as ``(slots * H, D)`` (a free ``view``),
row ``slot * H + h`` is head ``h`` of token ``slot``. Each flattened sequence (one request, one KV head) attends
to its own list of rows, so heads of one request may keep different tokens (static heads their pruned set,
dynamic heads text plus the chunks retrieved this step) and compressed and uncompressed requests share one
call per layer. Its queries are the GQA group of that KV head.

Work-item layout (FlashInfer's plan/run split): a sequence of ``n`` rows is cut into ``ceil(n / S)`` items of
at most ``S`` columns, so a sequence costs what its own length costs (plus less than one item of padding) and
one long sequence does not widen the others::

    rows:  (I, S) int  pool rows; entries where ``valid`` is False are ignored (any row in range)
    valid: (I, S) bool
    seq:   (I,)   int  the sequence each item belongs to (items of one sequence in any order)
    out = row_decode(q, k_rows, v_rows, rows, valid, seq, scale)       # (N, group, D)

A caller that runs many layers over one plan passes a :class:`Workspace`: the torch path gathers each layer's
rows into it instead of into fresh tensors (on CPU, two fresh multi-MB gathers per layer cost ~3x the attention
itself in page faults; FlashInfer's wrappers take a workspace buffer for the same reason).

Each item gives a partial softmax (unnormalised output, running max, sum of exponentials); a sequence's items
are then combined exactly (the split-K merge). The Triton path computes one item per program, then merges one
sequence per program over its items grouped by :func:`merge_index` (two launches per call; on the H200 the
torch merge's ~15 small launches per layer were three quarters of the eager decode attention's host time). The
torch reference computes all items with batched matmuls and merges with scatter/index-add (:func:`merge_items`);
it is also the CPU path.
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:  # Triton is optional: the torch path serves CPUs without the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


class Workspace:
    """Gather buffers of the torch path, reused by every call that passes the same workspace (one per decode
    plan: every layer gathers the same number of rows). Grown when a call needs more; never shrunk."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def buffers(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``(n, D)`` buffers of ``like``'s dtype and device."""
        if self._k is None or self._k.shape[0] < n or self._k.dtype != like.dtype or self._k.device != like.device:
            self._k = like.new_empty((n, like.shape[-1]))
            self._v = like.new_empty((n, like.shape[-1]))
        return self._k[:n], self._v[:n]


def merge_index(seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items grouped by sequence, for the Triton merge; batched over leading dims (a plan's layers).

    Args:
        seq: ``(..., I)`` int64 sequence of each item, in ``[0, n)``.
    Returns: ``order (..., I)`` item ids sorted by sequence and ``ptr (..., n + 1)``: sequence ``s``'s items are
    ``order[ptr[s]:ptr[s + 1]]``. Device work only (no host read).
    """
    sorted_seq, order = torch.sort(seq, dim=-1, stable=True)
    bounds = torch.arange(n + 1, device=seq.device, dtype=seq.dtype).expand(*seq.shape[:-1], n + 1)
    return order, torch.searchsorted(sorted_seq.contiguous(), bounds.contiguous())


def row_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, rows: torch.Tensor,
               valid: torch.Tensor, seq: torch.Tensor, scale: float, use_triton: bool | None = None,
               workspace: Workspace | None = None,
               merge: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of each sequence's ``group`` queries over the valid rows of its items.

    Args:
        q: ``(N, group, D)``.
        k_rows, v_rows: ``(R, D)`` the pool's flattened per-head rows.
        rows: ``(I, S)`` int32/int64 row ids; valid: ``(I, S)`` bool; seq: ``(I,)`` int64 in ``[0, N)``.
        workspace: gather buffers for the torch path (the Triton kernel reads rows in place).
        merge: ``merge_index(seq, N)`` if the caller built it once for many calls (Triton path; else built here).
    Returns: ``(N, group, D)`` in ``q``'s dtype; a sequence with no valid row gives zeros.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q.device)
    if q.shape[0] == 0 or rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.zeros_like(q)
    if use_triton:
        parts = _items_triton(q, k_rows, v_rows, rows, valid, seq, scale)
        return _merge_triton(*parts, *(merge if merge is not None else merge_index(seq, q.shape[0]))).to(q.dtype)
    parts = items_reference(q, k_rows, v_rows, rows, valid, seq, scale, workspace)
    return merge_items(*parts, seq, q.shape[0]).to(q.dtype)


def items_reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, rows: torch.Tensor,
                    valid: torch.Tensor, seq: torch.Tensor, scale: float,
                    workspace: Workspace | None = None) -> tuple[torch.Tensor, ...]:
    """Plain torch partials of every item: gather its rows, masked softmax statistics in float32.

    Returns: ``acc (I, group, D)`` unnormalised outputs, ``m (I, group)`` running max (``-inf`` for an item
    without valid rows), ``l (I, group)`` sums of ``exp(score - m)``.
    """
    i, s = rows.shape
    d = q.shape[-1]
    flat = rows.reshape(-1)
    if workspace is None:
        k, v = k_rows.index_select(0, flat), v_rows.index_select(0, flat)
    else:
        k, v = workspace.buffers(flat.shape[0], k_rows)
        torch.index_select(k_rows, 0, flat, out=k)
        torch.index_select(v_rows, 0, flat, out=v)
    k, v = k.view(i, s, d).float(), v.view(i, s, d).float()
    scores = torch.bmm(q.index_select(0, seq).float(), k.transpose(1, 2)).mul_(scale)  # (I, G, S)
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    m = scores.amax(-1)
    p = torch.exp(scores - _finite(m)[..., None])
    return torch.bmm(p, v), m, p.sum(-1)


def merge_items(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """Combine item partials into each sequence's attention output, ``(n, group, D)`` float32 (the exact
    log-sum-exp merge; no host sync)."""
    g = m.shape[1]
    best = torch.full((n, g), float("-inf"), device=m.device).scatter_reduce_(
        0, seq[:, None].expand(-1, g), m, "amax")
    w = torch.exp(m - _finite(best).index_select(0, seq))  # 0 for items without valid rows
    num = torch.zeros(n, g, acc.shape[-1], device=acc.device).index_add_(0, seq, acc * w[..., None])
    den = torch.zeros(n, g, device=m.device).index_add_(0, seq, l * w)
    return num / torch.where(den > 0, den, 1.0)[..., None]


def _finite(m: torch.Tensor) -> torch.Tensor:
    """``m`` with ``-inf`` raised to a finite floor, so that an empty item or sequence gives ``exp(-inf) = 0``
    rather than NaN (one op: the merge runs in every layer)."""
    return m.clamp_min(-1e30)


if triton is not None:

    @triton.jit
    def _item_kernel(Q, K, V, Rows, Valid, Seq, OutAcc, OutM, OutL, scale, S,
                     GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        item = tl.program_id(0)
        seq = tl.load(Seq + item).to(tl.int64)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        j = tl.arange(0, BLOCK)
        g_ok = g < GROUP
        q = tl.load(Q + (seq * GROUP + g[:, None]) * D + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for col in range(0, S, BLOCK):
            c = col + j
            in_range = c < S
            ok = (tl.load(Valid + item * S + c, mask=in_range, other=0) != 0) & in_range
            row = tl.load(Rows + item * S + c, mask=ok, other=0).to(tl.int64)
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
        tl.store(OutAcc + (item * GROUP + g[:, None]) * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(OutM + item * GROUP + g, m, mask=g_ok)
        tl.store(OutL + item * GROUP + g, l, mask=g_ok)


    @triton.jit
    def _merge_kernel(Acc, M, L, Order, Ptr, Out, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(Ptr + s)
        end = tl.load(Ptr + s + 1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        best = tl.full([G_PAD], float("-inf"), tl.float32)
        for k in range(start, end):
            item = tl.load(Order + k).to(tl.int64)
            best = tl.maximum(best, tl.load(M + item * GROUP + g, mask=g_ok, other=float("-inf")))
        safe = tl.where(best == float("-inf"), 0.0, best)  # a sequence without valid rows: every weight 0
        num = tl.zeros([G_PAD, D], tl.float32)
        den = tl.zeros([G_PAD], tl.float32)
        for k in range(start, end):
            item = tl.load(Order + k).to(tl.int64)
            w = tl.exp(tl.load(M + item * GROUP + g, mask=g_ok, other=float("-inf")) - safe)
            den += w * tl.load(L + item * GROUP + g, mask=g_ok, other=0.0)
            num += w[:, None] * tl.load(Acc + (item * GROUP + g[:, None]) * D + d[None, :], mask=g_ok[:, None],
                                        other=0.0)
        out = num / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(Out + (s * GROUP + g[:, None]) * D + d[None, :], out, mask=g_ok[:, None])


def _merge_triton(acc, m, l, order, ptr):
    """:func:`merge_items` as one program per sequence over its items (``order``/``ptr``: :func:`merge_index`)."""
    n, (g, d) = ptr.shape[0] - 1, acc.shape[1:]
    out = torch.empty(n, g, d, dtype=torch.float32, device=acc.device)
    if n:
        _merge_kernel[(n,)](acc, m, l, order.contiguous(), ptr.contiguous(), out, GROUP=g, G_PAD=next_pow2(g, 16),
                            D=d)
    return out


def _items_triton(q, k_rows, v_rows, rows, valid, seq, scale, block: int = 32):
    g, d = q.shape[1:]
    if d != next_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of two for the Triton decode kernel")
    i, s = rows.shape
    acc = torch.empty(i, g, d, dtype=torch.float32, device=q.device)
    m = torch.empty(i, g, dtype=torch.float32, device=q.device)
    l = torch.empty(i, g, dtype=torch.float32, device=q.device)
    # S is a runtime argument: a batch whose item width changes does not recompile the kernel.
    _item_kernel[(i,)](q.contiguous(), k_rows, v_rows, rows.contiguous(), valid.contiguous(), seq.contiguous(),
                       acc, m, l, scale, s, GROUP=g, G_PAD=next_pow2(g, 16), D=d, BLOCK=block)
    return acc, m, l
