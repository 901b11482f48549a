"""Text-prior scores: observation-window attention over all prompt keys, averaged over window and GQA group.

Streams over the keys in blocks (two passes: log-sum-exp per window query, then normalised probabilities summed
per key), so ``(heads, window, N)`` is never materialised. Keys are read straight from SGLang's token-pool layout
``(num_slots, num_kv_heads, head_dim)`` through the request's slot list.
"""

from __future__ import annotations

import torch

from .backend import next_pow2, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def window_scores(q_win: torch.Tensor, k_buf: torch.Tensor, slots: torch.Tensor, scale: float,
                  use_triton: bool | None = None) -> torch.Tensor:
    """Mean attention probability each prompt key gets from the window.

    Args:
        q_win: ``(num_q_heads, w, head_dim)`` queries of the last ``w`` prompt positions.
        k_buf: ``(num_slots, num_kv_heads, head_dim)`` token pool of one layer.
        slots: ``(L,)`` the request's slots in prompt order (``w <= L``).
    Returns: ``(num_kv_heads, L)`` float32; window query ``i`` sits at position ``L - w + i`` (causal).
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(q_win.device)
    if use_triton and slots.numel():
        return _window_scores_triton(q_win, k_buf, slots, scale)
    return window_scores_reference(q_win, k_buf, slots, scale)


def window_scores_reference(q_win, k_buf, slots, scale):
    hq, w, d = q_win.shape
    h = k_buf.shape[1]
    n = slots.numel()
    k = k_buf[slots.long()].transpose(0, 1).float()  # (H, L, D)
    qg = q_win.float().view(h, hq // h, w, d)
    s = torch.einsum("hgwd,hld->hgwl", qg, k) * scale
    future = torch.arange(n, device=q_win.device)[None] > torch.arange(n - w, n, device=q_win.device)[:, None]
    s.masked_fill_(future, float("-inf"))
    return torch.softmax(s, -1).mean(dim=(1, 2))


if triton is not None:

    @triton.jit
    def _lse_kernel(Q, K, Slots, Lse, scale, n, w, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        h = tl.program_id(0)
        r = tl.arange(0, M_PAD)
        m_ok = r < GROUP * w
        qh = h * GROUP + r // w  # query head of row r
        qi = r % w  # window index of row r
        d = tl.arange(0, D)
        q = tl.load(Q + ((qh * w + qi) * D)[:, None] + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        pos = n - w + qi
        m = tl.full([M_PAD], float("-inf"), tl.float32)
        l = tl.zeros([M_PAD], tl.float32)
        for start in range(0, n, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < n
            slot = tl.load(Slots + j, mask=j_ok, other=0).to(tl.int64)
            k = tl.load(K + ((slot * H + h) * D)[:, None] + d[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((j[None, :] <= pos[:, None]) & j_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        tl.store(Lse + h * M_PAD + r, m + tl.log(l), mask=m_ok)

    @triton.jit
    def _prob_sum_kernel(Q, K, Slots, Lse, Out, scale, n, w, H: tl.constexpr, GROUP: tl.constexpr,
                         D: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        h = tl.program_id(0)
        blk = tl.program_id(1)
        r = tl.arange(0, M_PAD)
        m_ok = r < GROUP * w
        qh = h * GROUP + r // w
        qi = r % w
        d = tl.arange(0, D)
        q = tl.load(Q + ((qh * w + qi) * D)[:, None] + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        lse = tl.load(Lse + h * M_PAD + r, mask=m_ok, other=0.0)
        pos = n - w + qi
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = j < n
        slot = tl.load(Slots + j, mask=j_ok, other=0).to(tl.int64)
        k = tl.load(K + ((slot * H + h) * D)[:, None] + d[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = (j[None, :] <= pos[:, None]) & j_ok[None, :] & m_ok[:, None]
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        tl.store(Out + h * n + j, tl.sum(p, 0) / (GROUP * w), mask=j_ok)


def _window_scores_triton(q_win, k_buf, slots, scale):
    hq, w, d = q_win.shape
    h = k_buf.shape[1]
    n = slots.numel()
    group = hq // h
    m_pad = next_pow2(group * w, 16)
    block = 64
    lse = torch.empty(h, m_pad, dtype=torch.float32, device=q_win.device)
    out = torch.empty(h, n, dtype=torch.float32, device=q_win.device)
    q = q_win.contiguous()
    _lse_kernel[(h,)](q, k_buf, slots, lse, scale, n, w, H=h, GROUP=group, D=d, M_PAD=m_pad, BLOCK_N=block)
    _prob_sum_kernel[(h, triton.cdiv(n, block))](q, k_buf, slots, lse, out, scale, n, w, H=h, GROUP=group, D=d,
                                                 M_PAD=m_pad, BLOCK_N=block)
    return out
