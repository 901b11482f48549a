"""Synthetic video frames (PNG images) for multimodal requests, built offline and deterministically."""

from __future__ import annotations

import base64
import io

import numpy as np

VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a raw Qwen2.5-VL prompt


def frame_png(index: int, size: int = 224) -> bytes:
    """Frame ``index`` of a synthetic clip: a moving bright square over seeded noise, as PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(index)
    img = (rng.random((size, size, 3)) * 96).astype("uint8")
    x = (index * 37) % (size - 48)
    img[40:88, x:x + 48] = (255, 64 + (index * 53) % 192, 32)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def vl_prompt(question: str, num_frames: int) -> str:
    """A raw chat prompt for the tiny Qwen2.5-VL checkpoint: ``num_frames`` images, then the question."""
    return (f"<|im_start|>user\n{VL_IMAGE * num_frames}{question}<|im_end|>\n<|im_start|>assistant\n")
