"""Image requests end to end: SGLang's real multimodal path (processor, image pad tokens, mm offsets, mrope, the
vision tower) on a tiny random Qwen2.5-VL, CPU, with and without compression."""

import time

import openai
import pytest

from sglang_hybridkv.testing.frames import data_url, frame_png, vl_prompt
from sglang_hybridkv.testing.server import decode_slot_counts, post, server_log, sglang_server, wait_idle

pytestmark = pytest.mark.slow
LOG = ["--log-level", "info", "--decode-log-interval", "1"]
GEN = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
FRAMES = 6  # 64 image tokens each at 224x224
QUESTION = "Which frame shows the orange square furthest to the right?"


def _request(num_frames=FRAMES, **params):
    return {"text": vl_prompt(QUESTION, num_frames), "image_data": [data_url(frame_png(i)) for i in range(num_frames)],
            "sampling_params": dict(GEN, **params)}


@pytest.fixture(scope="module")
def none_vl(tiny_vl_checkpoint):
    with sglang_server(tiny_vl_checkpoint, extra_args=LOG) as url:
        yield url


@pytest.fixture(scope="module")
def hkv_vl(tiny_vl_checkpoint):
    with sglang_server(tiny_vl_checkpoint, extra_args=["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1",
                                                       "--hybridkv-window", "8"] + LOG) as url:
        yield url


def test_budget_one_equals_none_on_images(none_vl, hkv_vl):
    ref = post(none_vl + "/generate", _request())
    out = post(hkv_vl + "/generate", _request(custom_params={"hybridkv": {"budget": 1.0}}))
    assert ref["meta_info"]["image_tokens"] == out["meta_info"]["image_tokens"] == 64 * FRAMES
    assert out["output_ids"] == ref["output_ids"]
    stats = out["meta_info"]["hybridkv"]
    assert stats["compressed"] and stats["media_tokens"] == 64 * FRAMES


def test_images_are_the_media_span_and_are_compressed(none_vl, hkv_vl):
    before_none, before_hkv = len(server_log(none_vl)), len(server_log(hkv_vl))
    post(none_vl + "/generate", _request())
    out = post(hkv_vl + "/generate", _request())
    stats, prompt = out["meta_info"]["hybridkv"], out["meta_info"]["prompt_tokens"]
    assert stats["media_tokens"] == 64 * FRAMES  # the processor's offsets, not the text-only fallback
    assert stats["static_heads"] + stats["dynamic_heads"] == 2 * 2  # 2 layers x 2 KV heads
    assert stats["kv_bytes_full"] >= 3 * stats["kv_bytes_device"]
    assert (stats["kv_bytes_host"] > 0) == (stats["dynamic_heads"] > 0)
    time.sleep(1)
    used_none, used_hkv = decode_slot_counts(none_vl, before_none), decode_slot_counts(hkv_vl, before_hkv)
    # The pool has more free slots after compaction than a none server holding the same request.
    assert max(used_none) >= prompt + GEN["max_new_tokens"] - 2
    assert max(used_hkv) <= stats["kv_slots_device"] + GEN["max_new_tokens"] + 1 < max(used_none) / 3


def test_openai_chat_with_images_and_no_leaks(hkv_vl):
    client = openai.OpenAI(base_url=hkv_vl + "/v1", api_key="none")
    content = [{"type": "image_url", "image_url": {"url": data_url(frame_png(i))}} for i in range(3)]
    chat = client.chat.completions.create(model="default", temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": content + [{"type": "text", "text": QUESTION}]}])
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens_details.image_tokens == 3 * 64
    # Text-only and image requests mixed in one server, then idle: nothing held.
    post(hkv_vl + "/generate", {"text": "Hello there, how are you?", "sampling_params": GEN})
    st = wait_idle(hkv_vl)
    assert st["compacted_total"] == st["released_total"] >= 3 and st["radix_protected_tokens"] == 0
    assert st["compressed_slots_held"] == 0 and st["host_tier_bytes"] == 0
