"""Hooks installed in SGLang scheduler processes when compression is on (see ``targets.TARGETS``)."""

from __future__ import annotations

import torch

from .store import STORE


def install(registry, hook_type) -> None:
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    registry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _attach_requests,
                      hook_type.AFTER)
    registry.register("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", _free_skip_compacted,
                      hook_type.AROUND)
    registry.register("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", _release_rows, hook_type.AFTER)
    registry.register("sglang.srt.mem_cache.common.checkpoint_kv_cache", _unlock_compressed_prefix, hook_type.AFTER)
    registry.register("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", _keep_window_uncached,
                      hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw", _reopen_admission,
                      hook_type.BEFORE)
    registry.register("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.clear", _release_all, hook_type.AFTER)
    registry.register("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
                      "build_additional_customized_info", _build_stats, hook_type.REPLACE)
    registry.register("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
                      "is_request_level_customized_info_key", _request_level_key, hook_type.REPLACE)
    registry.register("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController."
                      "get_internal_state", _report_state, hook_type.AFTER)
    SchedulerOutputStreamer.has_additional_customized_info = True


def _attach_requests(result, *args, **kwargs):
    """Tell the backend, per request row, what it needs: id, full prompt length, config and media span.

    Keyed by row because the model runner may rebuild the ForwardBatch object before the backend sees it.
    """
    batch = next((a for a in args if hasattr(a, "reqs")), kwargs.get("batch"))
    if batch is None or not batch.forward_mode.is_extend():
        return result
    STORE.tree_cache = getattr(batch, "tree_cache", None)
    for req in batch.reqs:
        cfg = _config_of(req)
        STORE.pending[req.kv.req_pool_idx] = {"rid": req.rid, "config": cfg, "media_mask": _media_mask(req),
                                           "full_len": len(req.origin_input_ids) + len(req.output_ids)}
    return result


def _config_of(req):
    """The request's config (server's + its overrides), parsed once per request; None when it compresses nothing."""
    from .plugin import request_config

    if not hasattr(req, "_hybridkv_config"):
        cfg = request_config(getattr(req.sampling_params, "custom_params", None))
        req._hybridkv_config = cfg if cfg is not None and cfg.enabled else None
    return req._hybridkv_config


def _keep_window_uncached(orig, self, input_len, *args, **kwargs):
    """Radix cache on: never match the last ``window`` prompt tokens, so that their queries are computed and the
    observation window (the question) is the same with and without a cache hit."""
    limit = orig(self, input_len, *args, **kwargs)
    cfg = _config_of(self)
    return limit if cfg is None else max(0, min(limit, input_len - cfg.window))


def _media_mask(req) -> torch.Tensor | None:
    """True on image/video token positions (from the processor's offsets); None for text-only requests."""
    mm = getattr(req, "multimodal_inputs", None)
    items = getattr(mm, "mm_items", None) if mm is not None else None
    if not items:
        return None
    n = len(req.origin_input_ids) + len(req.output_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    for item in items:
        for start, end in getattr(item, "offsets", None) or []:
            mask[int(start): int(end) + 1] = True  # offsets are inclusive
    return mask


def _free_skip_compacted(orig, self, free_index, *args, **kwargs):
    # Slots of a compacted prompt were freed at compaction and zeroed in the request row; slot 0 is padding.
    if free_index.numel():
        free_index = free_index[free_index != 0]
    return orig(self, free_index, *args, **kwargs)


def _unlock_compressed_prefix(result, req, tree_cache, *args, **kwargs):
    """Radix cache on: once SGLang has inserted a compressed request's prompt into the tree (end of prefill), drop
    the request's lock on it and keep the request's later tokens out of the tree.

    The request decodes from its private compressed copy, so the uncompressed prefix is free to be shared by
    later requests and evicted under memory pressure; at release SGLang then frees only the generated tokens.
    """
    kv = STORE.get(req.kv.req_pool_idx) if req.kv.holds_kv else None
    if kv is not None and kv.rid == req.rid and kv.shared_prefix and not req.skip_radix_cache_insert:
        tree_cache.unlock(req.lock)
        req.lock = None
        req.skip_radix_cache_insert = True
        STORE.freed_by_compaction = True  # the prefix is evictable now: room for admission
    return result


def _reopen_admission(self, *args, **kwargs):
    """SGLang stops admitting once a prompt did not fit (``batch_is_full``) until a request leaves; compaction
    frees slots without any request leaving, so it reopens admission itself."""
    running_batch = kwargs["running_batch"] if "running_batch" in kwargs else args[-1]
    if STORE.freed_by_compaction:
        STORE.freed_by_compaction = False
        running_batch.batch_is_full = False


def _release_rows(result, self, rows, *args, **kwargs):
    STORE.release_rows(rows)
    return result


def _release_all(result, *args, **kwargs):
    STORE.release_all()
    return result


def _build_stats(self, reqs):
    values = []
    for req in reqs:
        stats = STORE.stats_by_rid.get(req.rid)
        if stats is not None and req.finished():
            STORE.stats_by_rid.pop(req.rid, None)
        values.append([stats] if stats is not None else [])  # SGLang accumulates lists per request
    return {"hybridkv": values}


def _request_level_key(self, key: str) -> bool:
    return key == "hybridkv"


def _report_state(result, self, *args, **kwargs):
    """``/server_info`` -> ``internal_states[i]["hybridkv"]``: pool and compressed-region counters."""
    sched = self.scheduler
    resident = STORE.resident()
    result.internal_state["hybridkv"] = {
        "staging_available_tokens": int(sched.token_to_kv_pool_allocator.available_size()),
        "radix_evictable_tokens": int(sched.tree_cache.evictable_size()),
        "radix_protected_tokens": int(sched.tree_cache.protected_size()),
        "staging_max_total_tokens": int(sched.max_total_num_tokens),
        "compressed_requests_live": STORE.live, "compacted_total": STORE.compacted,
        "released_total": STORE.released, "pending_infos": len(STORE.pending),
        "compressed_slots_held": STORE.slots_held, "resident_device_bytes": resident.device_total,
        "host_tier_bytes": STORE.host_bytes, "host_tier_bytes_peak": STORE.host_bytes_peak,
    }
    return result
