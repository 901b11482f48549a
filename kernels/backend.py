"""Where Triton kernels can run: on a CUDA device, or anywhere under the interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when a Triton kernel can run on tensors of ``device``."""
    dev = torch.device(device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dev.type == "cpu"
    if dev.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, (int(n) - 1).bit_length()))
