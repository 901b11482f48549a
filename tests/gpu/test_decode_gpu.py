"""GPU checks of the batched decode path (``pytest -m gpu``; skipped without CUDA): the Triton kernels against
the torch path on the same pool batch, and CUDA-graph capture of one layer's decode (retrieval copy included)."""


import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.kernels.row_decode import row_decode, row_decode_reference
from sglang_hybridkv.testing.decode_batch import PoolBatch

pytestmark = pytest.mark.gpu
H, GROUP, D, LAYERS = 4, 7, 128, 2


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
    return pool, rows, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_matches_torch_path_on_a_pool_batch(dtype):
    pool, rows, lens = _batch(dtype)
    plan = pool.planner.build(rows, lens, pool.req_to_token)
    q = torch.randn(len(rows), H * GROUP * D, device="cuda", dtype=dtype)
    out = plan.attend(0, q, pool.k[0], pool.v[0], pool.row_valid[0], pool.host, D ** -0.5)
    # Same retrieval (already copied), attention by the torch reference.
    t = plan.t
    idx = torch.cat([t.kept_rows[0], t.buf_rows[0], plan.tail_rows], 1)
    buf_ok = pool.row_valid[0][t.buf_rows[0]] & (torch.arange(t.buf_rows.shape[-1], device="cuda")[None]
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
    eager = plan.attend(1, q, pool.k[1], pool.v[1], pool.row_valid[1], pool.host, D ** -0.5).clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up Triton's compilation outside the capture
        plan.attend(1, q, pool.k[1], pool.v[1], pool.row_valid[1], pool.host, D ** -0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.attend(1, q, pool.k[1], pool.v[1], pool.row_valid[1], pool.host, D ** -0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), eager.float(), rtol=1e-2, atol=1e-2)
