"""The batched decode kernel (pool rows in place) against plain per-sequence attention, torch and Triton."""

import pytest
import torch

from sglang_hybridkv.kernels.chunk_select import score_chunks_rows, score_chunks_rows_reference, select_chunks
from sglang_hybridkv.kernels.row_decode import row_decode, row_decode_reference

from .conftest import tol, triton_or_skip

D = 64


def _batch(lens, group, dtype, seed=0, width_pad=3):
    """Sequences of ``lens`` valid rows scattered over a row buffer, with invalid columns interleaved."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    width = (max(lens) if lens else 0) + width_pad
    rows = 5 * width * max(n, 1) + 7
    k = torch.randn(rows, D, generator=g).to(dtype)
    v = torch.randn(rows, D, generator=g).to(dtype)
    q = torch.randn(n, group, D, generator=g).to(dtype)
    idx = torch.randint(0, rows, (n, width), generator=g)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for i, m in enumerate(lens):  # valid columns at random places, not a prefix
        valid[i, torch.randperm(width, generator=g)[:m]] = True
    return q, k, v, idx, valid


def _independent(q, k, v, idx, valid, scale):
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        rows = idx[i][valid[i]]
        if rows.numel():
            out[i] = torch.softmax(q[i].float() @ k[rows].float().T * scale, -1) @ v[rows].float()
    return out


LENS = [[], [0], [1], [31], [33], [1, 0, 17, 300, 64], [5] * 16]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
def test_reference_matches_independent_attention(lens, group):
    q, k, v, idx, valid = _batch(lens, group, torch.float32)
    out = row_decode_reference(q, k, v, idx, valid, D ** -0.5)
    torch.testing.assert_close(out, _independent(q, k, v, idx, valid, D ** -0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(lens, group, dtype):
    triton_or_skip("cpu")
    q, k, v, idx, valid = _batch(lens, group, dtype, seed=1)
    ref = row_decode_reference(q, k, v, idx, valid, D ** -0.5)
    out = row_decode(q, k, v, idx, valid, D ** -0.5, use_triton=True)
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


def test_triton_splits_long_rows():
    """More columns than one split (256) exercises the log-sum-exp merge."""
    triton_or_skip("cpu")
    q, k, v, idx, valid = _batch([700, 3, 0, 513], 7, torch.float32, seed=2)
    out = row_decode(q, k, v, idx, valid, D ** -0.5, use_triton=True)
    torch.testing.assert_close(out, _independent(q, k, v, idx, valid, D ** -0.5), rtol=1e-4, atol=1e-4)


def _chunks(n, c, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 4 * n * max(c, 1) + 3
    lo = torch.randn(rows, D, generator=g)
    hi = lo + torch.rand(rows, D, generator=g)
    q = torch.randn(n, group, D, generator=g)
    sum_rows = torch.randint(0, rows, (n, c), generator=g)
    n_chunks = torch.randint(0, c + 1, (n,), generator=g)
    return q, lo, hi, sum_rows, n_chunks


@pytest.mark.parametrize("n,c", [(0, 4), (1, 1), (5, 37), (9, 70)])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_chunk_scores_match_core_definition(n, c, group):
    from sglang_hybridkv.core.chunks import score_chunks

    q, lo, hi, sum_rows, n_chunks = _chunks(n, c, group)
    s = score_chunks_rows_reference(q, lo, hi, sum_rows, n_chunks, 0.25)
    for i in range(n):
        m = int(n_chunks[i])
        want = score_chunks(q[i][None, None], lo[sum_rows[i, :m]][None], hi[sum_rows[i, :m]][None], 0.25)[0, 0]
        torch.testing.assert_close(s[i, :m], want, rtol=1e-4, atol=1e-4)
        assert torch.isinf(s[i, m:]).all()
    triton_or_skip("cpu")
    torch.testing.assert_close(score_chunks_rows(q, lo, hi, sum_rows, n_chunks, 0.25, use_triton=True), s,
                               rtol=1e-4, atol=1e-4)


def test_select_chunks_respects_per_row_k_and_chunk_count():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [3.0, 1.0, 2.0, 0.0], [float("-inf")] * 4])
    ids, ok = select_chunks(scores, torch.tensor([2, 1, 3]), 3)
    assert ok.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    assert ids[0, :2].tolist() == [1, 2] and ids[1, 0].item() == 0
