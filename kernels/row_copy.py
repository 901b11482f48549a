"""Copy listed rows of one row buffer into listed rows of another: the retrieval step of dynamic heads.

Every decode step, each dynamic head's selected chunks move from the host tier (``(pages * chunk, D)`` rows)
into its retrieval-buffer rows of the pool view (``(slots * H, D)``)::

    copy_rows(src, src_idx, dst, dst_idx)      # dst[dst_idx[i]] = src[src_idx[i]]

On a GPU server the host tier is pinned host memory: the Triton kernel reads it in place through unified
virtual addressing (a pinned page is addressable from the device), so the copy is one kernel launch with no
host synchronisation, which a CUDA graph can capture; only the selected rows cross the bus. The torch
reference (``index_select`` + ``index_copy_``) is the CPU path and what the kernel is tested against.
"""

from __future__ import annotations

import functools

import torch

from .backend import next_pow2, triton_available

try:  # Triton is optional: the torch path serves CPUs without the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def copy_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor,
              use_triton: bool | None = None) -> None:
    """``dst[dst_idx[i]] = src[src_idx[i]]`` for every ``i``, in place.

    Args:
        src: ``(S, D)`` rows of ``dst``'s dtype, on ``dst``'s device or, when ``dst`` is on a CUDA device, in
            pinned host memory.
        src_idx, dst_idx: ``(M,)`` integer row ids on ``dst``'s device. Repeated ``dst_idx`` entries must be
            rows nobody reads (the decode path sends unwritten entries to the pool's padding row 0).
        dst: ``(R, D)``, contiguous.
    """
    if use_triton is None:
        use_triton = triton is not None and triton_available(dst.device)
    if use_triton:
        _copy_rows_triton(src, src_idx, dst, dst_idx)
    else:
        copy_rows_reference(src, src_idx, dst, dst_idx)


def copy_rows_reference(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """Plain torch (a device-to-host-to-device round trip when ``src`` is on the host)."""
    rows = src.index_select(0, src_idx.to(src.device).long()).to(dst.device)
    dst.index_copy_(0, dst_idx.long(), rows)


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(Src, SrcIdx, Dst, DstIdx, M, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, D_PAD)
        ok = i < M
        s = tl.load(SrcIdx + i, mask=ok, other=0).to(tl.int64)
        t = tl.load(DstIdx + i, mask=ok, other=0).to(tl.int64)
        m = ok[:, None] & (d[None, :] < D)
        x = tl.load(Src + s[:, None] * D + d[None, :], mask=m, other=0.0)
        tl.store(Dst + t[:, None] * D + d[None, :], x, mask=m)


def _copy_rows_triton(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    m, d = src_idx.numel(), dst.shape[-1]
    if m == 0:
        return
    assert src.is_contiguous() and dst.is_contiguous() and src.shape[-1] == d and src.dtype == dst.dtype
    block = 16
    _copy_rows_kernel[(triton.cdiv(m, block),)](src, src_idx, dst, dst_idx, m, D=d, D_PAD=next_pow2(d),
                                                  BLOCK=block)


@functools.lru_cache(maxsize=None)
def pinned_reads_supported(device: torch.device) -> bool:
    """Whether :func:`copy_rows` on ``device`` reads pinned host rows correctly (probed once per process)."""
    if device.type != "cuda" or triton is None or not triton_available(device):
        return False
    try:
        src = torch.arange(8 * 16, dtype=torch.float32).view(8, 16).pin_memory()
        dst = torch.zeros(4, 16, device=device)
        idx = torch.tensor([5, 1, 7, 2], device=device)
        copy_rows(src, idx, dst, torch.arange(4, device=device))
        return torch.equal(dst.cpu(), src[idx.cpu()])
    except Exception:  # noqa: BLE001 - any failure means: keep the tier on the device
        return False
