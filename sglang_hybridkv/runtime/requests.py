"""What the plugin knows about one request: its config, prompt, media span, window queries and stats.

A :class:`RequestHandle` lives on SGLang's ``Req`` object (``req.hybridkv``) and dies with it, so nothing
per request outlives the request (stats of an aborted or retracted request included). The scheduler hooks
create it; the scheduler hooks hand an extend batch's handles to the attention backend for the duration of
that batch's forward (``scheduler_hooks._scope_extend_requests``); the backend fills in the window queries and
leaves the planned compaction (``pending``), which the scheduler side commits when it processes the batch's
result, writing the stats. Config parsing for the tokenizer side (per-request overrides) lives here too, so
that the launcher (``plugin``) and the scheduler hooks share it without importing each other.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass, field
from http import HTTPStatus

import torch

from ..config import ENV_VAR, ConfigError, HybridKVConfig
from .media import PromptMedia, prompt_media


def active_config() -> HybridKVConfig | None:
    """The server's config when compression is on (parsed once per value of the environment variable)."""
    return _parse_env(os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=4)
def _parse_env(raw: str | None) -> HybridKVConfig | None:
    cfg = HybridKVConfig.from_env({ENV_VAR: raw} if raw else {})
    return cfg if cfg is not None and cfg.enabled else None


def request_config(custom_params) -> HybridKVConfig | None:
    """The config of one request: the server's, with the request's ``custom_params["hybridkv"]`` applied."""
    base = active_config()
    params = (custom_params or {}).get("hybridkv") if isinstance(custom_params, dict) else None
    if base is None:
        if params:
            raise ConfigError("custom_params.hybridkv was given but the server runs without --kv-compression")
        return None
    return base.with_request(params)


@dataclass
class RequestHandle:
    """One request, as the plugin sees it.

    Attributes:
        rid: SGLang's request id.
        config: the request's config; None when it compresses nothing (policy "none", or at most one output
            token: compaction would cost more than it saves). A token budget is already a fraction of this
            prompt (``HybridKVConfig.for_prompt``).
        prompt_len: prompt tokens (``origin_input_ids``); compression covers exactly these, whatever else a
            re-prefill after retraction recomputes.
        media: the prompt's media span and its tokens per modality (``runtime/media.py``); None for text-only
            requests.
        q_window: per layer ``(Hq, w, D)`` queries of the prompt's last ``w`` positions, filled chunk by chunk
            (chunked prefill) and dropped at compaction.
        q_filled: ``(w,)`` bool, window positions whose queries have been seen.
        prior: ``(prompt_len,)`` the cross-layer prior of the first compaction (``core.compress``), kept so that a
            re-prefill after retraction plans each layer as it computes it, with the same ranking.
        pending: the compaction planned inside the forward (``compaction.PromptCompaction``), until the scheduler
            side commits it (``compaction.Commit``) while processing that batch's result.
        stats: what compaction measured (see :attr:`report` for what the request is told).
        exported: the ``stats`` object last counted in the Prometheus metrics (``runtime/metrics.py``).
        pending_unlock: compacted with the radix cache on: once SGLang has inserted the prompt into the tree,
            the scheduler hooks drop the request's lock on it.
        unlocked: the plugin dropped the request's radix lock and set ``skip_radix_cache_insert``.
        error: set when compaction failed (:meth:`fail`): the request is aborted and compacts nothing more.
    """

    rid: str
    config: HybridKVConfig | None
    prompt_len: int
    media: PromptMedia | None = None
    q_window: dict[int, torch.Tensor] = field(default_factory=dict)
    q_filled: torch.Tensor | None = None
    prior: torch.Tensor | None = None
    pending: object | None = None
    stats: dict | None = None
    pending_unlock: bool = False
    unlocked: bool = False
    exported: dict | None = None
    error: str | None = None
    req: weakref.ref | None = field(default=None, repr=False)  # SGLang's Req (weak: the Req owns the handle)

    def fail(self, message: str) -> None:
        """Abort the request with ``message``: SGLang finishes it when it processes this batch's result (HTTP
        500 to the client) and releases its row, slots and radix lock as for any abort."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        self.error = message
        self.q_window, self.q_filled, self.pending_unlock, self.pending = {}, None, False, None
        self.stats = {"policy": self.config.policy, "compressed": False, "error": message}
        req = None if self.req is None else self.req()
        if req is not None and not req.finished():
            req.to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")

    @property
    def media_mask(self) -> torch.Tensor | None:
        """``(prompt_len,)`` bool on image/video tokens; None for text-only requests."""
        return None if self.media is None else self.media.mask

    @property
    def window(self) -> int:
        return min(self.config.window, self.prompt_len)

    @property
    def report(self) -> dict | None:
        """``meta_info["hybridkv"]``: the stats, plus the token budget the request asked for (``budget`` is
        then the fraction of this prompt it came to)."""
        if self.stats is None or self.config.budget_tokens is None:
            return self.stats
        return {**self.stats, "budget_tokens": self.config.budget_tokens}


def handle_of(req) -> RequestHandle:
    """The request's handle, created on first use (the config is parsed once per request)."""
    handle = getattr(req, "hybridkv", None)
    if handle is None:
        sp = req.sampling_params
        cfg = request_config(getattr(sp, "custom_params", None))
        if cfg is not None and (not cfg.enabled or (sp.max_new_tokens is not None and sp.max_new_tokens <= 1)):
            cfg = None
        prompt_len = len(req.origin_input_ids)
        handle = RequestHandle(req.rid, None if cfg is None else cfg.for_prompt(prompt_len), prompt_len,
                               prompt_media(req), req=weakref.ref(req))
        req.hybridkv = handle
    return handle

