"""Synthetic video, built offline and deterministically: frames as PNG images, or a clip encoded as a real mp4
file (H.264, through torchcodec and FFmpeg's libraries: the same stack SGLang decodes video with)."""

from __future__ import annotations

import base64
import io

import numpy as np

from ..runtime.media import QWEN_VL_IMAGE, QWEN_VL_VIDEO


def frame_array(index: int, size: int = 224) -> np.ndarray:
    """Frame ``index`` of a synthetic clip, ``(size, size, 3)`` uint8: a moving bright square over seeded noise."""
    rng = np.random.default_rng(index)
    img = (rng.random((size, size, 3)) * 96).astype("uint8")
    x = (index * 37) % (size - 48)
    img[40:88, x:x + 48] = (255, 64 + (index * 53) % 192, 32)
    return img


def frame_png(index: int, size: int = 224) -> bytes:
    """:func:`frame_array` as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame_array(index, size)).save(buf, format="PNG")
    return buf.getvalue()


def write_clip(path: str, num_frames: int, first: int = 0, fps: int = 4, size: int = 224) -> str:
    """Encode frames ``first .. first + num_frames - 1`` as an mp4 clip at ``fps``; returns ``path``.

    A clip that continues another one (``first`` = the other's ``first + num_frames``) shows the same square
    moving on, so two clips make one growing video.
    """
    import torch
    from torchcodec.encoders import VideoEncoder

    frames = np.stack([frame_array(first + i, size) for i in range(num_frames)])
    VideoEncoder(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), frame_rate=fps).to_file(path)
    return path


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def vl_prompt(question: str, num_frames: int = 0, videos: int = 0) -> str:
    """A raw chat prompt for the tiny Qwen-VL checkpoints: ``num_frames`` images, ``videos`` videos, the question."""
    return (f"<|im_start|>user\n{QWEN_VL_IMAGE * num_frames}{QWEN_VL_VIDEO * videos}{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
