"""A steady decode step reads no device value on the host: the plan is built from host-side lengths
(``seq_lens_cpu``, the regions' tables), and every layer's retrieval and attention is device work only.

On CPU the test watches what would block a GPU stream (``tests/host_reads.py``) for every tensor other than the
lengths SGLang hands over on the host. On a GPU, ``torch.cuda.set_sync_debug_mode`` checks the same step for real.
"""

from __future__ import annotations

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.testing.decode_batch import PoolBatch
from tests.host_reads import HostReadWatch

D, LAYERS, H, GROUP = 64, 3, 2, 3


def _batch(device: str):
    """Compressed requests with dynamic heads (retrieval every step), a static-only one and an uncompressed one."""
    pool = PoolBatch(LAYERS, H, D, 6000, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device)
    specs = [("all_dynamic", 0.2, 300), ("hybridkv", 0.1, 400), ("snapkv", 0.1, 200), (None, 1.0, 150)]
    rows = [1, 2, 3, 4]
    for r, (policy, budget, n) in zip(rows, specs):
        keys, values = [rand(H, n, D) for _ in range(LAYERS)], [rand(H, n, D) for _ in range(LAYERS)]
        if policy is None:
            pool.add_uncompressed(r, keys, values)
        else:
            cfg = HybridKVConfig(policy=policy, budget=budget, window=8)
            pool.add_compressed(r, cfg, keys, values, [rand(H * GROUP, 8, D) for _ in range(LAYERS)], D ** -0.5)
    return pool, rows, torch.tensor([n for _, _, n in specs])


def _next_token(pool: PoolBatch, rows: list[int], lens_cpu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot for each request's next token (as SGLang's scheduler prepares a decode batch); the new lengths on
    the host and on the device."""
    new = pool.alloc(len(rows))
    pool.req_to_token[torch.tensor(rows, device=pool.device), lens_cpu.to(pool.device)] = new.int()
    lens_cpu = lens_cpu + 1
    return lens_cpu, lens_cpu.to(pool.device, copy=True)  # a distinct tensor: reading it on the host is a sync


def _decode(pool, rows, lens_cpu, lens_dev, q):
    """What the backend runs for one decode forward: plan once, attend per layer."""
    plan = pool.planner.build(rows, lens_cpu, pool.req_to_token, lens_dev)
    for l in range(LAYERS):
        plan.attend(l, q, pool.k[l], pool.v[l], pool.buffers, pool.host, D ** -0.5)


def test_steady_decode_step_reads_no_device_value():
    pool, rows, lens = _batch("cpu")
    q = torch.randn(len(rows), H * GROUP * D)
    lens, lens_dev = _next_token(pool, rows, lens)
    _decode(pool, rows, lens, lens_dev, q)  # first step on this batch: tables built from the regions
    lens, lens_dev = _next_token(pool, rows, lens)
    watch = HostReadWatch(allowed=(lens,))
    with watch.host_reads():
        _decode(pool, rows, lens, lens_dev, q)
    assert pool.planner.table_builds == 1
    assert pool.buffers.totals()["retrieval_rows_copied"] > 0  # the step did retrieve
    assert watch.seen == []


def test_the_watch_sees_a_host_read():
    """The watch itself catches what the decode path must not do (so the test above can fail)."""
    x = torch.arange(5)
    watch = HostReadWatch()
    with watch.host_reads():
        int(x.max()), x.tolist(), x[x > 2], torch.nonzero(x), torch.repeat_interleave(x, x), x.cpu()
    assert watch.seen == ["aten._local_scalar_dense.default", "Tensor.tolist",
                          "aten.index.Tensor with a boolean mask", "aten.nonzero.default", "aten.repeat_interleave.Tensor",
                          "Tensor.cpu"]


@pytest.mark.gpu
def test_steady_decode_step_has_no_cuda_sync():
    pool, rows, lens = _batch("cuda")
    q = torch.randn(len(rows), H * GROUP * D, device="cuda")
    lens, lens_dev = _next_token(pool, rows, lens)
    _decode(pool, rows, lens, lens_dev, q)
    lens, lens_dev = _next_token(pool, rows, lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _decode(pool, rows, lens, lens_dev, q)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert pool.buffers.totals()["retrieval_rows_copied"] > 0
