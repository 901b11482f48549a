"""Image and video requests end to end: SGLang's real multimodal path (processor, image/video pad tokens, mm
offsets, mrope, the vision tower; for video: mp4 decoding with torchcodec, frame sampling, temporal patch
merging) on a tiny random Qwen2.5-VL, CPU, with and without compression. One uncompressed and one compressing
server serve every test of the module."""

import math
import time

import openai
import pytest
import sglang as sgl
from sglang.lang.chat_template import get_chat_template

from sglang_hybridkv.frontend import MediaEndpoint, video_data_url
from sglang_hybridkv.testing.frames import data_url, frame_png, vl_prompt, write_clip
from sglang_hybridkv.testing.server import (decode_slot_counts, hybridkv_state, post, server_log, sglang_server,
                                            wait_idle)

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
    # Every head dynamic: the image KV goes to the host tier and decoding fetches chunks of it.
    copied = hybridkv_state(hkv_vl)["retrieval_rows_copied"]
    dyn = post(hkv_vl + "/generate", _request(custom_params={"hybridkv": {"policy": "all_dynamic", "budget": 0.2}}))
    assert dyn["meta_info"]["hybridkv"]["dynamic_heads"] == 2 * 2 and dyn["meta_info"]["hybridkv"]["kv_bytes_host"] > 0
    assert hybridkv_state(hkv_vl)["retrieval_rows_copied"] > copied


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


# ---- video ------------------------------------------------------------------------------------------------
# 4 s at 4 fps: SGLang samples 2 fps -> 8 frames -> 4 temporal patches of 64 tokens, so that the text the
# budget keeps whole (chat markup and question, ~23 tokens) stays below a tenth of the prompt.
CLIP_FRAMES = 16


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(str(tmp_path_factory.mktemp("clips") / "clip.mp4"), CLIP_FRAMES)


def _video_request(clip, images=0, **params):
    req = {"text": vl_prompt(QUESTION, num_frames=images, videos=1), "video_data": [video_data_url(clip)],
           "sampling_params": dict(GEN, **params)}
    if images:
        req["image_data"] = [data_url(frame_png(i)) for i in range(images)]
    return req


def test_video_budget_one_equals_none(none_vl, hkv_vl, clip):
    ref = post(none_vl + "/generate", _video_request(clip))
    out = post(hkv_vl + "/generate", _video_request(clip, custom_params={"hybridkv": {"budget": 1.0}}))
    video = ref["meta_info"]["video_tokens"]
    assert video > 0 and out["meta_info"]["video_tokens"] == video
    assert out["output_ids"] == ref["output_ids"]
    stats = out["meta_info"]["hybridkv"]
    assert stats["compressed"] and stats["video_tokens"] == stats["media_tokens"] == video
    assert stats["image_tokens"] == 0


def test_video_is_compressed_to_budget(none_vl, hkv_vl, clip):
    before_none, before_hkv = len(server_log(none_vl)), len(server_log(hkv_vl))
    post(none_vl + "/generate", _video_request(clip))
    out = post(hkv_vl + "/generate", _video_request(clip))
    stats = out["meta_info"]["hybridkv"]
    assert stats["video_tokens"] == out["meta_info"]["video_tokens"] > 0
    # Budget 0.1: the request holds a tenth of its prompt's pool slots (rounded up to a whole slot), every
    # resident byte counted; SGLang's own slot count during decode agrees.
    assert stats["kv_slots_device"] <= math.ceil(0.1 * stats["prompt_tokens"])
    assert stats["kv_bytes_full"] >= 9 * stats["kv_bytes_device"]
    time.sleep(1)
    used_none, used_hkv = decode_slot_counts(none_vl, before_none), decode_slot_counts(hkv_vl, before_hkv)
    assert max(used_hkv) <= stats["kv_slots_device"] + GEN["max_new_tokens"] + 1 < max(used_none) / 5


def test_image_video_and_text_in_one_request(none_vl, hkv_vl, clip):
    ref = post(none_vl + "/generate", _video_request(clip, images=2))
    out = post(hkv_vl + "/generate", _video_request(clip, images=2, custom_params={"hybridkv": {"budget": 1.0}}))
    assert out["output_ids"] == ref["output_ids"]
    stats, meta = out["meta_info"]["hybridkv"], ref["meta_info"]
    assert stats["image_tokens"] == meta["image_tokens"] == 2 * 64
    assert stats["video_tokens"] == meta["video_tokens"] > 0
    assert stats["media_tokens"] == stats["image_tokens"] + stats["video_tokens"]


def test_openai_video_url(hkv_vl, clip):
    client = openai.OpenAI(base_url=hkv_vl + "/v1", api_key="none")
    before = wait_idle(hkv_vl)["compacted_total"]
    chat = client.chat.completions.create(model="default", temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_data_url(clip)}},
                                     {"type": "text", "text": QUESTION}]}])
    assert chat.choices[0].message.content
    # The chat template put the video where the part was: the same prompt as the raw /generate request.
    raw = post(hkv_vl + "/generate", _video_request(clip))["meta_info"]
    assert chat.usage.prompt_tokens == raw["prompt_tokens"]
    assert chat.usage.prompt_tokens_details.video_tokens == raw["video_tokens"]
    assert wait_idle(hkv_vl)["compacted_total"] == before + 2


@sgl.function
def _ask_about_video(s, path, question):
    s += sgl.user_begin()
    s += sgl.video(path, 4)
    s += question
    s += sgl.user_end()
    s += sgl.assistant(sgl.gen("answer", max_tokens=GEN["max_new_tokens"], temperature=0, ignore_eos=True))


def test_sgl_video_frontend_program(hkv_vl, clip):
    backend = MediaEndpoint(hkv_vl)
    backend.chat_template = get_chat_template("qwen2-vl")
    state = _ask_about_video.run(path=clip, question=QUESTION, backend=backend)
    meta = state.get_meta_info("answer")
    assert meta["hybridkv"]["compressed"] and meta["hybridkv"]["video_tokens"] == meta["video_tokens"] > 0
    # The program sent the clip as a video: the same request as /generate with the program's prompt (the video
    # placeholder where the program put sgl.video) and the file.
    head = "<|im_start|>assistant\n"
    prompt = state.text()[: state.text().rindex(head) + len(head)]
    prompt = prompt.replace(backend.chat_template.image_token, backend.video_token)
    raw = post(hkv_vl + "/generate", {"text": prompt, "video_data": [video_data_url(clip)], "sampling_params": GEN})
    assert meta["prompt_tokens"] == raw["meta_info"]["prompt_tokens"]
    assert state["answer"] == raw["text"]


def test_second_video_keeps_the_first_one_cached(none_vl, hkv_vl, clip, tmp_path):
    """A turn that adds a clip: each video is its own multimodal item (runtime/video_items.py), so the radix cache
    serves the earlier turn, the first video included; the split changes no token (budget 1.0 = uncompressed)."""
    more = video_data_url(write_clip(str(tmp_path / "more.mp4"), CLIP_FRAMES, first=CLIP_FRAMES))
    first = post(hkv_vl + "/generate", _video_request(clip))["meta_info"]
    both = dict(_video_request(clip, custom_params={"hybridkv": {"budget": 1.0}}),
                text=vl_prompt(QUESTION, videos=2), video_data=[video_data_url(clip), more])
    out = post(hkv_vl + "/generate", both)
    ref = post(none_vl + "/generate", dict(both, sampling_params=GEN))
    assert out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["video_tokens"] == ref["meta_info"]["video_tokens"] == 2 * first["video_tokens"]
    # Everything before the second video comes from the cache (the first prompt's last tokens differ).
    assert out["meta_info"]["cached_tokens"] >= first["prompt_tokens"] - len(QUESTION)
