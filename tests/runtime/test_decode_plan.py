"""The batched decode path on SGLang's pool layout, without a server: compressed regions written by
``pool_region``, a mixed batch planned once by ``DecodePlanner`` and attended per layer in one call, compared
with the per-request torch reference (``core.attention.decode_attention``) step by step."""

import copy
import json

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.attention import decode_attention
from sglang_hybridkv.testing.decode_batch import PoolBatch

D, LAYERS = 64, 2


def _request(pool, row, policy, budget, prompt_len, group, seed, interval=1, head_profile=None):
    """A random prompt, compressed into ``pool`` (or kept whole) -> what the reference decode needs."""
    g = torch.Generator().manual_seed(seed)
    h, w = pool.h, 8
    keys = [torch.randn(h, prompt_len, D, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(h, prompt_len, D, generator=g) for _ in range(LAYERS)]
    if policy is None:
        pool.add_uncompressed(row, keys, values)
        return {"keys": keys, "values": values}
    cfg = HybridKVConfig(policy=policy, budget=budget, window=w, retrieval_interval=interval,
                         head_profile=head_profile)
    q_win = [torch.randn(h * group, w, D, generator=g) for _ in range(LAYERS)]
    layers = pool.add_compressed(row, cfg, keys, values, q_win, D ** -0.5)
    return {"layers": {l: copy.deepcopy(cl) for l, cl in layers.items()}}


def _full_attention(q, keys, values, scale):
    group = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    p = torch.softmax(torch.einsum("hd,hld->hl", q, k) * scale, -1)
    return torch.einsum("hl,hld->hd", p, v)


def _decode_against_reference(pool, rows, specs, refs, h, group, interval, steps):
    """``steps`` decode steps of the batch, every layer's output compared with each request's reference."""
    g = torch.Generator().manual_seed(99)
    lens = torch.tensor([n for _, _, n in specs])
    for step in range(steps):
        # This step's token: a new slot per request, its KV written to the pool first (as forward_decode does).
        new = pool.alloc(len(rows))
        for i, r in enumerate(rows):
            pool.req_to_token[r, lens[i]] = int(new[i])
        lens = lens + 1
        plan = pool.planner.build(rows, lens, pool.req_to_token)
        for l in range(LAYERS):
            q = torch.randn(len(rows), h * group, D, generator=g)
            k_new, v_new = torch.randn(len(rows), h, D, generator=g), torch.randn(len(rows), h, D, generator=g)
            pool.k[l][new], pool.v[l][new] = k_new, v_new
            out = plan.attend(l, q.reshape(len(rows), -1), pool.k[l], pool.v[l], pool.buffers, pool.host,
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


@pytest.mark.parametrize("h,group", [(1, 1), (2, 2), (3, 7)])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("split", [None, 16])
def test_mixed_batch_equals_per_request_reference(h, group, interval, split):
    pool = PoolBatch(LAYERS, h, D, 3000, split=split)
    specs = [("hybridkv", 0.1, 203), ("all_dynamic", 0.3, 150), (None, 1.0, 90), ("snapkv", 0.2, 61),
             ("hybridkv", 1.0, 37)]
    rows = [1, 2, 3, 5, 6]
    refs = [_request(pool, r, p, b, n, group, seed=r, interval=interval) for r, (p, b, n) in zip(rows, specs)]
    _decode_against_reference(pool, rows, specs, refs, h, group, interval, steps=5)
    assert pool.planner.builds == 5 and pool.planner.table_builds == 1  # tables reused while the batch is unchanged


def test_layer_without_dynamic_heads_in_the_batch_skips_retrieval(tmp_path):
    """Retrieval runs only over the batch's dynamic heads: with every head of layer 0 static and one dynamic
    head in layer 1, layer 0 has nothing to score or copy, and both layers still give the reference output."""
    h, group = 2, 3
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"static": [[True, True], [False, True]]}))
    pool = PoolBatch(LAYERS, h, D, 3000)
    specs = [("hybridkv", 0.2, 203), ("snapkv", 0.2, 150), (None, 1.0, 90)]
    rows = [1, 2, 3]
    refs = [_request(pool, r, p, b, n, group, seed=r, head_profile=str(profile) if p == "hybridkv" else None)
            for r, (p, b, n) in zip(rows, specs)]
    retrieval = pool.planner.build(rows, torch.tensor([n for _, _, n in specs]), pool.req_to_token).t.retrieval
    assert retrieval[0] is None and retrieval[1].seq.tolist() == [0]  # request 0, KV head 0
    _decode_against_reference(pool, rows, specs, refs, h, group, 1, steps=3)
    assert (pool.buffers.src[0] < 0).all() and (pool.buffers.src[1] >= 0).any()
    assert pool.buffers.totals()["retrieval_rows_selected"] > 0


def test_graph_padded_batch_gives_real_rows_the_same_attention():
    """At CUDA-graph replay SGLang pads a decode batch to the captured size: padded rows name ``req_to_token``
    row 0 with length 1 and their queries are whatever the buffers hold. The plan built on that view must give
    every real request what the unpadded plan gives it, and a padded row must read nothing but the pool's
    padding slot 0."""
    h, group = 2, 3
    pool = PoolBatch(LAYERS, h, D, 3000)
    specs = [("hybridkv", 0.1, 203), (None, 1.0, 90), ("all_dynamic", 0.2, 120)]
    rows = [1, 2, 3]
    for r, (p, b, n) in zip(rows, specs):
        _request(pool, r, p, b, n, group, seed=r)
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([n for _, _, n in specs])
    for _ in range(3):
        new = pool.alloc(len(rows))
        for i, r in enumerate(rows):
            pool.req_to_token[r, lens[i]] = int(new[i])
        lens = lens + 1
        padded_lens = torch.cat([lens, torch.ones(4, dtype=lens.dtype)])
        plan, padded = pool.planner.build(rows, lens, pool.req_to_token), \
            pool.planner.build(rows + [0] * 4, padded_lens, pool.req_to_token)
        for l in range(LAYERS):
            pool.k[l][new], pool.v[l][new] = torch.randn(len(rows), h, D, generator=g), torch.randn(len(rows), h, D, generator=g)
            q = torch.randn(len(rows) + 4, h * group * D, generator=g)
            want = plan.attend(l, q[:3], pool.k[l], pool.v[l], pool.buffers, pool.host, D ** -0.5)
            held_before = pool.buffers.src[l].clone()
            got = padded.attend(l, q, pool.k[l], pool.v[l], pool.buffers, pool.host, D ** -0.5)
            torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
            # A padded row attends to one row per head, slot 0's: its output is that slot's values.
            slot0 = pool.v[l][0][:, None, :].expand(h, group, D).reshape(-1)
            torch.testing.assert_close(got[3:], slot0.expand(4, -1))
            assert torch.equal(pool.buffers.src[l], held_before)  # the same chunks again; padded rows add none


def test_retrieval_copies_only_chunks_not_already_in_the_buffer():
    """A step whose query selects the chunks the buffer holds copies nothing; a step that changes part of the
    selection copies only the new chunks, into the slots of the dropped ones. Rows holding a kept chunk are
    marked in the pool: a copy would overwrite the mark."""
    h, group = 2, 2
    pool = PoolBatch(1, h, D, 4000)
    g = torch.Generator().manual_seed(11)
    keys, values = [torch.randn(h, 600, D, generator=g)], [torch.randn(h, 600, D, generator=g)]
    pool.add_compressed(1, HybridKVConfig(policy="all_dynamic", budget=0.2, window=8), keys, values,
                        [torch.randn(h * group, 8, D, generator=g)], D ** -0.5)
    lens = torch.tensor([600])
    k_rows, host_k = pool.k[0].view(-1, D), pool.host.k[0].view(-1, D)

    def step(q):
        nonlocal lens
        new = pool.alloc(1)
        pool.req_to_token[1, lens[0]] = int(new[0])
        lens = lens + 1
        pool.planner.build([1], lens, pool.req_to_token).attend(0, q, pool.k[0], pool.v[0], pool.buffers,
                                                                 pool.host, D ** -0.5)

    q = torch.randn(1, h * group * D, generator=g)
    step(q)  # first step: the whole selection is copied
    held = pool.buffers.src[0].clone()
    used = held >= 0
    n_used = int(used.sum())
    assert n_used > 32 and torch.equal(k_rows[used], host_k[held[used].long()])
    assert pool.buffers.totals() == {"retrieval_rows_selected": n_used, "retrieval_rows_copied": n_used}
    k_rows[used] = 1e3
    step(q)  # the same selection
    assert torch.equal(pool.buffers.src[0], held) and bool((k_rows[used] == 1e3).all())
    assert pool.buffers.totals() == {"retrieval_rows_selected": 2 * n_used, "retrieval_rows_copied": n_used}
    step(q + 0.6 * torch.randn(q.shape, generator=g))  # part of the selection changes
    now = pool.buffers.src[0]
    kept, loaded = used & (now == held), (now >= 0) & (now != held)
    assert kept.any() and loaded.any()
    assert pool.buffers.totals() == {"retrieval_rows_selected": 2 * n_used + int((now >= 0).sum()),
                                     "retrieval_rows_copied": n_used + int(loaded.sum())}
    assert bool((k_rows[kept] == 1e3).all())  # kept chunks were not copied again
    assert torch.equal(k_rows[loaded], host_k[now[loaded].long()])  # new chunks hold their host rows
    assert not bool((k_rows[loaded] == 1e3).any())


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


def test_one_long_request_does_not_widen_the_others():
    """Each sequence's items cover its own rows (plus less than one item per part): a long uncompressed request
    in the batch adds its own columns and nothing to the compressed requests' sequences."""
    h, group, split = 2, 2, 32
    pool = PoolBatch(LAYERS, h, D, 8000, split=split)
    specs = [("hybridkv", 0.1, 400), ("snapkv", 0.1, 400), (None, 1.0, 4000)]
    rows = [1, 2, 3]
    for r, (p, b, n) in zip(rows, specs):
        _request(pool, r, p, b, n, group, seed=r)
    lens = torch.tensor([n for _, _, n in specs])
    compressed = pool.planner.build(rows[:2], lens[:2], pool.req_to_token)
    mixed = pool.planner.build(rows, lens, pool.req_to_token)
    for l in range(LAYERS):
        own = mixed.valid[l].sum(1)  # valid columns per item
        for i in range(2 * h):  # the compressed requests' sequences: same items alone and in the mixed batch
            alone_cols = int((compressed.seq[l] == i).sum()) * split
            assert int((mixed.seq[l] == i).sum()) * split == alone_cols
            assert alone_cols < int(own[mixed.seq[l] == i].sum()) + 2 * split
        long_items = int((mixed.seq[l] >= 2 * h).sum())
        assert long_items == h * -(-4000 // split)  # the long request's own items, nothing more
