"""Which prompt tokens are media (images, video frames), for every supported model family, in one place.

The media span is what compression selects from (``core.compress.prompt_media_mask``), so a family whose
media tokens were missed would be compressed as if it were text. One rule covers every family SGLang 0.5.23
serves for us, because its scheduler rewrites each media placeholder token of the prompt into the sentinel ids
of its multimodal item (``MultimodalDataItem.padding_values()``, all >= 1,000,000, above any vocabulary)
before a request is scheduled. How the placeholders got there differs per family:

- Qwen2-VL / Qwen2.5-VL: one ``<|image_pad|>`` per merged 2x2 patch of an image, one ``<|video_pad|>`` per
  merged 2x2x2 (two frames) patch of a video, between ``<|vision_start|>`` and ``<|vision_end|>``; the
  start/end tokens are text.
- LLaVA-OneVision (``LlavaQwenForCausalLM``, the only format SGLang 0.5.23 serves it in): one ``<image>`` token
  per image, which the model's ``pad_input_ids`` expands to the image's feature length: a lone image is tiled
  (``anyres_max_9``: the base tile plus the grid tiles, with the unpadded layout's newline tokens), each of
  several images is one tile. A video is sent as its frames (``image_data`` with ``modalities: ["video"]``, one
  ``<image>`` per frame; SGLang's LLaVA processor reads no ``video_data``) and becomes one item per frame of
  modality VIDEO, each padded to one tile. Its items carry no ``offsets``, which is why the rule reads the
  sentinels and not the offsets.

A family whose placeholders SGLang does not rewrite would show no media tokens here; ``media_tokens`` in the
stats makes that visible, and ``plugin.SUPPORTED_ARCHS`` admits only families checked by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# How one image / one video is written in a Qwen2-VL / Qwen2.5-VL prompt before the processor expands it.
QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VL_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# How one image (or one video frame) is written in a LLaVA-OneVision prompt (SGLang's ``chatml-llava``).
LLAVA_OV_IMAGE = "<image>\n"


@dataclass(frozen=True)
class PromptMedia:
    """The media span of one prompt.

    Attributes:
        mask: ``(prompt_len,)`` bool, True on media tokens.
        tokens: media tokens per modality, e.g. ``{"image": 384, "video": 256}`` (modalities with none omitted).
    """

    mask: torch.Tensor
    tokens: dict[str, int]


def prompt_media(req) -> PromptMedia | None:
    """The media span of SGLang request ``req`` (after the scheduler padded its prompt); None for text-only."""
    mm = getattr(req, "multimodal_inputs", None)
    items = getattr(mm, "mm_items", None) if mm is not None else None
    if not items:
        return None
    ids = torch.tensor(list(req.origin_input_ids), dtype=torch.int64)
    by_modality: dict[str, torch.Tensor] = {}
    for item in items:
        # Two identical images share their sentinels: masks are OR-ed per modality, so they count once.
        hit = torch.isin(ids, torch.tensor(list(item.padding_values()), dtype=torch.int64))
        name = item.modality.name.lower()
        by_modality[name] = by_modality[name] | hit if name in by_modality else hit
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for hit in by_modality.values():
        mask |= hit
    return PromptMedia(mask, {name: int(hit.sum()) for name, hit in by_modality.items() if hit.any()})
