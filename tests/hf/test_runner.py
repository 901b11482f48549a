"""The HF reference path on the real SmolLM2 weights and on a tiny random Qwen2.5-VL."""

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.compress import cross_layer_prior, layer_prior, plan_layer, prompt_media_mask
from sglang_hybridkv.core.policies import make_policy
from sglang_hybridkv.hf.runner import HybridKVRunner
from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.tiny_vl import image_inputs, tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tok = smollm2
    runner = HybridKVRunner(model)
    task = make_tasks(["sign_number"], 1, [40], seed=3)[0]
    ids, mask = task.encode(tok)
    return runner, tok, task, ids, mask, runner.prefill(ids, mask)


def _hf_greedy(model, n, **inputs):
    """transformers' own generate with its own cache, attention routed to plain SDPA."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    finally:
        model.set_attn_implementation("hybridkv")
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_smollm2_full_and_budget_one_match_transformers(smol):
    runner, tok, task, ids, mask, state = smol
    ref = _hf_greedy(runner.model, 8, input_ids=ids)
    assert task.answer in tok.decode(ref)  # the real model answers this needle task with the full cache
    for policy in ("full", "hybridkv", "snapkv", "all_dynamic"):
        cache = runner.compress(state, HybridKVConfig(policy=policy, budget=1.0))
        assert runner.generate(state, cache, 8) == ref, policy


def test_smollm2_compressed_cache_shrinks_and_stays_close(smol):
    runner, tok, task, ids, mask, state = smol
    full = runner.compress(state, HybridKVConfig(policy="full"))
    cont = runner.generate(state, full, 6)
    full_logits = runner.decode(runner.compress(state, HybridKVConfig(policy="full")), torch.tensor(cont[:-1]))
    cache = runner.compress(state, HybridKVConfig(policy="hybridkv", budget=0.1))
    b = cache.nbytes()
    fresh_full = runner.compress(state, HybridKVConfig(policy="full")).nbytes()
    assert b.ratio >= 4 and b.full == fresh_full.full == fresh_full.device
    # Dynamic heads, and only they, put KV in the host tier.
    assert (b.host > 0) == (cache.static_head_fraction < 1)
    logits = runner.decode(cache, torch.tensor(cont[:-1]))
    agree = (logits.argmax(-1) == full_logits.argmax(-1)).float().mean()
    assert agree >= 0.6
    # Prefill state is reusable: compressing again gives the same plan.
    again = runner.compress(state, HybridKVConfig(policy="hybridkv", budget=0.1))
    assert all(torch.equal(again.plans[i].keep_idx, cache.plans[i].keep_idx) for i in cache.plans)


def test_runner_rejects_bad_input(smol):
    runner, tok, task, ids, mask, state = smol
    with pytest.raises(ValueError, match="media_mask has 3 entries"):
        runner.prefill(ids, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_ids must be \(1, L\)"):
        runner.prefill(ids[0])
    with pytest.raises(ValueError, match="window=100 exceeds"):
        runner.compress(state, HybridKVConfig(window=100))


def test_tiny_qwen2_5_vl_image_request():
    model = tiny_qwen2_5_vl()
    inp = image_inputs(list(range(100, 130)), list(range(200, 240)), grid=(1, 16, 16))
    mm = {k: inp[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    runner = HybridKVRunner(model)
    ref = _hf_greedy(model, 6, input_ids=inp["input_ids"], **mm)
    state = runner.prefill(inp["input_ids"], inp["media_mask"], **mm)
    # mrope: decode continues from the image-compressed position, not from the token count.
    assert state.next_position.shape == (3,) and int(state.next_position[0]) < inp["input_ids"].shape[1]
    assert runner.generate(state, runner.compress(state, HybridKVConfig(policy="hybridkv", budget=1.0)), 6) == ref
    cache = runner.compress(state, HybridKVConfig(policy="hybridkv", budget=0.1))
    plan = cache.plans[0]
    n_img = int(inp["media_mask"].sum())
    # Only image tokens are evicted: every text token stays on the device for every head.
    text_len = inp["input_ids"].shape[1] - n_img
    assert int(plan.keep_len.min()) >= text_len
    assert cache.nbytes().device < cache.nbytes().full
    assert len(runner.generate(state, cache, 6)) == 6


@pytest.mark.parametrize("knobs", [
    {},
    {"window": 16},
    {"window": 16, "policy": "snapkv", "budget": 0.2},
    {"policy": "all_dynamic", "chunk_size": 32, "sink": 0},
    {"theta": 0.5, "pool_kernel": 1, "recent": 8, "classifier": "entropy"},
    {"prior": "layer", "budget": 0.05},
])
@pytest.mark.parametrize("text_only", [False, True])
def test_runner_plans_are_the_shared_compression_step(smol, knobs, text_only):
    """The HF path plans through core.compress exactly as a server calling it with the same inputs would."""
    runner, tok, task, ids, mask, state = smol
    if text_only:
        state = runner.prefill(ids[:, :200])
    cfg = HybridKVConfig(**knobs)
    cache = runner.compress(state, cfg)
    seq_len = state.seq_len
    media = prompt_media_mask(seq_len, cfg.window, None if text_only else mask)
    # The window is never media; a text-only prompt's media span is everything before its window.
    assert not media[seq_len - cfg.window:].any()
    if text_only:
        assert bool(media[: seq_len - cfg.window].all())
    policy = make_policy(cfg)
    prior = None
    if policy.uses_prior():  # hybridkv's default: every layer's share first, as the server's compaction does
        prior = cross_layer_prior({idx: layer_prior(policy, state.q_window[idx][:, -cfg.window:], state.keys[idx],
                                                    state.scaling[idx], media) for idx in state.keys},
                                  len(state.keys))
    for idx, plan in cache.plans.items():
        q_win = state.q_window[idx][:, -cfg.window:]
        ref = plan_layer(policy, q_win, state.keys[idx], media, idx, state.scaling[idx], prior=prior)
        for f in ("static", "keep_idx", "keep_len", "host_idx", "need"):
            assert torch.equal(getattr(plan, f), getattr(ref, f)), (idx, f)
        assert (plan.top_k, plan.chunk_size) == (ref.top_k, ref.chunk_size)


def test_cross_layer_prior_keeps_the_needle_the_lower_layers_miss(smol):
    """The quickstart's miss at budget 0.1 (two needles, 96 frames, text-only as the server sees it): ranking by
    each layer's own window attention, the lower layers drop the number and the answer comes out truncated;
    ranking every layer by the upper half's attention keeps it, and the answer is the full cache's."""
    runner, tok = smol[0], smol[1]
    task = make_tasks(["sign_number", "two_needles", "distractor_sign", "bib_number"], 2, [96], 0)[3]
    state = runner.prefill(tok(task.text, return_tensors="pt").input_ids)
    answers = {}
    for prior in ("layer", "late"):
        cache = runner.compress(state, HybridKVConfig(budget=0.1, prior=prior))
        assert cache.nbytes().ratio > 9
        answers[prior] = tok.decode(runner.generate(state, cache, 7))
    full = tok.decode(runner.generate(state, runner.compress(state, HybridKVConfig(policy="full")), 7))
    assert task.answer in full and task.answer in answers["late"]
    assert task.answer not in answers["layer"], answers
