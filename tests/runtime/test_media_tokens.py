"""The media span the runtime compresses, read from prompts padded by SGLang's own code (``pad_mm_tokens``, what
the scheduler applies to Qwen2-VL / Qwen2.5-VL prompts before a request runs): image and video spans, both in one
prompt, a repeated image, and text-only prompts."""

from array import array
from types import SimpleNamespace

import torch
from sglang.srt.managers.mm_utils import pad_mm_tokens
from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs
from sglang.srt.multimodal.modality import Modality

from sglang_hybridkv.runtime.media import prompt_media
from sglang_hybridkv.testing.tiny_vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START


def _span(pad, n):
    return [VISION_START] + [pad] * n + [VISION_END]


def _padded_request(ids, spans):
    """SGLang's request view after padding: ``spans`` are (modality, start, end, content hash) per item."""
    items = []
    for modality, start, end, digest in spans:
        item = MultimodalDataItem(modality=modality, offsets=[(start, end)])
        item.set_hash(digest)
        items.append(item)
    mm = MultimodalInputs(mm_items=items, im_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)
    return SimpleNamespace(origin_input_ids=pad_mm_tokens(array("q", ids), mm), multimodal_inputs=mm)


def test_image_and_video_spans_in_one_prompt():
    ids = [1, 2] + _span(IMAGE_PAD, 4) + [3] + _span(VIDEO_PAD, 6) + [4, 5, 6]
    req = _padded_request(ids, [(Modality.IMAGE, 3, 6, 11), (Modality.VIDEO, 10, 15, 22)])
    media = prompt_media(req)
    want = torch.tensor([i in range(3, 7) or i in range(10, 16) for i in range(len(ids))])
    assert torch.equal(media.mask, want)  # the pads only: vision start/end stay text
    assert media.tokens == {"image": 4, "video": 6}


def test_the_same_image_twice_counts_both_spans():
    ids = _span(IMAGE_PAD, 4) + [7] + _span(IMAGE_PAD, 4) + [8]
    req = _padded_request(ids, [(Modality.IMAGE, 1, 4, 5), (Modality.IMAGE, 8, 11, 5)])
    media = prompt_media(req)
    assert media.tokens == {"image": 8} and int(media.mask.sum()) == 8


def test_text_only_prompt_has_no_media():
    assert prompt_media(SimpleNamespace(origin_input_ids=array("q", [1, 2, 3]), multimodal_inputs=None)) is None
