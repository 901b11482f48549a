import pytest
import torch

from sglang_hybridkv.core.chunks import chunk_summaries, score_chunks
from sglang_hybridkv.kernels.chunk_summary import page_minmax, page_minmax_reference
from sglang_hybridkv.kernels.chunk_topk import score_chunks_batched, score_chunks_reference, select_pages

from .conftest import tol, triton_or_skip

PAGE, D = 16, 64


@pytest.mark.parametrize("n", [1, 16, 37, 100])
def test_page_minmax_reference_matches_core_summaries(n):
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(1, n, D, generator=g)
    pages = (n + PAGE - 1) // PAGE
    kp = torch.nn.functional.pad(keys[0], (0, 0, 0, pages * PAGE - n)).view(pages, PAGE, D)
    lens = torch.tensor([PAGE] * (pages - 1) + [n - (pages - 1) * PAGE])
    kmin, kmax = page_minmax_reference(kp, torch.arange(pages), lens)
    cmin, cmax = chunk_summaries(keys, PAGE)
    torch.testing.assert_close(kmin, cmin[0])
    torch.testing.assert_close(kmax, cmax[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[1], [16], [3, 16, 9, 1]])
def test_page_minmax_triton(device, dtype, lens):
    triton_or_skip(device)
    kp = torch.randn(10, PAGE, D).to(dtype).to(device)
    ids = torch.tensor([7, 0, 3, 9][: len(lens)], dtype=torch.int32, device=device)
    pl = torch.tensor(lens, dtype=torch.int32, device=device)
    a = page_minmax(kp, ids, pl, use_triton=True)
    b = page_minmax_reference(kp, ids, pl)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def _summaries(counts, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(counts)
    kmin = torch.randn(total, D, generator=g)
    kmax = kmin + torch.rand(total, D, generator=g)
    indptr = torch.tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(len(counts), group, D, generator=g)
    return q.to(dtype), kmin.to(dtype), kmax.to(dtype), indptr


@pytest.mark.parametrize("counts", [[1], [0, 5], [70, 3, 129]])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_batched_scores_match_core_scores(counts, group):
    q, kmin, kmax, indptr = _summaries(counts, group, torch.float32, seed=group)
    s = score_chunks_reference(q, kmin, kmax, indptr, 0.25)
    for i, c in enumerate(counts):
        rows = slice(int(indptr[i]), int(indptr[i + 1]))
        core = score_chunks(q[i][None, None], kmin[rows][None], kmax[rows][None], 0.25)[0, 0]
        torch.testing.assert_close(s[i, :c], core, rtol=1e-5, atol=1e-5)
        assert torch.all(s[i, c:] == float("-inf"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[1], [0, 5], [70, 3, 129]])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_batched_scores_triton(device, dtype, counts, group):
    triton_or_skip(device)
    q, kmin, kmax, indptr = (x.to(device) for x in _summaries(counts, group, dtype, seed=3))
    a = score_chunks_batched(q, kmin, kmax, indptr, 0.25, use_triton=True)
    b = score_chunks_reference(q, kmin, kmax, indptr, 0.25)
    torch.testing.assert_close(a, b, **tol(dtype))


def test_select_pages_returns_host_page_ids():
    scores = torch.tensor([[0.1, 9.0, 3.0, float("-inf")], [5.0, float("-inf"), float("-inf"), float("-inf")]])
    indptr = torch.tensor([0, 3, 4], dtype=torch.int32)
    chunk_pages = torch.tensor([40, 41, 42, 77], dtype=torch.int32)
    pages, counts = select_pages(scores, 2, indptr, chunk_pages)
    assert pages.tolist() == [[41, 42], [77, -1]] and counts.tolist() == [2, 1]


def test_join_retrieved_prepends_full_pages_and_keeps_partial_last():
    from sglang_hybridkv.kernels.page_lists import join_retrieved

    indptr = torch.tensor([0, 2, 3, 3, 5], dtype=torch.int32)
    indices = torch.tensor([10, 11, 20, 40, 41], dtype=torch.int32)
    dyn = torch.tensor([1, 2], dtype=torch.int32)
    sel = torch.tensor([[7, 8, -1], [5, -1, -1]], dtype=torch.int32)
    new_indptr, new_indices = join_retrieved(indptr, indices, dyn, sel, torch.tensor([2, 1]))
    assert new_indptr.tolist() == [0, 2, 5, 6, 8]
    assert new_indices.tolist() == [10, 11, 7, 8, 20, 5, 40, 41]


def test_fetch_pages_copies_into_buffer():
    from sglang_hybridkv.kernels.page_lists import fetch_pages

    hk, hv = torch.randn(6, PAGE, D), torch.randn(6, PAGE, D)
    dk, dv = torch.zeros(4, PAGE, D), torch.zeros(4, PAGE, D)
    fetch_pages(hk, hv, torch.tensor([5, -1, 2]), dk, dv, torch.tensor([0, 1, 3]))
    assert torch.equal(dk[0], hk[5]) and torch.equal(dv[3], hv[2]) and torch.all(dk[1] == 0)
