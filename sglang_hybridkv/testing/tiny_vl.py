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


# ---- LLaVA-OneVision ------------------------------------------------------------------------------------
# SGLang 0.5.23 serves LLaVA-OneVision in the original LLaVA format (``LlavaQwenForCausalLM``, config
# ``model_type: llava``, the Qwen2 fields flat at the top, the SigLIP tower loaded from the path in
# ``mm_vision_tower``); the HF-format ``LlavaOnevisionForConditionalGeneration`` is not in its registry.
# 112-pixel tiles of 14-pixel patches: 8x8 = 64 tokens per tile.
LLAVA_TILE, LLAVA_PATCH = 112, 14
LLAVA_PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224], [224, 336], [336, 224], [336, 336]]


def tiny_siglip(seed: int = 0):
    """A random 2-layer ``SiglipVisionModel`` (hidden 64, 112-pixel input, 14-pixel patches), float32, eval."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=LLAVA_TILE, patch_size=LLAVA_PATCH)
    return SiglipVisionModel(cfg).float().eval()


def tiny_llava_onevision_config(vision_tower: str, image_token: int, vocab: int, bos_eos: tuple[int, int],
                                num_kv_heads: int = 2, num_heads: int = 4, layers: int = 2) -> dict:
    """``config.json`` of a tiny LLaVA-OneVision (``LlavaQwenForCausalLM``) as the lmms-lab checkpoints write it:
    Qwen2 language model fields, a 2-layer GELU projector from the SigLIP tower at ``vision_tower`` (a path
    whose name contains ``siglip``: that is how SGLang picks the tower class), ``anyres_max_9`` tiling with
    unpadded newlines (one image: base tile + grid tiles; several images or video frames: one tile each)."""
    head_dim = 64
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
        "vocab_size": vocab, "hidden_size": head_dim * num_heads, "intermediate_size": 256,
        "num_hidden_layers": layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": bos_eos[0], "eos_token_id": bos_eos[1],
        "mm_vision_tower": vision_tower, "mm_hidden_size": 64, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": LLAVA_PINPOINTS,
        "image_token_index": image_token, "torch_dtype": "float32",
    }


def tiny_llava_onevision_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names of the lmms-lab checkpoints: the Qwen2 model (``model.*``, ``lm_head``),
    the projector ``model.mm_projector.{0,2}`` and ``model.image_newline``. The tower is saved separately."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    lm = Qwen2ForCausalLM(Qwen2Config(**{k: config[k] for k in keys}, initializer_range=0.2))
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    weights = {k: v.detach().float().contiguous() for k, v in lm.state_dict().items()}
    weights.update({
        "model.mm_projector.0.weight": torch.randn(hidden, mm_hidden, generator=g) * 0.2,
        "model.mm_projector.0.bias": torch.zeros(hidden),
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.2,
        "model.mm_projector.2.bias": torch.zeros(hidden),
        "model.image_newline": torch.randn(hidden, generator=g) * 0.2,
    })
    return weights
