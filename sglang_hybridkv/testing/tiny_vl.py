"""Tiny random-weight Qwen2.5-VL and Qwen2-VL models built offline, for exercising the multimodal path on CPU.

Qwen2.5-VL's real special-token ids are kept (151652 vision_start, 151653 vision_end, 151655 image_pad), so
the same ids work with a tokenizer that carries Qwen2.5's vocabulary. Head size 64 needs
``mrope_section=[8, 12, 12]`` (it must sum to head_dim / 2).
"""

from __future__ import annotations

import torch

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
VOCAB = 151936


def _text_config(num_kv_heads: int, num_heads: int, layers: int, vocab: int, bos_eos: tuple[int, int]) -> dict:
    """The language model both Qwen-VL families share here (head size 64, M-RoPE sections [8, 12, 12])."""
    head_dim = 64
    return {
        "vocab_size": vocab, "hidden_size": head_dim * num_heads, "intermediate_size": 256,
        "num_hidden_layers": layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [8, 12, 12]},
        "tie_word_embeddings": False, "initializer_range": 0.2, "bos_token_id": bos_eos[0], "eos_token_id": bos_eos[1],
    }


def tiny_qwen2_5_vl_config(num_kv_heads: int = 2, num_heads: int = 4, layers: int = 2, vocab: int = VOCAB,
                           special_ids: tuple[int, int, int, int] = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD),
                           bos_eos: tuple[int, int] = (151643, 151645)):
    """Config of a tiny Qwen2.5-VL (~20 M parameters at the real vocabulary size, most of it the embedding).

    ``special_ids`` are (vision_start, vision_end, image_pad, video_pad); a checkpoint that ships its own
    tokenizer passes that tokenizer's ids, bos/eos ids and size.
    """
    start, end, image, video = special_ids
    from transformers import Qwen2_5_VLConfig

    text = _text_config(num_kv_heads, num_heads, layers, vocab, bos_eos)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
            "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
        },
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        bos_token_id=bos_eos[0], eos_token_id=bos_eos[1], tie_word_embeddings=False,
    )


def tiny_qwen2_vl_config(num_kv_heads: int = 2, num_heads: int = 4, layers: int = 2, vocab: int = VOCAB,
                         special_ids: tuple[int, int, int, int] = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD),
                         bos_eos: tuple[int, int] = (151643, 151645)):
    """Config of a tiny Qwen2-VL: the same language model, Qwen2-VL's vision tower (full attention, no window,
    ``embed_dim``/``mlp_ratio`` instead of Qwen2.5-VL's sizes). Arguments as :func:`tiny_qwen2_5_vl_config`."""
    start, end, image, video = special_ids
    from transformers import Qwen2VLConfig

    text = _text_config(num_kv_heads, num_heads, layers, vocab, bos_eos)
    return Qwen2VLConfig(
        text_config=text,
        # SGLang's Qwen2-VL vision tower reads ``in_chans``; transformers calls it ``in_channels``.
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": text["hidden_size"], "mlp_ratio": 2,
                       "num_heads": 2, "in_channels": 3, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        bos_token_id=bos_eos[0], eos_token_id=bos_eos[1], tie_word_embeddings=False,
    )


def tiny_qwen2_5_vl(seed: int = 0, **kw):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` in float32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**kw)).float().eval()


def tiny_qwen2_vl(seed: int = 0, **kw):
    """A random-weight ``Qwen2VLForConditionalGeneration`` in float32, eval mode."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(**kw)).float().eval()


def image_inputs(text_before: list[int], text_after: list[int], grid: tuple[int, int, int] = (1, 8, 8),
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for one image between two text spans, as Qwen2.5-VL's processor would build them.

    ``grid`` is (t, h, w) in patches; the image occupies ``t*h*w/4`` pad tokens (2x2 spatial merge).
    Returns ``input_ids (1, L)``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` and the
    ``media_mask (L,)`` of image-pad positions.
    """
    t, h, w = grid
    n_img = t * h * w // 4
    ids = text_before + [VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + text_after
    input_ids = torch.tensor([ids])
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
    media = input_ids[0] == IMAGE_PAD
    return {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": torch.tensor([[t, h, w]]),
            "mm_token_type_ids": media.int()[None], "media_mask": media}
