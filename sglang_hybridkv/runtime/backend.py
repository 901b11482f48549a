"""Attention backend "hybridkv": stock extend attention with compaction at the end of each prefill, and one
batched decode path for every request of a batch.

Prefill (chunked prefill included) is SGLang's own extend attention over its token pool (torch_native on
CPU). In every extend batch :class:`~.compaction.CompactionBatch` stashes the prompt's window queries and,
for the requests whose prefill completes, plans per KV head and keeps a compact copy of what survives. The
backend computes only: moving it into pool slots (``pool_region``) and host-tier pages (``host_tier``) and
registering it in :class:`~.regions.Regions` is the scheduler side's (``compaction.Commit``, between forwards).

Decode builds one :class:`~.decode_plan.DecodePlan` per forward batch in :meth:`init_forward_metadata`;
each layer then runs one batched retrieval and one attention call over the pool rows
(``kernels.row_decode``; the Triton kernel on CUDA, the torch reference on CPU). Compressed and uncompressed
requests share that call.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import eager_on_graph

from ..config import HybridKVConfig
from .compaction import CompactionBatch
from .decode_plan import DecodePlan, DecodePlanner, RetrievalBuffers
from .host_tier import HostTier
from .regions import Regions

logger = logging.getLogger("sglang_hybridkv")


class HybridKVMixin:
    """See the module docstring. State: the regions (one owner), the host tier, this batch's metadata.

    Mixed into SGLang's torch_native backend on CPU and its Triton backend on CUDA (their extend path runs
    prefill; decode is ours).
    """

    def __init__(self, model_runner, config: HybridKVConfig) -> None:
        super().__init__(model_runner)
        self.allocator = model_runner.token_to_kv_pool_allocator
        pool = self.token_to_kv_pool
        num_layers = model_runner.model_config.num_hidden_layers
        self.last_layer = num_layers - 1
        k0 = pool.get_key_buffer(0)
        self.num_kv_heads, head_dim = k0.shape[1], k0.shape[2]
        self.host = HostTier(num_layers, config.chunk_size, head_dim, k0.dtype, device=k0.device)
        self.regions = Regions(self.allocator.free, self.host, model_runner.max_total_num_tokens)
        self.req_to_token_pool.attach_aux_cache(self.regions)  # SGLang frees regions with their rows
        self.buffers = RetrievalBuffers(num_layers, k0.shape[0] * self.num_kv_heads, k0.device)
        self.planner = DecodePlanner(self.regions, num_layers, self.num_kv_heads, config.chunk_size,
                                     config.chunk_score_scale, k0.device)
        # Extend chunks of already-compacted requests (outputs re-prefilled after a retraction) replay decode
        # token by token with their own planner, so that their one-request plans do not evict the decode batch's
        # cached tables.
        self.replay_planner = DecodePlanner(self.regions, num_layers, self.num_kv_heads, config.chunk_size,
                                            config.chunk_score_scale, k0.device)
        # Counted outside graph capture only, so that /server_info compares them with SGLang's own count of
        # decode forwards: one plan per forward, one attention call per layer and forward.
        self.decode_plans = 0
        self.decode_layer_calls = 0
        self._counting = False
        self._requests: dict[int, tuple] = {}  # this forward's extend handles (see :meth:`extend_requests`)
        self._compaction: CompactionBatch | None = None
        self._plan: DecodePlan | None = None
        self._kv_loc: torch.Tensor | None = None  # this decode batch's new-token slots
        self._replays: list[tuple[int, list[DecodePlan]]] = []  # (first query row, one plan per token)

    @contextlib.contextmanager
    def extend_requests(self, requests: dict[int, tuple]) -> Iterator[None]:
        """For the duration of one forward: the batch's compressed requests by ``req_to_token`` row,
        ``row -> (handle, full length)``. The scheduler hooks open this scope around the model worker's forward
        (SGLang's ForwardBatch declares no field that could carry them)."""
        self._requests = requests
        try:
            yield
        finally:
            self._requests = {}

    # ---- metadata, once per batch ------------------------------------------------------------------
    # SGLang's contract: host work in ``_out_graph`` (outside any CUDA graph), static device work in
    # ``_in_graph`` (recorded). All our metadata is host work; the eager entry runs both, as the base class does.
    def init_forward_metadata(self, forward_batch) -> None:
        self.init_forward_metadata_out_graph(forward_batch)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Decode: this batch's :class:`DecodePlan` (at graph replay ``forward_batch`` is SGLang's padded view:
        padded rows name ``req_to_token`` row 0 with length 1, and read only the pool's padding slot).
        Extend: the parent's own metadata, then the compaction batch and decode replays."""
        self._compaction = self._plan = self._kv_loc = None
        self._replays = []
        mode = forward_batch.forward_mode
        if mode.is_decode():  # the parent's decode metadata is never read: decode is ours
            self._counting = not in_capture
            self.decode_plans += self._counting
            self._plan = self.planner.build(_host_rows(forward_batch, in_capture), forward_batch.seq_lens_cpu,
                                            self.req_to_token_pool.req_to_token, forward_batch.seq_lens)
            self._kv_loc = forward_batch.out_cache_loc
            return
        super().init_forward_metadata(forward_batch)  # prefill graphs are off: the parent's eager body
        if mode.is_extend() and not mode.is_target_verify():
            rows = _host_rows(forward_batch)
            self._compaction = CompactionBatch.build(forward_batch, self._requests, rows)
            if self.regions.live:
                self._replays = self._plan_replays(forward_batch, rows)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        """Nothing: no metadata of ours is device work recorded in a graph (see :meth:`_decode_layer`)."""

    def _plan_replays(self, forward_batch, rows: list[int]) -> list[tuple[int, list[DecodePlan]]]:
        """Extend rows of requests that already hold a region: one single-token plan per position, so each
        attends over the compressed prompt and the tokens before it, as it did when it was decoded."""
        out, q_start = [], 0
        req_to_token = self.req_to_token_pool.req_to_token
        for row, end, q_len in zip(rows, forward_batch.seq_lens_cpu.tolist(),
                                   forward_batch.extend_seq_lens_cpu):
            q_len = int(q_len)
            if self.regions.get(row) is not None and q_len:
                plans = [self.replay_planner.build([row], torch.tensor([p + 1]), req_to_token)
                         for p in range(end - q_len, end)]
                out.append((q_start, plans))
            q_start += q_len
        return out

    # ---- prefill ------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        lid = layer.layer_id
        k_buf, v_buf = self.token_to_kv_pool.get_key_buffer(lid), self.token_to_kv_pool.get_value_buffer(lid)
        if self._replays and not layer.is_cross_attention:
            width = layer.tp_q_head_num * layer.qk_head_dim
            q2, o2 = q.reshape(-1, width), o.view(-1, width)
            for first, plans in self._replays:
                for i, plan in enumerate(plans):
                    o2[first + i] = plan.attend(lid, q2[first + i: first + i + 1], k_buf, v_buf, self.buffers,
                                                self.host, layer.scaling)[0].to(o.dtype)
        c = self._compaction
        if c is None or layer.is_cross_attention:
            return o
        c.after_layer(layer, q, o, k_buf, v_buf, self.req_to_token_pool.req_to_token)
        if layer.layer_id == self.last_layer and c.finishing:
            c.finish(self.token_to_kv_pool, self.req_to_token_pool.req_to_token)
        return o

    # ---- decode -------------------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._decode_layer(q, k, v, layer, save_kv_cache)

    @eager_on_graph
    def _decode_layer(self, q, k, v, layer, save_kv_cache: bool) -> torch.Tensor:
        """One layer's KV write and batched attention, ``(bs, Hq * D)``.

        Under SGLang's breakable decode CUDA graphs this runs eagerly between the captured segments (the
        projections, norms and MLPs around it), with the plan built for this replay: the plan's shapes follow
        the batch's regions, so it is not recorded. Without a graph it is an ordinary call.
        """
        if save_kv_cache and k is not None and v is not None:
            n = self._kv_loc.shape[0]  # at replay: the real requests only (padded rows write nothing)
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(self._kv_loc, None), k[:n], v[:n])
        lid = layer.layer_id
        self.decode_layer_calls += self._counting
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        return self._plan.attend(lid, q, self.token_to_kv_pool.get_key_buffer(lid),
                                 self.token_to_kv_pool.get_value_buffer(lid), self.buffers, self.host,
                                 layer.scaling)


def _host_rows(forward_batch, in_capture: bool = False) -> list[int]:
    """The batch's ``req_to_token`` rows from its host copy, so that planning reads no device value: SGLang's own
    for extend batches, the one the scheduler hooks put on decode batches (``scheduler_hooks._carry_host_rows``;
    at CUDA-graph replay ``_carry_host_rows_to_replay_view``). At replay the batch is SGLang's padded view, whose
    padded rows name row 0; SGLang's graph-capture batch names row 0 in every row and carries no host copy."""
    rows = getattr(forward_batch, "req_pool_indices_cpu", None)
    if rows is None and in_capture:
        return [0] * forward_batch.seq_lens_cpu.shape[0]
    if rows is None:
        raise RuntimeError("hybridkv: a batch reached the backend without req_pool_indices_cpu "
                           "(the ForwardBatch.init_new or build_replay_fb_view hook did not run)")
    rows = rows.tolist()
    return rows + [0] * (forward_batch.seq_lens_cpu.shape[0] - len(rows))


class HybridKVTorchBackend(HybridKVMixin, TorchNativeAttnBackend):
    """CPU: torch_native extend, batched torch decode."""


def make_backend(model_runner, config: HybridKVConfig):
    """CPU: torch_native extend; CUDA: SGLang's Triton extend (imported only there). Decode is ours on both."""
    if not str(model_runner.device).startswith("cuda"):
        return HybridKVTorchBackend(model_runner, config)
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    class HybridKVTritonBackend(HybridKVMixin, TritonAttnBackend):
        """CUDA: SGLang's Triton extend, batched decode with the project's Triton kernels."""

    return HybridKVTritonBackend(model_runner, config)
