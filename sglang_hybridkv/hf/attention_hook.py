"""A transformers attention function that captures prefill KV and serves decode from compressed layers.

Registered once as the attention implementation "hybridkv". With no active session it is exactly SDPA,
and non-causal attention (a vision tower) always goes to SDPA.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Protocol

import torch

IMPLEMENTATION = "hybridkv"
_state = threading.local()


class Session(Protocol):
    """What the hook calls: ``prefill`` sees the full layer, ``decode`` answers from the compressed layer."""

    mode: str

    def on_prefill(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float) -> None: ...

    def on_decode(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float) -> torch.Tensor: ...


@contextlib.contextmanager
def active(session: Session) -> Iterator[None]:
    """Route attention of the calling thread through ``session`` inside the block."""
    prev = getattr(_state, "session", None)
    _state.session = session
    try:
        yield
    finally:
        _state.session = prev


def _sdpa() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def hybridkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """Attention-interface function. Shapes as transformers passes them: ``query (B, Hq, T, D)``,
    ``key/value (B, H, T, D)`` post-RoPE; returns ``(B, T, Hq, D)`` and no weights."""
    session = getattr(_state, "session", None)
    if session is None or not getattr(module, "is_causal", True) or getattr(module, "layer_idx", None) is None:
        return _sdpa()(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"the HF reference path runs one request at a time, got batch {query.shape[0]}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if session.mode == "prefill":
        session.on_prefill(module.layer_idx, query[0], key[0], value[0], scale)
        return _sdpa()(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = session.on_decode(module.layer_idx, query[0], key[0], value[0], scale)  # (T, Hq, D)
    return out[None], None


def register() -> None:
    """Make "hybridkv" a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, hybridkv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
