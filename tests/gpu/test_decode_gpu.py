"""GPU checks of the batched decode path (``pytest -m gpu``; skipped without CUDA), each against an independent
fp32 torch reference: the Triton chunk scores, the retrieval copy reading the pinned host tier in place (also in
a CUDA graph), a server-shaped decode batch — compressed regions in SGLang's pool layout, one plan per step, one
Triton attention call per layer — against every request's own fp32 decode (``core.attention.decode_attention``;
dense attention for an uncompressed request), and that batch's decode captured in a CUDA graph."""

import copy

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.attention import decode_attention
from sglang_hybridkv.kernels.chunk_select import score_chunks_rows, score_chunks_rows_reference
from sglang_hybridkv.kernels.row_copy import copy_rows, copy_rows_reference, pinned_reads_supported
from sglang_hybridkv.testing.decode_batch import PoolBatch

pytestmark = pytest.mark.gpu
H, D, LAYERS, WINDOW = 4, 128, 2, 8
SCALE = D ** -0.5
# (req_to_token row, policy or None for an uncompressed request, budget, prompt length): the policies a server
# mixes in one batch, with prompt lengths around the kernels' block edges (1, 33, 700).
SPECS = [(1, "hybridkv", 0.1, 1500), (2, "all_dynamic", 0.1, 900), (3, None, 1.0, 300), (4, "hybridkv", 1.0, 200),
         (5, None, 1.0, 1), (6, "snapkv", 0.2, 33), (7, None, 1.0, 700)]
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}


def _rand(g: torch.Generator, shape, dtype) -> torch.Tensor:
    """Random values rounded to ``dtype`` once, on the GPU in fp32: pool and reference hold the same numbers."""
    return torch.randn(*shape, generator=g).to(dtype).to("cuda", torch.float32)


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_chunk_scores_match_the_reference(group, dtype):
    g = torch.Generator().manual_seed(group)
    n, c, rows = 9, 70, 4000
    lo = torch.randn(rows, D, generator=g)
    k_rows, v_rows = lo.to("cuda", dtype), (lo + torch.rand(rows, D, generator=g)).to("cuda", dtype)
    q = torch.randn(n, group, D, generator=g).to("cuda", dtype)
    sum_rows = torch.randint(0, rows, (n, c), generator=g).cuda()
    n_chunks = torch.tensor([0, 1, 70, 69, 33, 5, 64, 16, 17], device="cuda")
    want = score_chunks_rows_reference(q, k_rows, v_rows, sum_rows, n_chunks, 0.25)
    # float32 inputs go through tl.dot as TF32 (10-bit mantissa): ~1e-3 relative, enough to rank chunks.
    torch.testing.assert_close(score_chunks_rows(q, k_rows, v_rows, sum_rows, n_chunks, 0.25, use_triton=True),
                               want, rtol=1e-2, atol=2e-2)


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


class _Batch:
    """A pool on the GPU holding ``SPECS`` (compressed as compaction does) and, per request, its fp32 reference
    state: the compressed layers for ``decode_attention``, or the whole prompt for dense attention."""

    def __init__(self, group: int, dtype: torch.dtype) -> None:
        self.group, self.dtype = group, dtype
        self.pool = PoolBatch(LAYERS, H, D, 20000, rows=8, ctx=4096, dtype=dtype, device="cuda")
        self.rows = [row for row, *_ in SPECS]
        self.lens = torch.tensor([n for *_, n in SPECS])
        self.refs = []
        for row, policy, budget, n in SPECS:
            g = torch.Generator().manual_seed(row)
            keys = [_rand(g, (H, n, D), dtype) for _ in range(LAYERS)]
            values = [_rand(g, (H, n, D), dtype) for _ in range(LAYERS)]
            if policy is None:
                self.pool.add_uncompressed(row, keys, values)
                self.refs.append({"keys": keys, "values": values})
                continue
            cfg = HybridKVConfig(policy=policy, budget=budget, window=WINDOW)
            q_win = [_rand(g, (H * group, WINDOW, D), dtype) for _ in range(LAYERS)]
            layers = self.pool.add_compressed(row, cfg, keys, values, q_win, SCALE)
            self.refs.append({"layers": {l: copy.deepcopy(cl) for l, cl in layers.items()}})
        assert self.pool.host.pinned and not self.pool.host.on_device and self.pool.host.k[0].is_pinned()
        self.g = torch.Generator().manual_seed(99)

    def step(self):
        """The next decode step's plan: one new slot per request (its KV is written per layer by ``layer_inputs``)."""
        self.new = self.pool.alloc(len(self.rows))
        for i, r in enumerate(self.rows):
            self.pool.req_to_token[r, self.lens[i]] = self.new[i].int()
        self.lens = self.lens + 1
        return self.pool.planner.build(self.rows, self.lens, self.pool.req_to_token)

    def layer_inputs(self, layer: int) -> torch.Tensor:
        """This step's queries ``(B, Hq * D)`` for ``layer``; writes the new tokens' KV into the pool."""
        b = len(self.rows)
        self.q = _rand(self.g, (b, H * self.group, D), self.dtype)
        self.k_new, self.v_new = _rand(self.g, (b, H, D), self.dtype), _rand(self.g, (b, H, D), self.dtype)
        self.pool.k[layer][self.new] = self.k_new.to(self.dtype)
        self.pool.v[layer][self.new] = self.v_new.to(self.dtype)
        return self.q.to(self.dtype).reshape(b, -1)

    def reference(self, layer: int) -> torch.Tensor:
        """Every request's fp32 decode of this step's token at ``layer``: ``(B, Hq, D)``."""
        out = []
        for i, ref in enumerate(self.refs):
            q, k_new, v_new = self.q[i], self.k_new[i], self.v_new[i]
            if "layers" in ref:
                out.append(decode_attention(ref["layers"][layer], q[None], k_new[None], v_new[None], SCALE)[0])
                continue
            ref["keys"][layer] = torch.cat([ref["keys"][layer], k_new[:, None]], 1)
            ref["values"][layer] = torch.cat([ref["values"][layer], v_new[:, None]], 1)
            k = ref["keys"][layer].repeat_interleave(self.group, 0)
            v = ref["values"][layer].repeat_interleave(self.group, 0)
            p = torch.softmax(torch.einsum("hd,hld->hl", q, k) * SCALE, -1)
            out.append(torch.einsum("hl,hld->hd", p, v))
        return torch.stack(out)


@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_server_shaped_batch_matches_each_requests_fp32_decode(group, dtype):
    """Three steps: retrieval copies chunks on the first, keeps the resident ones after, and every request's
    output matches its own fp32 decode (kept tokens, the chunks its query selects, the decoded tokens)."""
    batch = _Batch(group, dtype)
    for step in range(3):
        plan = batch.step()
        for layer in range(LAYERS):
            q = batch.layer_inputs(layer)
            out = plan.attend(layer, q, batch.pool.k[layer], batch.pool.v[layer], batch.pool.buffers,
                              batch.pool.host, SCALE)
            torch.testing.assert_close(out.view(len(batch.rows), H * group, D).float(), batch.reference(layer),
                                       **BF16_TOL, msg=lambda m: f"step {step} layer {layer}: {m}")
    traffic = batch.pool.buffers.totals()
    assert 0 < traffic["retrieval_rows_copied"] <= traffic["retrieval_rows_selected"]


def test_one_layer_decode_in_a_cuda_graph_matches_eager_and_the_reference():
    batch = _Batch(7, torch.bfloat16)
    plan = batch.step()
    q = batch.layer_inputs(1)
    want = batch.reference(1)
    args = (batch.pool.k[1], batch.pool.v[1], batch.pool.buffers, batch.pool.host, SCALE)
    eager = plan.attend(1, q, *args).clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # Triton compiles outside the capture
        plan.attend(1, q, *args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.attend(1, q, *args)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.view_as(want).float(), want, **BF16_TOL)
