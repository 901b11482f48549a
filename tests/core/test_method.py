"""Stages of the method on tensors: window statistics, classification, allocation, selection, chunks."""

import math

import pytest
import torch

from sglang_hybridkv.core.budget import allocate, dynamic_rows, media_rows
from sglang_hybridkv.core.chunks import chunk_summaries, chunk_tokens, score_chunks, top_chunks
from sglang_hybridkv.core.classify import classify_static, concentration, tokens_for_mass
from sglang_hybridkv.core.select import always_kept, pool_scores, select_tokens
from sglang_hybridkv.core.window import window_attention


def test_window_attention_is_causal_and_normalised():
    torch.manual_seed(0)
    q, k = torch.randn(6, 4, 8), torch.randn(2, 10, 8)
    p = window_attention(q, k, 8 ** -0.5)
    assert p.shape == (6, 4, 10)
    torch.testing.assert_close(p.sum(-1), torch.ones(6, 4))
    for i in range(4):  # window query i sits at position 6 + i
        assert torch.all(p[:, i, 7 + i:] == 0)
    # Same as SDPA's causal softmax, computed independently per query head.
    kk = k.repeat_interleave(3, 0)
    logits = q @ kk.transpose(1, 2) * 8 ** -0.5
    mask = torch.arange(10)[None] > torch.arange(6, 10)[:, None]
    torch.testing.assert_close(p, torch.softmax(logits.masked_fill(mask, -torch.inf), -1))
    with pytest.raises(ValueError, match="multiple"):
        window_attention(torch.randn(5, 2, 8), k, 1.0)


def test_tokens_for_mass():
    mass = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    # 0.5 + 0.3 = 0.8 < 0.9, + 0.15 = 0.95 -> 3 tokens; uniform needs ceil(0.9 * 4) = 4.
    assert tokens_for_mass(mass, 0.9).tolist() == [3, 4]
    assert tokens_for_mass(mass, 0.5).tolist() == [1, 2]
    assert tokens_for_mass(torch.zeros(2, 0), 0.9).tolist() == [0, 0]


def _peaked_probs(hq, w, n, peaked_heads, seed=0):
    """Window probs where ``peaked_heads`` put 95 % of their mass on 2 tokens and the others spread it."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(hq, w, n, generator=g)
    for h in peaked_heads:
        p[h] = 0.05 * p[h] / p[h].sum(-1, keepdim=True)
        p[h, :, [3, 7]] += 0.475
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["mass", "entropy", "topk_mass"])
def test_classification_separates_concentrated_from_spread_heads(method):
    # 4 query heads over 2 KV heads: group 0 = heads 0,1 both peaked; group 1 = head 2 peaked, head 3 spread.
    p = _peaked_probs(4, 5, 100, peaked_heads=[0, 1, 2])
    media = torch.arange(100)
    static = classify_static(p, media, 2, theta=0.9, share=10, method=method)
    # A group is static only if its most demanding query head is.
    assert static.tolist() == [True, False]
    need = concentration(p, media, 2, 0.9)
    assert need[0] <= 10 < need[1]


def test_classification_without_media_is_static():
    p = _peaked_probs(2, 3, 5, [])
    assert classify_static(p, torch.arange(0), 2, 0.9, 0).tolist() == [True, True]


def test_allocation_top_down():
    static = torch.tensor([True, True, False, False])
    need = torch.tensor([10, 30, 500, 400])
    # Summaries not charged (the paper's media unit): 400 rows, half to 2 dynamic heads -> 100 each -> 6 chunks.
    b = allocate(static, need, n_media=1000, rows=400, chunk_size=16, charge_summaries=False, need_weight=1.0)
    assert b.top_k == 6 and b.tokens[2:].tolist() == [96, 96]
    # Static heads share what the dynamic heads leave (400 - 192), 1:3 by need.
    assert b.tokens[:2].tolist() == [52, 156]
    # Device unit: each dynamic head also pays one row per summary (63 chunks) -> 2 chunks, within the rows.
    b = allocate(static, need, 1000, 400, 16)
    assert b.top_k == 2 and b.tokens[2:].tolist() == [32, 32]
    assert int(b.tokens[:2].sum()) + 2 * (32 + 63) <= 400
    assert dynamic_rows(2, 1000, 16, True) == 95 and dynamic_rows(2, 1000, 16, False) == 32
    # static_ratio moves rows between types.
    assert allocate(static, need, 1000, 400, 16, static_ratio=0.25, charge_summaries=False).top_k == 9


def test_dynamic_heads_that_cannot_afford_a_chunk_become_static():
    dyn = torch.tensor([False, False, True])
    need = torch.tensor([500, 400, 10])
    # 100 rows for 2 dynamic heads: 50 each < 63 summaries + 16; the one needing least is demoted first,
    # and the other can then afford (100 - 63) // 16 = 2 chunks.
    b = allocate(dyn, need, 1000, 200, 16, static_ratio=0.5)
    assert b.static.tolist() == [False, True, True] and b.top_k == 2
    assert dynamic_rows(b.top_k, 1000, 16, True) + int(b.tokens[b.static].sum()) <= 200
    # Without demotion (the all-dynamic ablation) every head keeps one chunk, over the rows if need be.
    b = allocate(torch.zeros(3, dtype=torch.bool), need, 1000, 10, 16, demote=False)
    assert b.static.tolist() == [False] * 3 and b.top_k == 1
    b = allocate(torch.zeros(3, dtype=torch.bool), need, 1000, 10, 16)
    assert b.static.all() and int(b.tokens.sum()) <= 10


def test_media_rows_charges_everything_in_the_device_unit():
    # 4 heads, 1000-token prompt of which 900 media: 0.1 -> 400 rows, minus 100 always-kept rows per head.
    assert media_rows(0.1, "device", 1000, 900, 100, 4) == pytest.approx(0.0)
    assert media_rows(0.2, "device", 1000, 900, 100, 4) == pytest.approx(400.0)
    assert media_rows(0.05, "device", 1000, 900, 100, 4) == 0.0  # below the floor: keep the floor only
    assert media_rows(0.1, "media", 1000, 900, 100, 4) == pytest.approx(360.0)
    with pytest.raises(ValueError, match="budget_unit='x'"):
        media_rows(0.1, "x", 10, 5, 5, 1)


def test_allocation_caps_and_edge_cases():
    # Needs larger than the media span are capped and the rest goes to the other static heads.
    b = allocate(torch.tensor([True, True]), torch.tensor([1000, 1]), n_media=50, rows=90, chunk_size=16)
    assert b.tokens.max() <= 50 and int(b.tokens.sum()) == 90
    assert allocate(torch.tensor([True]), torch.tensor([0]), 0, 0.0, 16).tokens.tolist() == [0]
    # Never more chunks than exist; a share covering everything takes every chunk.
    assert allocate(torch.tensor([False]), torch.tensor([5]), 20, 22, 16).top_k == 2
    assert allocate(torch.tensor([False]), torch.tensor([5]), 20, 2, 16, top_k_chunks=5).top_k == 2


def test_selection_keeps_text_sink_recent_and_best_media():
    media = torch.tensor([False] + [True] * 8 + [False])
    keep = always_kept(media, sink=2, recent=1)
    assert keep.tolist() == [True, True] + [False] * 7 + [True]
    scores = torch.tensor([[0, 0, 9, 1, 8, 2, 0, 0, 7, 0.0], [0, 0, 1, 1, 1, 1, 1, 5, 1, 0.0]])
    idx, n = select_tokens(scores, keep, torch.tensor([2, 0]))
    assert n.tolist() == [5, 3]
    assert idx[0, :5].tolist() == [0, 1, 2, 4, 9]
    assert idx[1, :3].tolist() == [0, 1, 9]
    # Budgets beyond what is selectable are clipped, not an error.
    idx, n = select_tokens(scores, keep, torch.tensor([100, 1]))
    assert n.tolist() == [10, 4] and idx[0].tolist() == list(range(10))


def test_pooling_spreads_a_peak_to_neighbours():
    s = torch.zeros(1, 9)
    s[0, 4] = 1.0
    p = pool_scores(s, 3)
    assert p[0, 3] > 0 and p[0, 5] > 0 and p[0, 2] == 0 and p.shape == s.shape
    assert torch.equal(pool_scores(s, 1), s)


def test_forward_reach_keeps_what_follows_a_cue():
    s = torch.zeros(1, 10)
    s[0, 4] = 1.0
    p = pool_scores(s, 1, forward=3)
    # Positions 4..7 score like the cue; before it and past the reach, nothing changes.
    assert p[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    # Average first, then the reach: the cue's neighbourhood is carried forward.
    p = pool_scores(s, 3, forward=2)
    assert p[0, 3] > 0 and p[0, 7] == p[0, 5] > 0 and p[0, 8] == 0
    # A forward-pooled selection keeps the cue and the tokens after it.
    keep = torch.zeros(10, dtype=torch.bool)
    idx, n = select_tokens(pool_scores(s, 1, forward=3), keep, torch.tensor([4]))
    assert idx[0, :4].tolist() == [4, 5, 6, 7]


def test_need_weight_mixes_equal_and_need_proportional_shares():
    static = torch.ones(2, dtype=torch.bool)
    need = torch.tensor([10, 30])
    assert allocate(static, need, 1000, 400, 16, need_weight=1.0).tokens.tolist() == [100, 300]
    assert allocate(static, need, 1000, 400, 16, need_weight=0.0).tokens.tolist() == [200, 200]
    assert allocate(static, need, 1000, 400, 16, need_weight=0.5).tokens.tolist() == [150, 250]


@pytest.mark.parametrize("n,chunk", [(1, 16), (16, 16), (37, 16), (64, 8)])
def test_chunk_scores_upper_bound_every_key(n, chunk):
    torch.manual_seed(n)
    k = torch.randn(3, n, 8)
    kmin, kmax = chunk_summaries(k, chunk)
    assert kmin.shape == (3, math.ceil(n / chunk), 8)
    q = torch.randn(5, 3, 2, 8)  # T=5, H=3, group 2
    bound = score_chunks(q, kmin, kmax)
    exact = torch.einsum("thgd,hnd->thgn", q, k)
    pad = kmin.shape[1] * chunk - n
    exact = torch.nn.functional.pad(exact, (0, pad), value=-torch.inf).view(5, 3, 2, -1, chunk).amax(-1).amax(2)
    assert torch.all(bound >= exact - 1e-5)


def test_top_chunks_and_tokens():
    scores = torch.tensor([[[0.1, 5.0, 0.2, 4.0]]])
    ids = top_chunks(scores, 2)
    assert ids.tolist() == [[[1, 3]]]
    tok, ok = chunk_tokens(ids, 4, 14)  # last chunk holds tokens 12, 13 only
    assert tok.tolist() == [[[4, 5, 6, 7, 12, 13, 13, 13]]]
    assert ok.tolist() == [[[True] * 6 + [False] * 2]]
    assert top_chunks(scores, 10).shape[-1] == 4
    empty_min, empty_max = chunk_summaries(torch.randn(2, 0, 4), 16)
    assert empty_min.shape == (2, 0, 4)
