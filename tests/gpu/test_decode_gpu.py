"""GPU checks of the batched decode path (``pytest -m gpu``; skipped without CUDA): the Triton kernels against
the torch path on the same pool batch, the retrieval copy reading the pinned host tier in place, and CUDA-graph
capture of one layer's decode (retrieval copy included)."""


import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.kernels.chunk_select import score_chunks_rows, score_chunks_rows_reference
from sglang_hybridkv.kernels.row_copy import copy_rows, copy_rows_reference, pinned_reads_supported
from sglang_hybridkv.kernels.row_decode import row_decode, row_decode_reference
from sglang_hybridkv.testing.decode_batch import PoolBatch
from tests.kernels.test_row_decode import D as KD
from tests.kernels.test_row_decode import LENS, _batch as _row_batch, _chunks

pytestmark = pytest.mark.gpu
H, GROUP, D, LAYERS = 4, 7, 128, 2


@pytest.mark.parametrize("lens", LENS + [[700, 3, 0, 513]])
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernels_match_references_on_cuda(lens, group, dtype):
    """The interpreter tests' adversarial shapes (empty, one row, not a multiple of the block, several splits),
    compiled for the GPU."""
    q, k, v, idx, valid = (x.cuda() for x in _row_batch(lens, group, dtype, seed=3))
    ref = row_decode_reference(q, k, v, idx, valid, KD ** -0.5)
    out = row_decode(q, k, v, idx, valid, KD ** -0.5)
    # float32: tl.dot runs as TF32 (10-bit mantissa), as in SGLang's own Triton decode.
    tol = {"rtol": 1e-2, "atol": 5e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    n = max(len(lens), 1)
    cq, lo, hi, sum_rows, n_chunks = (x.cuda() for x in _chunks(n, 37, group, seed=len(lens)))
    cq, lo, hi = cq.to(dtype), lo.to(dtype), hi.to(dtype)
    # Scores agree to ~1e-3 relative (TF32 dot), enough to rank chunks.
    torch.testing.assert_close(score_chunks_rows(cq, lo, hi, sum_rows, n_chunks, 0.25),
                               score_chunks_rows_reference(cq, lo, hi, sum_rows, n_chunks, 0.25), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_reads_pinned_host_rows_in_place_and_in_a_graph(dtype):
    assert pinned_reads_supported(torch.device("cuda"))
    g = torch.Generator().manual_seed(1)
    src = torch.randn(4099, 128, generator=g).to(dtype).pin_memory()
    src_idx = torch.randint(0, 4099, (777,), generator=g).cuda()
    dst_idx = (torch.randperm(2000, generator=g)[:777] + 1).cuda()
    want = torch.zeros(2001, 128, dtype=dtype, device="cuda")
    copy_rows_reference(src, src_idx, want, dst_idx)
    got = torch.zeros_like(want)
    copy_rows(src, src_idx, got, dst_idx)
    assert torch.equal(got, want)
    got.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        copy_rows(src, src_idx, got, dst_idx)
    src.mul_(2)  # the graph reads the host rows at replay time, not at capture
    copy_rows_reference(src, src_idx, want, dst_idx)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def _batch(dtype):
    pool = PoolBatch(LAYERS, H, D, 20000, rows=8, ctx=4096, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(0)
    rows, lens = [1, 2, 3, 4], []
    for r, (policy, budget, n) in zip(rows, [("hybridkv", 0.1, 1500), ("all_dynamic", 0.1, 900), (None, 1, 300),
                                              ("hybridkv", 1.0, 200)]):
        keys = [torch.randn(H, n, D, generator=g).to("cuda", dtype) for _ in range(LAYERS)]
        values = [torch.randn(H, n, D, generator=g).to("cuda", dtype) for _ in range(LAYERS)]
        if policy is None:
            pool.add_uncompressed(r, keys, values)
        else:
            q_win = [torch.randn(H * GROUP, 32, D, generator=g).to("cuda", dtype) for _ in range(LAYERS)]
            pool.add_compressed(r, HybridKVConfig(policy=policy, budget=budget), keys, values, q_win, D ** -0.5)
        slot = pool.alloc(1)
        pool.req_to_token[r, n] = slot.int()
        lens.append(n + 1)
    assert pool.host.pinned and not pool.host.on_device and pool.host.k[0].is_pinned()
    return pool, rows, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_matches_torch_path_on_a_pool_batch(dtype):
    pool, rows, lens = _batch(dtype)
    plan = pool.planner.build(rows, lens, pool.req_to_token)
    q = torch.randn(len(rows), H * GROUP * D, device="cuda", dtype=dtype)
    out = plan.attend(0, q, pool.k[0], pool.v[0], pool.buffers, pool.host, D ** -0.5)
    # Same retrieval (already copied), attention by the torch reference.
    t = plan.t
    idx = torch.cat([t.kept_rows[0], t.buf_rows[0], plan.tail_rows], 1)
    buf_ok = (pool.buffers.src[0][t.buf_rows[0]] >= 0) & (torch.arange(t.buf_rows.shape[-1], device="cuda")[None]
                                                   < t.buf_len[0][:, None])
    valid = torch.cat([t.kept_valid[0], buf_ok, plan.tail_valid], 1)
    qg = q.view(len(rows) * H, GROUP, D)
    ref = row_decode_reference(qg, pool.k[0].view(-1, D), pool.v[0].view(-1, D), idx, valid, D ** -0.5)
    torch.testing.assert_close(out.view_as(ref).float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(row_decode(qg, pool.k[0].view(-1, D), pool.v[0].view(-1, D), idx, valid, D ** -0.5), out.view_as(ref))


def test_one_layer_decode_is_cuda_graph_capturable():
    pool, rows, lens = _batch(torch.bfloat16)
    plan = pool.planner.build(rows, lens, pool.req_to_token)
    q = torch.randn(len(rows), H * GROUP * D, device="cuda", dtype=torch.bfloat16)
    eager = plan.attend(1, q, pool.k[1], pool.v[1], pool.buffers, pool.host, D ** -0.5).clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up Triton's compilation outside the capture
        plan.attend(1, q, pool.k[1], pool.v[1], pool.buffers, pool.host, D ** -0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.attend(1, q, pool.k[1], pool.v[1], pool.buffers, pool.host, D ** -0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), eager.float(), rtol=1e-2, atol=1e-2)
