"""LLaVA-OneVision (lmms-lab's ``LlavaQwenForCausalLM``: SigLIP tower, anyres tiling), served on CPU with
compression beside the uncompressed server: a tiny random checkpoint with one tiled image, four images and a
video sent as frames.

SGLang runs this family in float16 (``LLAVA_OV_ARGS``), where a request's tokens depend on which requests share
its batch (fp16 rounding of differently shaped products), so requests go one at a time to both servers: the
retraction drill (which needs requests decoded together) runs on Qwen2-VL (``test_model_families.py``), in
float32."""

import math

import pytest

from sglang_hybridkv.runtime.media import LLAVA_OV_IMAGE
from sglang_hybridkv.testing.frames import data_url, frame_png
from sglang_hybridkv.testing.models import LLAVA_OV_ARGS
from sglang_hybridkv.testing.server import generate_all, sglang_server, wait_idle

pytestmark = pytest.mark.slow
GEN = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
QUESTION = "Where does the orange square go?"


# Media tokens SGLang pads each request to: a lone 224x224 image is the 8x8 base tile plus a 2x2 grid of tiles
# unpadded to 16 rows of 16 + 1 newline (64 + 272); several images or video frames are one 64-token tile each.
OV_FRAMES = 8
OV_MEDIA = [("image", 64 + 16 * 17), ("image", 4 * 64), ("video", OV_FRAMES * 64)]


def _ov_prompt(question, images):
    return f"<|im_start|>user\n{LLAVA_OV_IMAGE * images}{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ov_requests():
    """A lone image (tiled), four images (``multi-images``) and an 8-frame video (``modalities: ["video"]``): in
    each prompt the text (always kept) is under 10 % of it, so budget 0.1 can be met."""
    frames = [data_url(frame_png(i)) for i in range(OV_FRAMES)]
    return [{"text": _ov_prompt(QUESTION, 1), "image_data": frames[:1]},
            {"text": _ov_prompt(QUESTION, 4), "image_data": frames[:4], "modalities": ["multi-images"]},
            {"text": _ov_prompt(QUESTION, OV_FRAMES), "image_data": frames, "modalities": ["video"]}]


def _send(url, requests, **params):
    return generate_all(url, requests, dict(GEN, **params))


@pytest.fixture(scope="module")
def none_ov(tiny_llava_ov_checkpoint):
    with sglang_server(tiny_llava_ov_checkpoint, extra_args=LLAVA_OV_ARGS) as url:
        yield url


@pytest.fixture(scope="module")
def hybridkv_ov(tiny_llava_ov_checkpoint):
    args = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1", "--hybridkv-window", "8"]
    with sglang_server(tiny_llava_ov_checkpoint, extra_args=LLAVA_OV_ARGS + args) as url:
        yield url


def test_llava_ov_budget_one_equals_none(none_ov, hybridkv_ov, ov_requests):
    ref = _send(none_ov, ov_requests)
    out = _send(hybridkv_ov, ov_requests, custom_params={"hybridkv": {"budget": 1.0}})
    for got, want, (modality, media) in zip(out, ref, OV_MEDIA):
        stats = got["meta_info"]["hybridkv"]
        assert got["output_ids"] == want["output_ids"]
        assert stats["compressed"] and stats["prompt_tokens"] == want["meta_info"]["prompt_tokens"]
        assert stats["media_tokens"] == stats[f"{modality}_tokens"] == media


def test_llava_ov_budget_01_saves_memory(hybridkv_ov, ov_requests):
    for got in _send(hybridkv_ov, ov_requests):
        stats = got["meta_info"]["hybridkv"]
        assert stats["compressed"] and stats["budget"] == 0.1
        assert stats["kv_slots_device"] <= math.ceil(0.1 * stats["prompt_tokens"])
        assert stats["kv_bytes_full"] >= 9 * stats["kv_bytes_device"]
    st = wait_idle(hybridkv_ov)
    assert st["compacted_total"] == st["released_total"] and st["compressed_slots_held"] == 0
