"""The batched decode kernel (pool rows in place, work items) against plain per-sequence attention, torch and Triton."""

import pytest
import torch

from sglang_hybridkv.kernels.chunk_select import score_chunks_rows, score_chunks_rows_reference, select_chunks
from sglang_hybridkv.kernels.row_decode import Workspace, merge_index, merge_items, row_decode

from .conftest import tol, triton_or_skip

D = 64


def _batch(lens, group, dtype, split, seed=0):
    """Sequences of ``lens`` rows scattered over a row buffer, cut into items of ``split`` columns with invalid
    columns interleaved (a dropped buffer slot) and one empty item per sequence, items shuffled."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    total = 5 * (sum(lens) + split) + 7
    k = torch.randn(total, D, generator=g).to(dtype)
    v = torch.randn(total, D, generator=g).to(dtype)
    q = torch.randn(n, group, D, generator=g).to(dtype)
    rows, valid, seq = [], [], []
    for i, m in enumerate(lens):
        cols = torch.randint(0, total, (m + m // 3,), generator=g)
        ok = torch.ones(cols.numel(), dtype=torch.bool)
        ok[torch.randperm(cols.numel(), generator=g)[: m // 3]] = False  # holes: exactly m valid columns
        for start in range(0, cols.numel() + 1, split):  # the last item may be empty or partial
            part = torch.zeros(split, dtype=torch.long)
            pv = torch.zeros(split, dtype=torch.bool)
            c = cols[start: start + split]
            part[: c.numel()], pv[: c.numel()] = c, ok[start: start + split]
            rows.append(part), valid.append(pv), seq.append(i)
    order = torch.randperm(len(seq), generator=g)
    if not seq:
        return q, k, v, torch.zeros(0, split, dtype=torch.long), torch.zeros(0, split, dtype=torch.bool), \
            torch.zeros(0, dtype=torch.long)
    return q, k, v, torch.stack(rows)[order], torch.stack(valid)[order], torch.tensor(seq)[order]


def _independent(q, k, v, rows, valid, seq, scale):
    """Each sequence's valid rows gathered into one list, one softmax."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        mine = seq == i
        r = rows[mine][valid[mine]]
        if r.numel():
            out[i] = torch.softmax(q[i].float() @ k[r].float().T * scale, -1) @ v[r].float()
    return out


LENS = [[], [0], [1], [31], [33], [1, 0, 17, 300, 64], [5] * 16, [700, 3, 0, 513]]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("split", [16, 64])
def test_torch_path_matches_independent_attention(lens, group, split):
    q, k, v, rows, valid, seq = _batch(lens, group, torch.float32, split)
    out = row_decode(q, k, v, rows, valid, seq, D ** -0.5, use_triton=False)
    torch.testing.assert_close(out, _independent(q, k, v, rows, valid, seq, D ** -0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_independent_attention(lens, group, dtype):
    triton_or_skip("cpu")
    q, k, v, rows, valid, seq = _batch(lens, group, dtype, 64, seed=1)
    ref = _independent(q, k, v, rows, valid, seq, D ** -0.5)
    out = row_decode(q, k, v, rows, valid, seq, D ** -0.5, use_triton=True)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


def test_int32_rows_and_large_scores_stay_exact():
    """Row ids as int32 (the pool's own dtype) and scores large enough to overflow a naive exp."""
    q, k, v, rows, valid, seq = _batch([40, 90], 2, torch.float32, 16, seed=3)
    q = q * 30
    want = _independent(q, k, v, rows, valid, seq, D ** -0.5)
    torch.testing.assert_close(row_decode(q, k, v, rows.int(), valid, seq, D ** -0.5, use_triton=False), want,
                               rtol=1e-4, atol=1e-4)


def test_one_workspace_across_calls_of_changing_size_and_dtype():
    """A plan passes one workspace to every layer; a later call that needs more rows, fewer rows or another dtype
    must see only its own rows (no stale rows of an earlier, larger call)."""
    ws = Workspace()
    for i, (lens, dtype) in enumerate([([300, 64], torch.float32), ([1, 0, 17], torch.float32),
                                       ([700, 3, 0, 513], torch.float32), ([33], torch.bfloat16), ([], torch.float32)]):
        q, k, v, rows, valid, seq = _batch(lens, 2, dtype, 64, seed=10 + i)
        out = row_decode(q, k, v, rows, valid, seq, D ** -0.5, use_triton=False, workspace=ws)
        torch.testing.assert_close(out.float(), _independent(q, k, v, rows, valid, seq, D ** -0.5), **tol(dtype))


@pytest.mark.parametrize("group", [1, 2, 7])
def test_triton_merge_matches_the_torch_merge(group):
    """The Triton path's merge (one program per sequence over its items) against the scatter/index-add merge, on
    partials with sequences of no item, one item, many items in any order, and items without valid rows."""
    triton_or_skip("cpu")
    from sglang_hybridkv.kernels.row_decode import _merge_triton

    g = torch.Generator().manual_seed(group)
    n = 9
    seq = torch.tensor([4, 0, 4, 2, 8, 4, 0, 2, 2, 4, 6])  # sequences 1, 3, 5, 7 have no item
    i = seq.numel()
    acc = torch.randn(i, group, D, generator=g)
    m = torch.randn(i, group, generator=g) * 20
    l = torch.rand(i, group, generator=g) + 0.5
    m[3], acc[3], l[3] = float("-inf"), 0.0, 0.0  # an item of sequence 2 without valid rows
    m[4], acc[4], l[4] = float("-inf"), 0.0, 0.0  # sequence 8's only item has none: zeros
    order, ptr = merge_index(seq, n)
    assert ptr.tolist() == [0, 2, 2, 5, 5, 9, 9, 10, 10, 11]
    out = _merge_triton(acc, m, l, order, ptr)
    torch.testing.assert_close(out, merge_items(acc, m, l, seq, n), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[8], torch.zeros(group, D)) and torch.equal(out[1], torch.zeros(group, D))


def test_merge_index_is_batched_over_layers():
    seq = torch.tensor([[1, 0, 1], [2, 2, 0]])
    order, ptr = merge_index(seq, 3)
    assert order.tolist() == [[1, 0, 2], [2, 0, 1]] and ptr.tolist() == [[0, 1, 3, 3], [0, 1, 1, 3]]


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
