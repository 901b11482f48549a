"""Reference path for HF transformers models: full prefill, compression at its end, compressed decode.

Usage::

    runner = HybridKVRunner(model)
    state = runner.prefill(input_ids, media_mask=mask)             # full attention, KV captured per layer
    cache = runner.compress(state, HybridKVConfig(budget=0.1))   # per-layer plans + compaction
    logits = runner.decode(cache, next_ids)                       # (T, vocab) over the compressed cache
    print(cache.nbytes())                                         # resident bytes per tier

One prefill may be compressed under many configs (the fidelity benchmark does that); ``compress`` never
modifies the prefill state. Batch size is 1: this path is for evaluation and debugging, not serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import HybridKVConfig
from ..core.attention import decode_attention
from ..core.cache import CompressedLayer, KVBytes
from ..core.compress import cross_layer_prior, layer_prior, plan_layer, prompt_media_mask
from ..core.plan import LayerPlan
from ..core.policies import make_policy
from . import attention_hook


@dataclass
class PrefillState:
    """Everything prefill leaves behind for compression, per layer.

    Attributes:
        keys, values: per layer ``(H, L, D)`` full prompt KV.
        q_window: per layer ``(Hq, w_max, D)`` queries of the last ``w_max`` prompt positions.
        scaling: per layer softmax scale.
        media_mask: ``(L,)`` bool as given, or None for a text-only request (the span then depends on the
            window, decided per config by :func:`core.compress.prompt_media_mask`).
        logits: ``(vocab,)`` next-token logits after the prompt (the same for every policy).
        positions: ``(..., 1, L)`` the position ids decode continues from (3 rows for mrope).
    """

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    q_window: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    media_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    next_position: torch.Tensor | None = None  # (P,) next position id per rope row
    seconds: float = 0.0

    @property
    def seq_len(self) -> int:
        return next(iter(self.keys.values())).shape[1]


@dataclass
class CompressedCache:
    """A request's compressed KV: one :class:`CompressedLayer` per layer plus the config that made it."""

    config: HybridKVConfig
    layers: dict[int, CompressedLayer]
    plans: dict[int, LayerPlan]
    next_position: torch.Tensor
    decoded: int = 0
    seconds: float = 0.0

    def nbytes(self) -> KVBytes:
        """Resident bytes of the whole request, per tier."""
        total = KVBytes()
        for layer in self.layers.values():
            total = total + layer.nbytes()
        return total

    @property
    def static_head_fraction(self) -> float:
        n = sum(p.static.numel() for p in self.plans.values())
        return sum(p.num_static for p in self.plans.values()) / max(1, n)


class _Capture:
    mode = "prefill"

    def __init__(self, state: PrefillState, w_max: int) -> None:
        self.state, self.w_max = state, w_max

    def on_prefill(self, layer_idx, query, key, value, scaling):
        s = self.state
        s.keys[layer_idx] = key.detach().clone()
        s.values[layer_idx] = value.detach().clone()
        s.q_window[layer_idx] = query[:, -self.w_max:].detach().clone()
        s.scaling[layer_idx] = scaling

    def on_decode(self, *a):  # pragma: no cover - prefill session never decodes
        raise RuntimeError("capture session cannot decode")


class _Decode:
    mode = "decode"

    def __init__(self, cache: CompressedCache) -> None:
        self.cache = cache

    def on_prefill(self, *a):  # pragma: no cover
        raise RuntimeError("decode session cannot prefill")

    def on_decode(self, layer_idx, query, key, value, scaling):
        # query (Hq, T, D), key/value (H, T, D) -> (T, Hq, D)
        layer = self.cache.layers[layer_idx]
        return decode_attention(layer, query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                scaling, self.cache.config.retrieval_interval, self.cache.config.chunk_score_scale)


class HybridKVRunner:
    """Runs a transformers causal LM (or Qwen2.5-VL) with a compressing cache. See the module docstring."""

    def __init__(self, model: torch.nn.Module, max_window: int = 64) -> None:
        attention_hook.register()
        self.model = model.eval()
        self.max_window = max_window
        model.set_attn_implementation(attention_hook.IMPLEMENTATION)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, media_mask: torch.Tensor | None = None,
                **model_inputs: Any) -> PrefillState:
        """Full prefill of one prompt.

        Args:
            input_ids: ``(1, L)``.
            media_mask: ``(L,)`` bool; None treats the request as text-only (context before the window).
            model_inputs: extra forward inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` ...).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be (1, L), got {tuple(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len == 0:
            raise ValueError("empty prompt")
        if media_mask is not None and media_mask.numel() != seq_len:
            raise ValueError(f"media_mask has {media_mask.numel()} entries for a {seq_len}-token prompt")
        state = PrefillState()
        state.media_mask = None if media_mask is None else media_mask.detach().cpu().bool().clone()
        base = getattr(self.model, "model", None)
        if base is not None and hasattr(base, "rope_deltas"):
            base.rope_deltas = None  # a fresh request: Qwen2.5-VL recomputes its mrope deltas
        t0 = time.perf_counter()
        with attention_hook.active(_Capture(state, self.max_window)):
            out = self.model(input_ids=input_ids.to(self.device), use_cache=False, **model_inputs)
        state.seconds = time.perf_counter() - t0
        state.logits = out.logits[0, -1].float()
        deltas = getattr(base, "rope_deltas", None) if base is not None else None
        if deltas is not None:
            state.next_position = (seq_len + deltas.reshape(-1)[:1]).expand(3).clone().cpu()
        else:
            state.next_position = torch.tensor([seq_len])
        return state

    def compress(self, state: PrefillState, config: HybridKVConfig) -> CompressedCache:
        """Plan and compact every layer of ``state`` under ``config`` (``state`` is left untouched)."""
        if not config.enabled:
            config = config.replace(policy="full")
        if config.window > self.max_window:
            raise ValueError(f"window={config.window} exceeds the runner's max_window={self.max_window}")
        policy = make_policy(config)
        t0 = time.perf_counter()
        seq_len = state.seq_len
        w = min(config.window, seq_len)
        mask = prompt_media_mask(seq_len, w, state.media_mask)
        layers, plans = {}, {}
        prior = None
        if policy.uses_prior():
            prior = cross_layer_prior({idx: layer_prior(policy, state.q_window[idx][:, -w:], state.keys[idx],
                                                        state.scaling[idx], mask) for idx in state.keys},
                                      len(state.keys))
        for idx in sorted(state.keys):
            k, v = state.keys[idx], state.values[idx]
            plan = plan_layer(policy, state.q_window[idx][:, -w:], k, mask, idx, state.scaling[idx], prior=prior)
            plans[idx] = plan
            layers[idx] = CompressedLayer(plan, k, v)
        return CompressedCache(config, layers, plans, state.next_position.clone(), 0, time.perf_counter() - t0)

    @torch.no_grad()
    def decode(self, cache: CompressedCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Run ``T`` new tokens (``(T,)`` or ``(1, T)``) over the compressed cache -> ``(T, vocab)`` logits."""
        ids = input_ids.reshape(1, -1).to(self.device)
        t = ids.shape[1]
        pos = cache.next_position[:, None] + cache.decoded + torch.arange(t)[None]  # (P, T)
        position_ids = pos[:, None, :] if pos.shape[0] > 1 else pos  # mrope wants (3, 1, T)
        with attention_hook.active(_Decode(cache)):
            out = self.model(input_ids=ids, position_ids=position_ids.to(self.device), use_cache=False)
        cache.decoded += t
        return out.logits[0].float()

    def generate(self, state: PrefillState, cache: CompressedCache, max_new_tokens: int,
                 stop_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding: the first token from the prefill logits, the rest over the compressed cache."""
        tokens = [int(state.logits.argmax())]
        while len(tokens) < max_new_tokens and not (stop_ids and tokens[-1] in stop_ids):
            logits = self.decode(cache, torch.tensor([tokens[-1]]))
            tokens.append(int(logits[-1].argmax()))
        return tokens
