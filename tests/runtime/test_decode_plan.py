"""The batched decode path on SGLang's pool layout, without a server: compressed regions written by
``pool_region``, a mixed batch planned once by ``DecodePlanner`` and attended per layer in one call, compared
with the per-request torch reference (``core.attention.decode_attention``) step by step."""

import copy

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.attention import decode_attention
from sglang_hybridkv.testing.decode_batch import PoolBatch

D, LAYERS = 64, 2


def _request(pool, row, policy, budget, prompt_len, group, seed, interval=1):
    """A random prompt, compressed into ``pool`` (or kept whole) -> what the reference decode needs."""
    g = torch.Generator().manual_seed(seed)
    h, w = pool.h, 8
    keys = [torch.randn(h, prompt_len, D, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(h, prompt_len, D, generator=g) for _ in range(LAYERS)]
    if policy is None:
        pool.add_uncompressed(row, keys, values)
        return {"keys": keys, "values": values}
    cfg = HybridKVConfig(policy=policy, budget=budget, window=w, retrieval_interval=interval)
    q_win = [torch.randn(h * group, w, D, generator=g) for _ in range(LAYERS)]
    layers = pool.add_compressed(row, cfg, keys, values, q_win, D ** -0.5)
    return {"layers": {l: copy.deepcopy(cl) for l, cl in layers.items()}}


def _full_attention(q, keys, values, scale):
    group = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    p = torch.softmax(torch.einsum("hd,hld->hl", q, k) * scale, -1)
    return torch.einsum("hl,hld->hd", p, v)


@pytest.mark.parametrize("h,group", [(1, 1), (2, 2), (3, 7)])
@pytest.mark.parametrize("interval", [1, 3])
def test_mixed_batch_equals_per_request_reference(h, group, interval):
    pool = PoolBatch(LAYERS, h, D, 3000)
    specs = [("hybridkv", 0.1, 203), ("all_dynamic", 0.3, 150), (None, 1.0, 90), ("snapkv", 0.2, 61),
             ("hybridkv", 1.0, 37)]
    rows = [1, 2, 3, 5, 6]
    refs = [_request(pool, r, p, b, n, group, seed=r, interval=interval) for r, (p, b, n) in zip(rows, specs)]
    planner = pool.planner
    g = torch.Generator().manual_seed(99)
    lens = torch.tensor([n for _, _, n in specs])
    for step in range(5):
        # This step's token: a new slot per request, its KV written to the pool first (as forward_decode does).
        new = pool.alloc(len(rows))
        for i, r in enumerate(rows):
            pool.req_to_token[r, lens[i]] = int(new[i])
        lens = lens + 1
        plan = planner.build(rows, lens, pool.req_to_token)
        for l in range(LAYERS):
            q = torch.randn(len(rows), h * group, D, generator=g)
            k_new, v_new = torch.randn(len(rows), h, D, generator=g), torch.randn(len(rows), h, D, generator=g)
            pool.k[l][new], pool.v[l][new] = k_new, v_new
            out = plan.attend(l, q.reshape(len(rows), -1), pool.k[l], pool.v[l], pool.row_valid[l], pool.host,
                              D ** -0.5).view(len(rows), h * group, D)
            for i, ref in enumerate(refs):
                if "layers" in ref:
                    want = decode_attention(ref["layers"][l], q[i][None], k_new[i][None], v_new[i][None], D ** -0.5,
                                            interval, 0.25)[0]
                else:
                    ref["keys"][l] = torch.cat([ref["keys"][l], k_new[i][:, None]], 1)
                    ref["values"][l] = torch.cat([ref["values"][l], v_new[i][:, None]], 1)
                    want = _full_attention(q[i], ref["keys"][l], ref["values"][l], D ** -0.5)
                torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-4, msg=f"request {i} layer {l} step {step}")
    assert planner.builds == 5 and planner.table_builds == 1  # tables reused while the batch is unchanged


def test_regions_free_their_slots_and_pages_exactly_once():
    pool = PoolBatch(LAYERS, 2, D, 3000)
    _request(pool, 1, "all_dynamic", 0.2, 120, 2, seed=1)
    region = pool.regions.get(1)
    used = pool.host.used_pages
    assert used > 0 and pool.regions.slots_held == region.slots.numel()
    pool.regions.free(1)
    pool.regions.free(1)  # SGLang frees a row once; a second call must not double-free
    assert len(pool.freed) == 1 and torch.equal(pool.freed[0], region.slots)
    assert pool.host.used_pages == 0 and pool.regions.slots_held == 0 and pool.regions.live == 0


def test_region_is_a_fraction_of_the_prompt():
    pool = PoolBatch(LAYERS, 3, D, 3000)
    _request(pool, 1, "hybridkv", 0.1, 2000, 3, seed=3)
    assert pool.regions.get(1).slots.numel() < 0.25 * 2000
