"""Radix cache with compression (copy-on-compress): uncompressed prefixes stay shared in the tree, each request
decodes from a private compressed copy; follow-up turns hit the cache; eviction under a small pool; no leaks."""

import concurrent.futures as cf
import json

import pytest

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.testing.server import get, post, sglang_server, wait_idle
from tests.runtime.filler import filler

pytestmark = pytest.mark.slow
POOL = 2500
GEN = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
WINDOW = HybridKVConfig().window  # the last WINDOW prompt tokens are never served from the cache


@pytest.fixture(scope="module")
def radix_server(tiny_llama_checkpoint):
    with sglang_server(tiny_llama_checkpoint, extra_args=["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"],
                       max_total_tokens=POOL) as url:
        yield url


def _idle_clean(url):
    st = wait_idle(url, 30)
    assert st["compacted_total"] == st["released_total"] and st["compressed_slots_held"] == 0
    assert st["host_tier_bytes"] == 0 and st["radix_protected_tokens"] == 0
    get(url + "/health")
    return st


def test_budget_one_same_with_radix_on_and_off(radix_server, tiny_llama_checkpoint):
    prompts = [filler("Video", s) + " What happened?" for s in (1, 2)]
    params = dict(GEN, custom_params={"hybridkv": {"budget": 1.0}})
    # Twice each: the second request of a prompt extends over the cached uncompressed prefix.
    on = [post(radix_server + "/generate", {"text": p, "sampling_params": params}) for p in prompts + prompts]
    assert on[2]["meta_info"]["cached_tokens"] == on[0]["meta_info"]["prompt_tokens"] - WINDOW  # window recomputed
    with sglang_server(tiny_llama_checkpoint, extra_args=["--kv-compression", "hybridkv", "--disable-radix-cache"],
                       max_total_tokens=POOL) as off_url:
        off = [post(off_url + "/generate", {"text": p, "sampling_params": params}) for p in prompts]
    with sglang_server(tiny_llama_checkpoint, max_total_tokens=POOL) as none_url:
        ref = [post(none_url + "/generate", {"text": p, "sampling_params": GEN}) for p in prompts]
    for i in range(2):
        assert on[i]["output_ids"] == on[i + 2]["output_ids"] == off[i]["output_ids"] == ref[i]["output_ids"]


def test_follow_up_turns_hit_the_cache_and_recompress(radix_server):
    history, prev_prompt = filler("Video", 7), 0
    for turn, question in enumerate(["Q: what?", "Q: where?", "Q: who?"]):
        history += f"\n{question}\nA:"
        out = post(radix_server + "/generate", {"text": history, "sampling_params": GEN})
        meta = out["meta_info"]
        if turn:
            # The earlier prompt is cached (its answer is not: compressed requests' own tokens stay out of the
            # tree); the last `window` prompt tokens are always recomputed for the observation window.
            assert meta["cached_tokens"] >= prev_prompt - WINDOW
            assert meta["prompt_tokens"] - meta["cached_tokens"] >= WINDOW
        assert meta["hybridkv"]["compressed"] and meta["hybridkv"]["prompt_tokens"] == meta["prompt_tokens"]
        history += out["text"]
        prev_prompt = meta["prompt_tokens"]
    _idle_clean(radix_server)


def test_shared_system_prompt_across_many_requests(radix_server):
    system = filler("Video", 11, 500)
    first = post(radix_server + "/generate", {"text": system + " Question 0?", "sampling_params": GEN})
    shared = first["meta_info"]["prompt_tokens"] - 5
    with cf.ThreadPoolExecutor(12) as ex:
        outs = list(ex.map(lambda i: post(radix_server + "/generate", {
            "text": system + f" Question {i}?", "sampling_params": GEN}), range(1, 13)))
    for o in outs:
        assert o["meta_info"]["cached_tokens"] >= 0.9 * shared
        assert o["meta_info"]["completion_tokens"] == GEN["max_new_tokens"]
    _idle_clean(radix_server)


def test_eviction_under_a_small_pool(radix_server):
    # 8 distinct 600-token prompts into a 2,500-slot pool: the tree must evict old prefixes. The first 7 go 4 at a
    # time; the last goes alone afterwards, so it is the tree's newest entry whatever order the threads arrived in
    # (sent with the others, an earlier-admitted "last" prompt can rightly be the one LRU evicts).
    send = lambda s: post(radix_server + "/generate", {"text": filler("Video", 100 + s) + " Summary?",
                                                       "sampling_params": GEN})
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(send, range(7)))
    outs.append(send(7))
    assert all(o["meta_info"]["completion_tokens"] == GEN["max_new_tokens"] for o in outs)
    _idle_clean(radix_server)
    # A recent prompt is still served from the tree; the oldest ones made room (LRU) and are recomputed.
    again = lambda s: send(s)["meta_info"]
    recent = again(7)
    assert recent["cached_tokens"] >= recent["prompt_tokens"] - WINDOW - 8
    oldest = again(0)
    assert oldest["cached_tokens"] < 0.5 * oldest["prompt_tokens"]
    _idle_clean(radix_server)


def test_multi_turn_video_example(tmp_path):
    """The growing-video agent: turn 1 one clip, turn 2 a second clip, turn 3 no new footage (budget 0.1)."""
    from examples.multi_turn_video_qa import main

    report = main(["--turns", "3", "--frames", "24", "--max-new-tokens", "6", "--json", str(tmp_path / "out.json")])
    turns = json.loads((tmp_path / "out.json").read_text())["turns"]
    assert turns == json.loads(json.dumps(report["turns"]))
    assert [t["new_clip"] for t in turns] == [True, True, False]
    clip = turns[0]["video_tokens"]
    assert clip > 0 and turns[1]["video_tokens"] == turns[2]["video_tokens"] == 2 * clip
    for prev, t in zip(turns, turns[1:]):  # the radix cache serves the earlier turns, videos included
        assert t["cached_tokens"] >= 0.9 * prev["prompt_tokens"]
    for t in turns:  # each turn's request, new footage included, compressed to the budget
        assert t["media_tokens"] == t["video_tokens"]
        assert t["kv_bytes_full"] >= 5 * t["kv_bytes_device"]
