"""Every SGLang symbol the plugin hooks or uses, in one place, with the version it was written against.

:func:`check_targets` runs where the flags are parsed (the launcher's ``prepare_server_args``, ``sgl.Engine``),
before any scheduler process starts; a missing symbol or another SGLang version stops the server with a message
naming the symbol and the supported version. The processes SGLang spawns from there run the same installation
and check only the version at plugin registration (:func:`check_version`): resolving every target imports the
scheduler and model-runner modules, ~3.6 s of CPU in each process that would not import them otherwise.
"""

from __future__ import annotations

import pkgutil

SUPPORTED_SGLANG = "0.5.23"

# dotted target -> what we do with it
TARGETS: dict[str, str] = {
    # launcher: flags and start-up checks
    "sglang.srt.server_args.ServerArgs.add_cli_args": "AROUND: add --kv-compression and --hybridkv-* flags",
    "sglang.srt.server_args.prepare_server_args": "AROUND: validate flags, export config, imply settings",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend": "register backend 'hybridkv'",
    "sglang.srt.server_args.add_attention_backend_choices": "allow --attention-backend hybridkv",
    "sglang.srt.entrypoints.engine.Engine.server_args_class":
        "replaced by plugin.engine_server_args: sgl.Engine(kv_compression=..., hybridkv_*=...)",
    # scheduler: backend, accounting, per-request stats
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend": "base class of the CPU backend",
    "sglang.srt.layers.attention.triton_backend.TritonAttnBackend": "base class of the CUDA backend",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend.init_forward_metadata_out_graph":
        "overridden: the per-batch decode plan is host work, built outside CUDA graphs (also at graph replay)",
    "sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.eager_on_graph":
        "used: decode attention runs eagerly between the segments of SGLang's breakable decode CUDA graphs",
    "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.attach_aux_cache":
        "used: regions are the pool's aux cache (freed with their rows, cleared with the pool)",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new":
        "AFTER: carry a decode batch's req_pool_indices_cpu",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view":
        "AFTER: carry req_pool_indices_cpu onto the padded view a decode CUDA-graph replay plans from",
    "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend._alloc_full_buffer":
        "AROUND: a dataclass output (LogitsProcessorOutput) gets a buffer per tensor field (runtime/graph_output.py)",
    "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend._slice_output":
        "AROUND: a dataclass output is sliced per tensor field",
    "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend."
    "_copy_output_to_buffer": "AROUND: a dataclass output is copied into its buffer per tensor field",
    "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation":
        "AROUND: hand an extend batch's compressed requests to the backend for that forward",
    "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run":
        "BEFORE: overlap scheduler, commit the queued result's compactions before the next batch is formed "
        "(reads Scheduler.result_queue)",
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.get_kvcache":
        "used: the pool that compaction commits regions into (scheduler side)",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.req_pool_indices_cpu":
        "read: a decode batch's rows on the host, carried to ForwardBatch.req_pool_indices_cpu (planning reads "
        "no device value); instance attributes also read: Req.to_finish (set to FINISH_ABORT when a request's "
        "compaction fails), Req.is_retracted and Req.kv.req_pool_idx (a request retracted before its commit "
        "commits nothing), GenerationBatchResult.copy_done (the forward is complete before commit), "
        "SchedulerMetricsReporter.forward_ct_decode (SGLang's decode-forward count)",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.req_pool_indices_cpu":
        "written for decode batches by the init_new hook (SGLang fills it for extend only); read for extend "
        "batches (compaction and output replays find their rows without a device read)",
    "sglang.srt.managers.schedule_batch.FINISH_ABORT": "used: abort a request whose compaction failed",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free": "AROUND: skip slots already freed at compaction",
    "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._get_total_uncached_sizes":
        "AROUND: the busy-time memory check counts compressed regions",
    "sglang.srt.mem_cache.common.checkpoint_kv_cache": "AFTER: radix on, unlock a compressed request's prompt",
    "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len": "AROUND: never serve the prompt's window from the cache",
    "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw":
        "BEFORE: reopen admission after compaction freed slots",
    "sglang.srt.distributed.parallel_state.get_tp_group":
        "used: tensor parallelism; at compaction ranks gather per-head figures over the group's cpu_group "
        "(gloo; with world_size, rank_in_group)",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.evict_to_free_tokens":
        "used: evict radix entries to make room for a compressed region",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.available_size":
        "used: a region leaves room for the next chunk of SGLang's chunked prompt (instance attributes also "
        "read: Scheduler.chunked_req, Scheduler.chunked_prefill_size)",
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.evictable_size":
        "used: with available_size, what the pool can still give after a region takes its slots",
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.build_additional_customized_info":
        "REPLACE: emit meta_info['hybridkv']",
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key":
        "REPLACE: 'hybridkv' is per request, not per token",
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state":
        "AFTER: report pool and compressed-region counters in /server_info",
    "sglang.srt.managers.scheduler.Scheduler.process_batch_result":
        "BEFORE: commit the compactions the batch's forward planned (slots, pages, radix, regions); "
        "AFTER: --enable-metrics, export compression metrics (runtime/metrics.py)",
    "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter":
        "used: current_scheduler_metrics_enabled and the scheduler's metric labels",
    # tokenizer manager: per-request validation and meta_info; one multimodal item per Qwen-VL video
    "sglang.srt.managers.mm_utils.get_new_expanded_mm_items": "AROUND: split bundled videos (runtime/video_items.py)",
    "sglang.srt.managers.mm_utils._slice_model_data": "used: per-video slices of an item's model data",
    "sglang.srt.managers.mm_utils._slice_value": "used: per-video slices of an item's pixel rows",
    "sglang.srt.managers.mm_utils._get_length": "used: lengths of an item's features and grids",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request": "BEFORE: validate overrides",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._wait_one_response":
        "AROUND: meta_info['hybridkv'] is one dict, not a list (streamed chunks included)",
}


class IncompatibleSGLang(RuntimeError):
    pass


def check_version() -> str:
    """Raise :class:`IncompatibleSGLang` unless the installed SGLang is the supported one; returns its version."""
    import sglang

    version = getattr(sglang, "__version__", "unknown")
    if version != SUPPORTED_SGLANG:
        raise IncompatibleSGLang(f"sglang-hybridkv supports SGLang {SUPPORTED_SGLANG} only; found SGLang {version}. "
                                 f"Install `sglang=={SUPPORTED_SGLANG}` or run without --kv-compression.")
    return version


def check_targets() -> None:
    """Raise :class:`IncompatibleSGLang` naming the first missing symbol or a version mismatch."""
    version = check_version()
    for target in TARGETS:
        try:
            pkgutil.resolve_name(_split(target))
        except (ImportError, AttributeError) as e:
            raise IncompatibleSGLang(f"SGLang symbol {target} (hooked by sglang-hybridkv: {TARGETS[target]}) is missing "
                                     f"in SGLang {version} ({e}); supported version: {SUPPORTED_SGLANG}") from None


def _split(target: str) -> str:
    """``a.b.C.m`` -> ``a.b:C.m`` so that pkgutil resolves class attributes."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        try:
            __import__(mod)
        except ImportError:
            continue
        return mod + (":" + ".".join(parts[i:]) if i < len(parts) else "")
    return target
