import pytest
import torch

from sglang_hybridkv.core.window import group_mean, window_attention
from sglang_hybridkv.kernels.compaction import compact_to_pages, compact_to_pages_reference
from sglang_hybridkv.kernels.window_scores import window_scores, window_scores_reference

from .conftest import tol, triton_or_skip

D = 64


def _pool(n, h, group, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_slots = n + 7
    k_buf = torch.randn(num_slots, h, D, generator=g).to(dtype)
    slots = torch.randperm(num_slots, generator=g)[:n].to(torch.int32)
    q = torch.randn(h * group, w, D, generator=g).to(dtype)
    return q, k_buf, slots


@pytest.mark.parametrize("n,w", [(1, 1), (5, 5), (37, 8), (200, 32)])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_window_scores_reference_matches_core(n, w, group):
    q, k_buf, slots = _pool(n, 2, group, w, torch.float32)
    ref = window_scores_reference(q, k_buf, slots, D ** -0.5)
    keys = k_buf[slots.long()].transpose(0, 1)
    core = group_mean(window_attention(q, keys, D ** -0.5).mean(1), 2)
    torch.testing.assert_close(ref, core, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.sum(-1), torch.ones(2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,w", [(1, 1), (37, 8), (200, 32)])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_window_scores_triton(device, dtype, n, w, group):
    triton_or_skip(device)
    q, k_buf, slots = (x.to(device) for x in _pool(n, 2, group, w, dtype, seed=n))
    a = window_scores(q, k_buf, slots, D ** -0.5, use_triton=True)
    b = window_scores_reference(q, k_buf, slots, D ** -0.5)
    torch.testing.assert_close(a, b, **tol(dtype))


def _compaction_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, page = 3, 16
    k_buf = torch.randn(100, h, D, generator=g).to(dtype)
    v_buf = torch.randn(100, h, D, generator=g).to(dtype)
    # Sequences: (head 0, 37 tokens), (head 2, 0 tokens), (head 1, 1 token), (head 0, 16 tokens)
    counts = [37, 0, 1, 16]
    head_of = torch.tensor([0, 2, 1, 0], dtype=torch.int32)
    tok_slots = torch.cat([torch.randperm(100, generator=g)[:c] for c in counts]).to(torch.int32)
    tok_indptr = torch.tensor([0, 37, 37, 38, 54], dtype=torch.int32)
    pages = [3, 0, 1, 1]
    page_indptr = torch.tensor([0, 3, 3, 4, 5], dtype=torch.int32)
    dst_pages = torch.tensor([9, 2, 5, 0, 7], dtype=torch.int32)
    return k_buf, v_buf, head_of, tok_indptr, tok_slots, page_indptr, dst_pages, counts


def test_compaction_reference_places_every_token():
    k_buf, v_buf, head_of, tok_indptr, tok_slots, page_indptr, dst_pages, counts = _compaction_case(torch.float32)
    kp, vp = torch.zeros(12, 16, D), torch.zeros(12, 16, D)
    compact_to_pages_reference(k_buf, v_buf, kp, vp, head_of, tok_indptr, tok_slots, page_indptr, dst_pages)
    for s, c in enumerate(counts):
        for i in range(c):
            slot = int(tok_slots[int(tok_indptr[s]) + i])
            page = int(dst_pages[int(page_indptr[s]) + i // 16])
            assert torch.equal(kp[page, i % 16], k_buf[slot, int(head_of[s])])
            assert torch.equal(vp[page, i % 16], v_buf[slot, int(head_of[s])])
    assert torch.all(kp[[1, 3, 4, 6, 8, 10, 11]] == 0)  # untouched pages stay untouched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compaction_triton(device, dtype):
    triton_or_skip(device)
    case = [x.to(device) if torch.is_tensor(x) else x for x in _compaction_case(dtype, seed=1)]
    k_buf, v_buf, head_of, tok_indptr, tok_slots, page_indptr, dst_pages, _ = case
    outs = []
    for use in (True, False):
        kp = torch.zeros(12, 16, D, dtype=dtype, device=device)
        vp = torch.zeros_like(kp)
        compact_to_pages(k_buf, v_buf, kp, vp, head_of, tok_indptr, tok_slots, page_indptr, dst_pages, use_triton=use)
        outs.append((kp, vp))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
