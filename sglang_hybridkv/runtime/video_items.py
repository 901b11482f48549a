"""One multimodal item per video for Qwen2-VL / Qwen2.5-VL requests, so the radix cache serves a conversation's
earlier videos when a later turn adds one.

SGLang 0.5.23's processor collects all videos of a request into one item and then splits it per video
(``mm_utils.get_new_expanded_mm_items``) only when the item has one offset span per *frame* (Qwen3-VL, whose
prompt interleaves timestamps). Qwen2-VL and Qwen2.5-VL write one contiguous ``<|video_pad|>`` span per video,
so their videos stay one item whose content hash covers all of them: when turn 2 of an agent adds a clip, the
sentinel ids of turn 1's clip change with it and the radix cache serves nothing past the system prompt. This
hook splits such items per video the way SGLang splits images (rows of ``video_grid_thw``, ``T*H*W`` patch rows
of the pixel values each), before SGLang's own expansion runs; each video then hashes on its own content.
"""

from __future__ import annotations

import copy

import torch

from .requests import active_config


def split_videos(orig, items):
    """AROUND ``get_new_expanded_mm_items``: with compression on, split bundled one-span-per-video items, then
    run SGLang's expansion (without ``--kv-compression`` SGLang's alone: the plugin changes nothing)."""
    if active_config() is None:
        return orig(items)
    return orig([part for item in items for part in _per_video(item)])


def _per_video(item) -> list:
    from sglang.srt.managers.mm_utils import _get_length, _slice_model_data, _slice_value

    grid = item.model_specific_data.get("video_grid_thw") if item.is_video() else None
    n = len(item.offsets or [])
    if grid is None or n < 2 or _get_length(grid) != n or item.feature is None:
        return [item]
    patches = torch.prod(torch.as_tensor(grid), dim=-1).long()
    bounds = [0] + torch.cumsum(patches, 0).tolist()
    if bounds[-1] != _get_length(item.feature):  # not one pixel row per patch: leave it to SGLang
        return [item]
    parts = []
    for i in range(n):
        part = copy.copy(item)
        part.feature = _slice_value(item.feature, bounds[i], bounds[i + 1])
        part.offsets = [item.offsets[i]]
        part.model_specific_data = _slice_model_data(item.model_specific_data, index=i, start=bounds[i],
                                                     end=bounds[i + 1], num_items=n, total_feature_len=bounds[-1])
        part.hash = None  # hashed later from its own pixels
        parts.append(part)
    return parts
