"""Policies plan layers; compaction frees memory; decode attention over the compressed cache is right."""

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.attention import decode_attention
from sglang_hybridkv.core.cache import CompressedLayer
from sglang_hybridkv.core.compress import plan_layer, prompt_media_mask
from sglang_hybridkv.core.classify import classify_static, media_mass, retrieval_coverage, static_coverage
from sglang_hybridkv.core.plan import device_rows
from sglang_hybridkv.core.select import always_kept
from sglang_hybridkv.core.window import window_attention
from sglang_hybridkv.core.policies import POLICY_CLASSES, make_policy

D = 16


def _layer(h, group, seq_len, n_new, w=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(h, seq_len + n_new, D, generator=g).to(dtype)
    v = torch.randn(h, seq_len + n_new, D, generator=g).to(dtype)
    q = torch.randn(h * group, seq_len + n_new, D, generator=g).to(dtype)
    return q, k, v


def _reference(q, k, v, seq_len):
    """Plain causal GQA attention of positions >= seq_len over everything before them (SDPA)."""
    h = k.shape[0]
    group = q.shape[0] // h
    kk, vv = k.repeat_interleave(group, 0).float(), v.repeat_interleave(group, 0).float()
    n = k.shape[1]
    mask = torch.arange(n)[None] <= torch.arange(seq_len, n)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q[:, seq_len:].float(), kk, vv, attn_mask=mask)
    return out.transpose(0, 1)  # (T, Hq, D)


def _compress(policy, budget, q, k, v, seq_len, media=None, w=4, **kw):
    cfg = HybridKVConfig(policy=policy, budget=budget, window=w, **kw)
    media = prompt_media_mask(seq_len, w, None) if media is None else media
    plan = plan_layer(make_policy(cfg), q[:, seq_len - w:seq_len], k[:, :seq_len], media, 0, D ** -0.5)
    return plan, CompressedLayer(plan, k[:, :seq_len], v[:, :seq_len]), cfg


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("policy", ["full", "hybridkv", "snapkv", "all_static", "all_dynamic"])
@pytest.mark.parametrize("seq_len", [5, 16, 37])
def test_budget_one_is_exact(group, policy, seq_len):
    """At budget 1.0 every policy keeps (or retrieves) everything: output equals full attention."""
    q, k, v = _layer(2, group, seq_len, n_new=3, seed=group + seq_len)
    plan, layer, cfg = _compress(policy, 1.0, q, k, v, seq_len)
    out = decode_attention(layer, q[:, seq_len:].transpose(0, 1), k[:, seq_len:].transpose(0, 1),
                           v[:, seq_len:].transpose(0, 1), D ** -0.5)
    torch.testing.assert_close(out, _reference(q, k, v, seq_len), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_teacher_forcing_equals_single_steps(interval, group):
    """T tokens in one call give what T one-token calls give, retrieval interval included."""
    seq_len, t = 70, 7
    q, k, v = _layer(3, group, seq_len, t, seed=5)
    outs = []
    for chunked in (False, True):
        _, layer, _ = _compress("all_dynamic", 0.2, q, k, v, seq_len, retrieval_interval=interval)
        qs, ks, vs = (x[:, seq_len:].transpose(0, 1) for x in (q, k, v))
        if chunked:
            outs.append(decode_attention(layer, qs, ks, vs, D ** -0.5, interval))
        else:
            outs.append(torch.cat([decode_attention(layer, qs[i:i + 1], ks[i:i + 1], vs[i:i + 1], D ** -0.5,
                                                    interval) for i in range(t)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_dynamic_head_matches_attention_over_its_retrieved_chunks():
    """A dynamic head's output is exact attention over text + the chunks its query scores highest."""
    seq_len, w = 69, 4
    q, k, v = _layer(1, 2, seq_len, 1, seed=11)
    plan, layer, cfg = _compress("all_dynamic", 0.1, q, k, v, seq_len, w=w, sink=0, chunk_score_scale=1.0)
    assert plan.top_k == 1  # 65 media tokens * 0.1 -> 6 tokens -> at least one chunk
    qn = q[:, seq_len:].transpose(0, 1)
    out = decode_attention(layer, qn, k[:, seq_len:].transpose(0, 1), v[:, seq_len:].transpose(0, 1), D ** -0.5,
                           chunk_score_scale=1.0)
    # Independent check: the chunk with the best Quest bound, then plain attention over the kept set.
    media = k[0, : seq_len - w]
    best, best_c = -torch.inf, None
    for c in range(0, media.shape[0], 16):
        blk = media[c:c + 16]
        bound = max(float(torch.maximum(qn[0, g] * blk.amin(0), qn[0, g] * blk.amax(0)).sum()) for g in range(2))
        if bound > best:
            best, best_c = bound, c
    keep = list(range(best_c, min(best_c + 16, seq_len - w))) + list(range(seq_len - w, seq_len + 1))
    ref = _reference(q[:, keep], k[:, keep], v[:, keep], len(keep) - 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_compaction_frees_memory_and_reports_tiers():
    seq_len = 1000
    q, k, v = _layer(4, 2, seq_len, 0, w=32, seed=3)
    media = prompt_media_mask(seq_len, 32, None)
    for policy in ("snapkv", "all_static", "all_dynamic", "hybridkv"):
        plan, layer, _ = _compress(policy, 0.1, q, k, v, seq_len, media=media, w=32)
        b = layer.nbytes()
        assert b.full == 4 * seq_len * 2 * D * 4
        # Budget 0.1 of the device unit: at most 10 % of the full rows, summaries and buffers included, and
        # the bytes say so (page tables are the only extra); the dropped KV is not referenced any more.
        if policy != "all_dynamic":
            assert device_rows(plan) <= 0.1 * 4 * seq_len
            assert b.ratio > 9.5, (policy, b)
        assert (b.device + b.metadata - 4 * _pages(plan)) == device_rows(plan) * 2 * D * 4
        assert layer.k_dev.shape[1] < seq_len / 4
        if plan.num_dynamic:
            assert b.host == plan.num_dynamic * plan.host_idx.numel() * 2 * D * 4
        else:
            assert b.host == 0


def _pages(plan):
    pages = sum(-(-int(n) // plan.chunk_size) for n in plan.keep_len)
    chunks = -(-plan.host_idx.numel() // plan.chunk_size)
    return pages + (plan.num_dynamic * min(plan.top_k, chunks) if plan.host_idx.numel() else 0)


@pytest.mark.parametrize("policy", sorted(POLICY_CLASSES))
def test_edge_cases(policy):
    # One-token prompt, all text: nothing to compress.
    q, k, v = _layer(2, 2, 1, 1, seed=1)
    plan, layer, _ = _compress(policy, 0.1, q, k, v, 1, w=1)
    assert plan.keep_len.tolist() == [1, 1]
    out = decode_attention(layer, q[:, 1:].transpose(0, 1), k[:, 1:].transpose(0, 1), v[:, 1:].transpose(0, 1), D ** -0.5)
    torch.testing.assert_close(out, _reference(q, k, v, 1), rtol=1e-4, atol=1e-5)
    # No media tokens at all: every head keeps everything.
    q, k, v = _layer(2, 2, 20, 1, seed=2)
    plan, _, _ = _compress(policy, 0.1, q, k, v, 20, media=torch.zeros(20, dtype=torch.bool))
    assert plan.keep_len.tolist() == [20, 20] and plan.host_idx.numel() == 0
    # Fewer media tokens than one chunk, budget below one token.
    q, k, v = _layer(2, 2, 12, 1, seed=4)
    plan, layer, _ = _compress(policy, 0.05, q, k, v, 12, w=4, sink=0)
    assert layer.nbytes().device > 0


def test_budget_bounds_static_heads():
    seq_len, w = 400, 8
    q, k, v = _layer(4, 2, seq_len, 0, seed=9)
    # Device unit: window and sink count against the budget, 10 % of the prompt per head in all.
    plan, _, cfg = _compress("snapkv", 0.1, q, k, v, seq_len, w=w, sink=4)
    assert plan.keep_len.tolist() == [40] * 4 and device_rows(plan) == 160
    plan, _, _ = _compress("all_static", 0.1, q, k, v, seq_len, w=w, sink=4)
    assert device_rows(plan) <= 0.1 * seq_len * 4
    # Media unit (the paper's): 10 % of the media tokens on top of window and sink.
    n_media = seq_len - w - 4
    plan, _, cfg = _compress("snapkv", 0.1, q, k, v, seq_len, w=w, sink=4, budget_unit="media")
    # Equal shares of 0.1 * n_media * 4 rows; the rounding remainder goes to some heads, never over the total.
    media_kept = plan.keep_len - (w + 4)
    assert set(media_kept.tolist()) <= {int(0.1 * n_media), int(0.1 * n_media) + 1}
    assert int(media_kept.sum()) <= 0.1 * n_media * 4


@pytest.mark.parametrize("policy", ["snapkv", "hybridkv"])
def test_tight_budget_keeps_every_peak_not_one_wide_span(policy):
    """The question looks at two cues (positions 50 and 120). A head that may keep only 5 media tokens must keep
    both: pooled with the full forward reach (8), the first cue's span alone would fill its share."""
    seq_len, w = 200, 4
    q, k, v = _layer(1, 1, seq_len, 0, seed=3)
    k[:, :seq_len] *= 0.01
    u = torch.zeros(D)
    u[0] = 1.0
    k[0, 50], k[0, 120] = 12 * u, 11 * u
    q[0, seq_len - w:seq_len] = u
    cfg = dict(w=w, sink=0, pool_kernel=1, pool_forward=8, budget_unit="media")
    plan, _, _ = _compress(policy, 5 / (seq_len - w), q, k, v, seq_len, **cfg)
    kept = set(plan.keep_idx[0, : int(plan.keep_len[0])].tolist())
    assert bool(plan.static.all()) and int(plan.keep_len[0]) == w + 5
    assert {50, 51, 120} <= kept
    # With rows to spare the configured reach is used: the cue and the 8 tokens after it.
    plan, _, _ = _compress(policy, 60 / (seq_len - w), q, k, v, seq_len, **cfg)
    assert set(range(50, 59)) | set(range(120, 129)) <= set(plan.keep_idx[0, : int(plan.keep_len[0])].tolist())


def test_head_profile_replaces_classification(tmp_path):
    prof = tmp_path / "profile.json"
    prof.write_text('{"static": [[true, false]]}')
    q, k, v = _layer(2, 2, 100, 0, seed=3)
    plan, _, _ = _compress("hybridkv", 0.5, q, k, v, 100, head_profile=str(prof))
    assert plan.static.tolist() == [True, False]
    prof.write_text('{"static": [[true]]}')
    with pytest.raises(ValueError, match="no entry of 2 KV heads for layer 0"):
        _compress("hybridkv", 0.5, q, k, v, 100, head_profile=str(prof))


def test_none_policy_is_not_a_compressor():
    with pytest.raises(ValueError, match="does not compress"):
        make_policy(HybridKVConfig(policy="none"))


def test_device_rows_counts_every_resident_row():
    """Kept tokens, one row per chunk summary and the retrieval buffer per dynamic head, decoded tokens."""
    seq_len = 1000
    q, k, v = _layer(4, 2, seq_len, 0, seed=3)
    plan, layer, _ = _compress("all_dynamic", 0.2, q, k, v, seq_len, w=32, sink=4)
    assert plan.keep_len.tolist() == [36] * 4 and plan.host_idx.numel() == 964
    assert device_rows(plan) == 4 * 36 + 4 * (61 + 16 * plan.top_k)
    assert device_rows(plan, generated=5) == device_rows(plan) + 20
    # 200 rows per head, 36 always kept: 164 - 61 summaries -> 6 chunks of 16.
    assert plan.top_k == 6 and device_rows(plan) <= 0.2 * 4 * seq_len


def _shifting_attention(seq_len=400, w=8, h=2, group=2, chunk=16):
    """Window query ``i`` looks sharply at media chunk ``3 i`` only: spread on average, narrow per query."""
    g = torch.Generator().manual_seed(5)
    k = 0.1 * torch.randn(h, seq_len, D, generator=g)
    q = torch.zeros(h * group, w, D)
    for i in range(w):
        start = 4 + 3 * i * chunk  # media starts after the 4 sink tokens
        k[:, start:start + chunk, i] = 6.0
        q[:, i, i] = 6.0
    return q, k


def test_dynamic_heads_stay_dynamic_only_where_retrieval_pays():
    seq_len, w = 400, 8
    media = prompt_media_mask(seq_len, w, None)
    # Attention that shifts chunk by chunk along the window: each query's chunk fits in a 2-chunk buffer, the
    # union of 8 chunks does not fit in a static share of ~68 tokens: retrieval pays, the heads stay dynamic.
    q, k = _shifting_attention(seq_len, w)
    cfg = HybridKVConfig(policy="hybridkv", budget=0.2, window=w)
    plan = plan_layer(make_policy(cfg), q, k, media, 0, D ** -0.5)
    assert plan.num_dynamic == 2 and plan.top_k >= 1
    # Random attention: spread on average *and* per query, so the θ rule calls every head dynamic, but two
    # chunks per query cover less than the same rows as static tokens: every head becomes static, and the
    # plan is the all-static ablation's.
    qr, kr, _ = _layer(2, 2, seq_len, 0, seed=11)
    q_win = qr[:, seq_len - w:]
    probs = window_attention(q_win, kr, D ** -0.5)
    assert not classify_static(probs, media.nonzero().flatten(), 2, cfg.theta, 68).any()
    plan = plan_layer(make_policy(cfg), q_win, kr, media, 0, D ** -0.5)
    ablation = plan_layer(make_policy(cfg.replace(policy="all_static")), q_win, kr, media, 0, D ** -0.5)
    assert plan.num_dynamic == 0
    assert torch.equal(plan.keep_idx, ablation.keep_idx) and torch.equal(plan.keep_len, ablation.keep_len)


def test_coverage_of_static_and_retrieval_roles():
    q, k = _shifting_attention()
    media_idx = (~always_kept(prompt_media_mask(400, 8, None), sink=4, recent=0)).nonzero().flatten()
    probs = media_mass(window_attention(q, k, D ** -0.5), media_idx)
    # Retrieval scores chunks as decode does: one chunk per query already holds almost all of its mass.
    got = retrieval_coverage(probs, q, k[:, media_idx], top_k=1, chunk_size=16, score_scale=0.25)
    assert got.min() > 0.9
    assert retrieval_coverage(probs, q, k[:, media_idx], 0, 16, 0.25).tolist() == [0.0, 0.0]
    # Static selection of 64 tokens holds about half of the 8 chunks' mass, all 128 of them nearly everything.
    scores = probs.reshape(2, 2, 8, -1).mean((1, 2))
    assert 0.4 < float(static_coverage(probs, scores, 64, 2).mean()) < 0.6
    assert static_coverage(probs, scores, 128, 2).min() > 0.9
