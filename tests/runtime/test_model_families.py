"""Qwen2-VL, served on CPU with compression beside the uncompressed server: a tiny random checkpoint (its own
vision tower and processor) with images, a video and both in one request. The compressing server runs SGLang's
retraction drill, so requests decoded together are retracted and re-prefilled mid-decode; a request alone is
never retracted (SGLang keeps the last running request), which gives the reference. LLaVA-OneVision is in
``test_llava_onevision.py`` (its own module, so that these servers stop before its servers start)."""

import math

import pytest

from sglang_hybridkv.frontend import video_data_url
from sglang_hybridkv.testing.frames import data_url, frame_png, vl_prompt, write_clip
from sglang_hybridkv.testing.server import generate_all, sglang_server, wait_idle

pytestmark = pytest.mark.slow
GEN = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
DRILL = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "5"}
QUESTION = "Where does the orange square go?"


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """An image request, a video request and one with both (3 frames of 64 tokens, a 16-frame clip: 256 tokens)."""
    clip = video_data_url(write_clip(str(tmp_path_factory.mktemp("clips") / "clip.mp4"), 16))
    images = [data_url(frame_png(i)) for i in range(3)]
    return [{"text": vl_prompt(QUESTION, num_frames=3), "image_data": images},
            {"text": vl_prompt(QUESTION, videos=1), "video_data": [clip]},
            {"text": vl_prompt(QUESTION, num_frames=1, videos=1), "image_data": images[:1], "video_data": [clip]}]


@pytest.fixture(scope="module")
def none_q2(tiny_qwen2_vl_checkpoint):
    with sglang_server(tiny_qwen2_vl_checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def drilled_q2(tiny_qwen2_vl_checkpoint):
    args = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1", "--hybridkv-window", "8"]
    with sglang_server(tiny_qwen2_vl_checkpoint, extra_args=args, env=DRILL) as url:
        yield url


def _send(url, requests, together, **params):
    return generate_all(url, requests, dict(GEN, **params), together)


def test_qwen2_vl_budget_one_equals_none_through_retraction(none_q2, drilled_q2, requests):
    ref = _send(none_q2, requests, together=False)
    out = _send(drilled_q2, requests, together=True, custom_params={"hybridkv": {"budget": 1.0}})
    for got, want in zip(out, ref):
        meta, stats = want["meta_info"], got["meta_info"]["hybridkv"]
        assert got["output_ids"] == want["output_ids"]
        assert stats["compressed"]
        assert stats["image_tokens"] == meta.get("image_tokens", 0) and stats["video_tokens"] == meta.get("video_tokens", 0)
        assert stats["media_tokens"] == stats["image_tokens"] + stats["video_tokens"] > 0
    assert [s > 0 for s in (ref[0]["meta_info"].get("image_tokens", 0), ref[1]["meta_info"].get("video_tokens", 0))] \
        == [True, True]
    assert sum(o["meta_info"].get("num_retractions", 0) for o in out) > 0


def test_qwen2_vl_budget_01_saves_memory_and_survives_retraction(drilled_q2, requests):
    together = _send(drilled_q2, requests, together=True)
    alone = _send(drilled_q2, requests, together=False)
    assert sum(o["meta_info"].get("num_retractions", 0) for o in together) > 0
    assert all(o["meta_info"].get("num_retractions", 0) == 0 for o in alone)
    for got, want in zip(together, alone):
        stats = got["meta_info"]["hybridkv"]
        assert stats["kept_digest"] == want["meta_info"]["hybridkv"]["kept_digest"]
        assert got["output_ids"] == want["output_ids"]
        assert stats["kv_slots_device"] <= math.ceil(0.1 * stats["prompt_tokens"])
    st = wait_idle(drilled_q2)
    assert st["compacted_total"] == st["released_total"] and st["compressed_slots_held"] == 0
