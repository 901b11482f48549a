"""The retrieval copy (host-tier rows into pool rows) against a per-row loop, torch and Triton."""

import pytest
import torch

from sglang_hybridkv.kernels.row_copy import copy_rows, copy_rows_reference

from .conftest import triton_or_skip


def _case(m, d, dtype, seed=0):
    """``m`` copies from a 97-row source into distinct rows 1.. of a 64-row destination (row 0 is the padding
    row that unwritten entries may hit), plus a fresh destination to compare against."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(97, d, generator=g).to(dtype)
    dst = torch.randn(64, d, generator=g).to(dtype)
    src_idx = torch.randint(0, 97, (m,), generator=g)
    dst_idx = torch.randperm(63, generator=g)[:m] + 1
    return src, src_idx, dst, dst_idx


def _loop(src, src_idx, dst, dst_idx):
    out = dst.clone()
    for s, t in zip(src_idx.tolist(), dst_idx.tolist()):
        out[t] = src[s]
    return out


@pytest.mark.parametrize("m", [0, 1, 15, 17, 33, 63])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_triton", [False, True])
def test_copy_rows_matches_a_per_row_loop(m, d, dtype, use_triton):
    if use_triton:
        triton_or_skip("cpu")
    src, src_idx, dst, dst_idx = _case(m, d, dtype, seed=m + d)
    want = _loop(src, src_idx, dst, dst_idx)
    copy_rows(src, src_idx, dst, dst_idx, use_triton=use_triton)
    assert torch.equal(dst, want)  # a copy, so exactly equal


def test_unwritten_entries_only_touch_the_padding_row():
    """The decode path sends entries it does not write to row 0; every other row stays as the loop leaves it."""
    triton_or_skip("cpu")
    src, src_idx, dst, dst_idx = _case(20, 64, torch.float32)
    dst_idx[::3] = 0
    want = dst.clone()
    copy_rows_reference(src, src_idx, want, dst_idx)
    copy_rows(src, src_idx, dst, dst_idx, use_triton=True)
    assert torch.equal(dst[1:], want[1:])
