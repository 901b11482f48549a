import pytest
import torch

from sglang_hybridkv.kernels.paged_decode import PagedDecodePlan, paged_decode, paged_decode_reference

from .conftest import tol, triton_or_skip

PAGE, D = 16, 64


def _batch(lens, group, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = [(n + PAGE - 1) // PAGE for n in lens]
    indptr = torch.tensor([0] + torch.tensor(pages, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    nnz = int(indptr[-1])
    num_pages = nnz + 3
    indices = torch.randperm(num_pages, generator=g)[:nnz].to(torch.int32)
    last = torch.tensor([(n - 1) % PAGE + 1 if n else PAGE for n in lens], dtype=torch.int32)
    kp = torch.randn(num_pages, PAGE, D, generator=g).to(dtype)
    vp = torch.randn(num_pages, PAGE, D, generator=g).to(dtype)
    q = torch.randn(len(lens), group, D, generator=g).to(dtype)
    to = lambda *xs: [x.to(device) for x in xs]
    return to(q, kp, vp, indptr, indices, last)


def _independent(q, kp, vp, indptr, indices, lens, scale):
    """Per sequence: concatenate its pages, cut to its length, plain softmax attention."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        ids = indices[indptr[i]:indptr[i + 1]].long().cpu()
        k = kp.cpu()[ids].reshape(-1, D)[:n].float()
        v = vp.cpu()[ids].reshape(-1, D)[:n].float()
        out[i] = torch.softmax(q[i].cpu().float() @ k.T * scale, -1) @ v
    return out


LENS = [[0], [1], [16], [37], [1, 0, 17, 300, 64], [5] * 16]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
def test_reference_matches_independent_attention(lens, group):
    q, kp, vp, indptr, indices, last = _batch(lens, group, torch.float32, "cpu")
    plan = PagedDecodePlan(indptr, last, PAGE, group, D)
    out = paged_decode_reference(plan, q, kp, vp, indices, D ** -0.5)
    torch.testing.assert_close(out, _independent(q, kp, vp, indptr, indices, lens, D ** -0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("split", [1, 4])
def test_triton_matches_reference(device, dtype, lens, group, split):
    triton_or_skip(device)
    q, kp, vp, indptr, indices, last = _batch(lens, group, dtype, device, seed=len(lens) + group)
    plan = PagedDecodePlan(indptr, last, PAGE, group, D, pages_per_split=split)
    out = paged_decode(plan, q, kp, vp, indices, D ** -0.5, use_triton=True)
    ref = paged_decode_reference(plan, q, kp, vp, indices, D ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


def test_plan_splits_long_sequences():
    lens = [16 * 40, 3]
    q, kp, vp, indptr, indices, last = _batch(lens, 2, torch.float32, "cpu")
    plan = PagedDecodePlan(indptr, last, PAGE, 2, D, pages_per_split=16)
    assert plan.num_splits == 3 and plan.seq_lens.tolist() == lens


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flashinfer_path_checked_against_reference(group, dtype):
    pytest.importorskip("flashinfer")
    from sglang_hybridkv.kernels.flashinfer_decode import choose_decode_path

    lens = [1, 17, 300, 1024]
    q, kp, vp, indptr, indices, last = _batch(lens, group, dtype, "cuda")
    plan = PagedDecodePlan(indptr, last, PAGE, group, D)
    res = choose_decode_path(plan, q, kp, vp, indices, D ** -0.5)
    assert res["triton_error"] <= 2e-2
    # Whatever is chosen must be numerically right on this shape.
    chosen_error = res["flashinfer_error"] if res["choice"] == "flashinfer" else res["triton_error"]
    assert chosen_error <= 2e-2, res
