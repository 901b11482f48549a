"""Hooks installed in SGLang scheduler processes when compression is on (see ``targets.TARGETS``).

State flows along SGLang's own objects, never through a module-level store: a request's handle lives on its
``Req`` (``requests.handle_of``); the scheduler hands the handles of an extend batch to the backend for the
duration of that batch's forward (:func:`_scope_extend_requests`); the forward leaves each planned compaction on
its handle, and the scheduler commits it when it processes that batch's result (:func:`_commit_compactions`);
the backend's :class:`~.regions.Regions` is SGLang's ``ReqToTokenPool`` aux cache, which is how the
scheduler-side hooks (commit, admission, busy-time memory check, ``/server_info``) reach it.

Overlap scheduling: SGLang forms and launches batch N+1 before it processes batch N's result. Admission must
count the staging slots a compaction gives back, and a decode step must read a compacted request's committed
region, so the compactions of N's result are committed before N+1 is formed (:func:`_commit_before_scheduling`);
the rest of N's result is processed after N+1 is launched, as in stock SGLang.
"""

from __future__ import annotations

from . import graph_output
from .compaction import Commit
from .requests import handle_of


def install(registry, hook_type) -> None:
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    registry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _carry_host_rows,
                      hook_type.AFTER)
    registry.register("sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view",
                      _carry_host_rows_to_replay_view, hook_type.AFTER)
    registry.register("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation", _scope_extend_requests,
                      hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler.Scheduler.process_batch_result", _commit_compactions,
                      hook_type.BEFORE)
    registry.register("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", _commit_before_scheduling,
                      hook_type.BEFORE)
    registry.register("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", _free_skip_compacted,
                      hook_type.AROUND)
    registry.register("sglang.srt.mem_cache.common.checkpoint_kv_cache", _unlock_compressed_prefix, hook_type.AFTER)
    registry.register("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", _keep_window_uncached,
                      hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw", _reopen_admission,
                      hook_type.BEFORE)
    registry.register("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker."
                      "_get_total_uncached_sizes", _count_regions_as_busy, hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
                      "build_additional_customized_info", _build_stats, hook_type.REPLACE)
    registry.register("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
                      "is_request_level_customized_info_key", _request_level_key, hook_type.REPLACE)
    registry.register("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController."
                      "get_internal_state", _report_state, hook_type.AFTER)
    registry.register("sglang.srt.managers.scheduler.Scheduler.process_batch_result", _export_metrics, hook_type.AFTER)
    graph_output.install(registry, hook_type)
    SchedulerOutputStreamer.has_additional_customized_info = True


def _regions(req_to_token_pool):
    """The backend's regions (attached as the pool's aux cache), or None before the backend exists."""
    from .regions import Regions

    aux = getattr(req_to_token_pool, "_aux_cache", None)
    return aux if isinstance(aux, Regions) else None


def _carry_host_rows(result, *args, **kwargs):
    """A decode batch's ``req_to_token`` rows on the host: SGLang keeps ``req_pool_indices_cpu`` on the
    ``ScheduleBatch`` but copies it to the ``ForwardBatch`` for extend batches only; decode planning reads it so
    that it reads no device value."""
    batch = next((a for a in args if hasattr(a, "reqs") and not isinstance(a, type)), kwargs.get("batch"))
    if batch is not None and result.req_pool_indices_cpu is None:
        result.req_pool_indices_cpu = batch.req_pool_indices_cpu
    return result


def _carry_host_rows_to_replay_view(view, *args, **kwargs):
    """At decode CUDA-graph replay SGLang hands the backend a view of the batch over the padded graph buffers,
    and the view drops ``req_pool_indices_cpu``: carry the real rows over (the backend names padded rows itself)."""
    forward_batch = kwargs["forward_batch"] if "forward_batch" in kwargs else args[0]
    view.req_pool_indices_cpu = forward_batch.req_pool_indices_cpu
    return view


def _scope_extend_requests(orig, self, batch=None, *args, **kwargs):
    """Around the model worker's forward of an extend batch: hand the backend, per request row, the handle and
    full length (prompt + outputs) of each compressed request, for that forward only."""
    backend = self.model_runner.attn_backend
    if batch is None or not batch.forward_mode.is_extend() or not hasattr(backend, "extend_requests"):
        return orig(self, batch, *args, **kwargs)
    requests = {}
    for req in batch.reqs:
        h = handle_of(req)
        if h.config is None:
            continue
        if h.unlocked:  # a re-prefill after retraction: the next compaction unlocks again
            req.skip_radix_cache_insert = False
            h.unlocked = False
        requests[req.kv.req_pool_idx] = (h, len(req.origin_input_ids) + len(req.output_ids))
    with backend.extend_requests(requests):
        return orig(self, batch, *args, **kwargs)


def _has_pending(batch) -> bool:
    return batch is not None and any(getattr(getattr(r, "hybridkv", None), "pending", None) is not None
                                     for r in batch.reqs)


def _commit(self, batch, result) -> None:
    """Commit the compactions ``batch``'s forward planned (none left: nothing to do)."""
    if not _has_pending(batch):
        return
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:  # the forward (and so its compact copies) is complete
        copy_done.synchronize()
    # SGLang allocates its chunked prompt's next chunk unchecked: the regions must leave room for it.
    next_chunk = (self.chunked_prefill_size or 0) if getattr(self, "chunked_req", None) is not None else 0
    Commit(self.token_to_kv_pool_allocator, self.req_to_token_pool, _regions(self.req_to_token_pool),
           self.tree_cache, keep_free=next_chunk).run(batch.reqs)


def _commit_before_scheduling(self, *args, **kwargs):
    """Overlap scheduler: SGLang forms the next batch before it processes the last batch's result. Commit that
    result's compactions first, between forwards, so that admission counts the staging slots they give back and
    the next batch's decode plan reads the committed regions; the rest of the result is processed as usual,
    overlapped with the next forward."""
    for batch, result in getattr(self, "result_queue", None) or ():
        _commit(self, batch, result)


def _commit_compactions(self, batch, result, *args, **kwargs):
    """Before SGLang processes an extend batch's result (which may release, checkpoint or abort its requests):
    commit what is still pending (without overlap, the result is processed right after its forward)."""
    _commit(self, batch, result)


def _keep_window_uncached(orig, self, input_len, *args, **kwargs):
    """Never match the prompt's last ``window`` tokens from the prefix cache, so that their queries are
    computed and the observation window (the question) is the same with and without a cache hit, and after a
    retraction (when the matched input also holds the generated tokens)."""
    limit = orig(self, input_len, *args, **kwargs)
    h = handle_of(self)
    return limit if h.config is None else max(0, min(limit, h.prompt_len - h.window))


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
    h = getattr(req, "hybridkv", None)
    if h is not None and h.pending_unlock:
        tree_cache.unlock(req.lock)
        req.lock = None
        req.skip_radix_cache_insert = True
        h.pending_unlock, h.unlocked = False, True
    return result


def _reopen_admission(self, *args, **kwargs):
    """SGLang stops admitting once a prompt did not fit (``batch_is_full``) until a request leaves; compaction
    frees slots (or makes a prefix evictable) without any request leaving, so it reopens admission itself."""
    regions = _regions(self.req_to_token_pool)
    if regions is not None and regions.admission_seen != regions.compacted:
        regions.admission_seen = regions.compacted
        running_batch = kwargs["running_batch"] if "running_batch" in kwargs else args[-1]
        running_batch.batch_is_full = False


def _count_regions_as_busy(orig, self, *args, **kwargs):
    """SGLang's busy-time check counts each running request's row; compressed regions hold slots outside any
    row, and compaction (radix off) gave the prompt's slots back while the row still counts them."""
    full, swa = orig(self, *args, **kwargs)
    regions = _regions(self.req_to_token_pool)
    return (full if regions is None else full + regions.busy_adjustment()), swa


def _build_stats(self, reqs):
    values = []
    for req in reqs:
        h = getattr(req, "hybridkv", None)
        report = None if h is None else h.report
        values.append([report] if report is not None else [])  # SGLang accumulates lists per request
    return {"hybridkv": values}


def _request_level_key(self, key: str) -> bool:
    return key == "hybridkv"


def _export_metrics(result, self, batch, *args, **kwargs):
    """``--enable-metrics``: after each batch, count the compactions it made and set the gauges from the
    compressed requests that still hold a region (finished ones were released inside this call)."""
    reporter = self.metrics_reporter
    if not reporter.current_scheduler_metrics_enabled:
        return result
    from .metrics import metrics_for

    metrics = metrics_for(tuple(sorted((k, str(v)) for k, v in reporter.metrics_collector.labels.items())))
    regions = _regions(self.req_to_token_pool)
    running = []
    for req in {id(r): r for r in (*self.running_batch.reqs, *batch.reqs)}.values():
        h = getattr(req, "hybridkv", None)
        if h is None or h.stats is None:
            continue
        if h.stats is not h.exported:
            metrics.record(h.report)
            h.exported = h.stats
        region = None if regions is None or req.kv.req_pool_idx is None else regions.get(req.kv.req_pool_idx)
        if region is not None and region.rid == req.rid:
            running.append(h.stats)
    metrics.set_running(running)
    return result


def _report_state(result, self, *args, **kwargs):
    """``/server_info`` -> ``internal_states[i]["hybridkv"]``: pool, region and decode-plan counters."""
    sched = self.scheduler
    regions = _regions(sched.req_to_token_pool)
    backend = sched.tp_worker.model_runner.attn_backend
    state = {
        "staging_available_tokens": int(sched.token_to_kv_pool_allocator.available_size()),
        "radix_evictable_tokens": int(sched.tree_cache.evictable_size()),
        "radix_protected_tokens": int(sched.tree_cache.protected_size()),
        "staging_max_total_tokens": int(sched.max_total_num_tokens),
    }
    if regions is not None:
        state.update({
            "compressed_requests_live": regions.live, "compacted_total": regions.compacted,
            "released_total": regions.released, "compressed_slots_held": regions.slots_held,
            "host_tier_bytes": regions.host_bytes, "host_tier_bytes_peak": regions.host_bytes_peak,
            "host_tier_pages_used": regions.host.used_pages,
            "host_tier_page_bytes": regions.host.page_bytes, "host_tier_limit_bytes": regions.host.limit,
            "host_tier_refusals": regions.host.refused,  # requests compressed static for want of host pages
            # SGLang's own count of decode forwards beside ours: a plan per forward, an attention call per layer.
            "sglang_decode_forwards": int(sched.metrics_reporter.forward_ct_decode),
            "decode_plans_built": backend.decode_plans, "decode_layer_calls": backend.decode_layer_calls,
            "decode_table_builds": backend.planner.table_builds,
            **backend.buffers.totals(),  # dynamic heads' host-tier traffic: rows copied of the rows selected
        })
    result.internal_state["hybridkv"] = state
    return result
