"""The compressed region in SGLang's pool layout: what is written to a request's slots is what decode reads back."""

import copy

import pytest
import torch

from sglang_hybridkv.core.attention import decode_attention
from sglang_hybridkv.runtime import pool_region
from tests.core.test_policies_and_decode import D, _compress, _layer


def _pool(num_slots, h, dtype=torch.float32):
    """Key and value buffers shaped like one layer of SGLang's MHA token pool: ``(slots, H, D)``."""
    return torch.zeros(num_slots, h, D, dtype=dtype), torch.zeros(num_slots, h, D, dtype=dtype)


@pytest.mark.parametrize("policy,budget", [("hybridkv", 0.1), ("hybridkv", 1.0), ("snapkv", 0.2),
                                           ("all_dynamic", 0.3), ("full", 1.0)])
@pytest.mark.parametrize("h,group", [(1, 1), (2, 2), (3, 7)])
def test_roundtrip_through_pool_gives_the_same_decode(policy, budget, h, group):
    seq_len, n_new = 203, 3  # not a multiple of the chunk size
    q, k, v = _layer(h, group, seq_len, n_new)
    _, cl, cfg = _compress(policy, budget, q, k, v, seq_len, w=8)
    kept = copy.deepcopy(cl)
    n = pool_region.slots_needed({0: cl})
    assert n * h >= pool_region.rows_needed(cl)
    # Slots as an allocator hands them out: scattered, never slot 0 (SGLang's padding slot).
    slots = (torch.randperm(4 * seq_len)[:n] + 1).sort().values.flip(0)
    kb, vb = _pool(4 * seq_len + 1, h)
    where = pool_region.place(cl, slots)
    pool_region.write(kb, vb, cl, where)
    pool_region.unload(cl)
    assert cl.k_dev.numel() == 0 and cl.kmin.numel() == 0  # nothing of the device tier stays outside the pool
    touched = (kb.abs().sum(-1) != 0).nonzero()
    assert set(touched[:, 0].tolist()) <= set(slots.tolist())  # writes stay inside the request's slots
    pool_region.load(kb, vb, cl, where)
    for t in range(n_new):
        pos = seq_len + t
        args = (q[:, pos:pos + 1].transpose(0, 1), k[:, pos:pos + 1].transpose(0, 1),
                v[:, pos:pos + 1].transpose(0, 1), D ** -0.5)
        torch.testing.assert_close(decode_attention(cl, *args), decode_attention(kept, *args))


def test_two_requests_in_one_pool_do_not_overlap():
    h, group, seq_len = 2, 3, 150
    a = _compress("hybridkv", 0.2, *_layer(h, group, seq_len, 0, seed=1), seq_len, w=8)[1]
    b = _compress("hybridkv", 0.2, *_layer(h, group, seq_len, 0, seed=2), seq_len, w=8)[1]
    kb, vb = _pool(200, h)
    na, nb = pool_region.slots_needed({0: a}), pool_region.slots_needed({0: b})
    ra, rb = pool_region.place(a, torch.arange(1, 1 + na)), pool_region.place(b, torch.arange(1 + na, 1 + na + nb))
    ref_a, ref_b = a.k_dev.clone(), b.k_dev.clone()
    pool_region.write(kb, vb, a, ra)
    pool_region.write(kb, vb, b, rb)
    pool_region.load(kb, vb, a, ra)
    pool_region.load(kb, vb, b, rb)
    for cl, ref in ((a, ref_a), (b, ref_b)):
        valid = torch.arange(ref.shape[1])[None] < cl.dev_len[:, None]
        torch.testing.assert_close(cl.k_dev[valid], ref[valid])


def test_too_few_slots_is_refused():
    h, group, seq_len = 2, 2, 100
    cl = _compress("snapkv", 0.5, *_layer(h, group, seq_len, 0), seq_len, w=8)[1]
    with pytest.raises(ValueError, match="pool rows"):
        pool_region.place(cl, torch.arange(1, pool_region.slots_needed({0: cl})))


def test_compressed_region_is_a_fraction_of_the_prompt():
    h, group, seq_len = 3, 3, 2000
    cl = _compress("hybridkv", 0.1, *_layer(h, group, seq_len, 0), seq_len, w=16)[1]
    # Kept tokens, summaries and retrieval buffers, packed: about a fifth of the prompt's own slots at 10 %.
    assert pool_region.slots_needed({0: cl}) < 0.25 * seq_len
