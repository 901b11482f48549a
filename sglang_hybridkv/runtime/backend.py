"""Attention backend "hybridkv" (CPU torch path): stock extend attention, compaction at the end of each request's
prefill, and decode over the compressed region.

Prefill (chunked prefill included) is SGLang's torch_native extend over the staging pool. In the chunk that
completes a request's prompt, each layer, right after its stock attention, scores the prompt with the
observation window, plans per KV head (``core.policies``) and compacts what survives
(``core.cache.CompressedLayer``: per-head device KV, host tier for dynamic heads, chunk summaries). After the last
layer the prompt's staging slots are freed and the device tier is written into a few slots allocated from the
same pool (``pool_region``), so the scheduler's accounting sees exactly what the request still holds and admits
more requests at once. Decode reads the compressed prompt from those slots plus the request's generated tokens,
which stay in ordinary slots. Requests that compress nothing (policy "none" per request) take the stock path.

With the radix cache on ("copy-on-compress"), the prompt's slots are not freed here: SGLang inserts the
uncompressed prompt into the tree after the prefill, and the plugin then drops the request's lock on it
(``scheduler_hooks``), so the prefix stays shared for later requests (the same video, a system prompt) and is
evictable under memory pressure, while this request decodes from its private compressed copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..config import HybridKVConfig
from ..core.attention import decode_attention
from ..core.cache import CompressedLayer, KVBytes
from ..core.plan import LayerStats, text_only_media_mask
from ..core.policies import make_policy
from ..core.window import window_attention
from . import pool_region
from .store import STORE, RequestKV

logger = logging.getLogger("sglang_hybridkv")


@dataclass
class _Finishing:
    """A request whose prompt completes in this extend batch."""

    row: int
    q_start: int  # first query row of this request in the batch
    q_len: int
    seq_len: int
    window: int
    req: RequestKV
    media_mask: torch.Tensor


class HybridKVTorchBackend(TorchNativeAttnBackend):
    """See the module docstring. Metadata is built once per batch in :meth:`init_forward_metadata`."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        self.allocator = model_runner.token_to_kv_pool_allocator
        STORE.free_slots = self.allocator.free
        self.radix = not model_runner.server_args.disable_radix_cache
        self.last_layer = model_runner.model_config.num_hidden_layers - 1
        self._finishing: list[_Finishing] = []
        self._policies: dict[HybridKVConfig, object] = {}

    # ---- metadata, once per batch ------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        super().init_forward_metadata(forward_batch)
        self._finishing = []
        if not forward_batch.forward_mode.is_extend() or forward_batch.forward_mode.is_target_verify():
            return
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        ext = forward_batch.extend_seq_lens_cpu
        q_start = 0
        for i, row in enumerate(rows):
            q_len = int(ext[i])
            info = STORE.pending.get(row)
            if info is not None and seq_lens[i] == info["full_len"] and info["config"] is not None \
                    and info["config"].enabled and seq_lens[i] > 0:
                cfg = info["config"]
                w = max(1, min(cfg.window, q_len, seq_lens[i]))
                mask = info["media_mask"]
                media_tokens = 0 if mask is None else int(mask.sum())
                if mask is None:
                    mask = text_only_media_mask(seq_lens[i], w)
                mask = mask.clone()
                mask[seq_lens[i] - w:] = False  # the observation window is the question: kept, never media
                req = RequestKV(info["rid"], cfg, seq_lens[i], media_tokens)
                del STORE.pending[row]
                self._finishing.append(_Finishing(row, q_start, q_len, seq_lens[i], w, req, mask))
            q_start += q_len

    def _policy(self, cfg: HybridKVConfig):
        if cfg not in self._policies:
            self._policies[cfg] = make_policy(cfg)
        return self._policies[cfg]

    # ---- prefill ------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if not self._finishing or layer.is_cross_attention:
            return o
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        q_all = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        req_to_token = self.req_to_token_pool.req_to_token
        for f in self._finishing:
            slots = req_to_token[f.row, : f.seq_len].long()
            keys = k_cache[slots].transpose(0, 1)  # (H, L, D)
            values = v_cache[slots].transpose(0, 1)
            policy = self._policy(f.req.config)
            probs = None
            if policy.needs_window:
                end = f.q_start + f.q_len
                q_win = q_all[end - f.window:end].transpose(0, 1)  # (Hq, w, D): the prompt's last positions
                probs = window_attention(q_win, keys, layer.scaling)
            plan = policy.plan(LayerStats(probs, f.media_mask, keys.shape[0], layer.layer_id))
            f.req.layers[layer.layer_id] = CompressedLayer(plan, keys, values)  # copies what it keeps
        if layer.layer_id == self.last_layer:
            self._commit_compaction()
        return o

    def _commit_compaction(self) -> None:
        """After the last layer: move each compressed prompt's device tier into pool slots."""
        for f in self._finishing:
            slots = self._take_slots(f, pool_region.slots_needed(f.req.layers))
            if slots is None:
                self._keep_uncompressed(f)
                continue
            self._write_to_pool(f.req, slots)
            STORE.add(f.row, f.req)
            STORE.finish_compaction(f.row)
        self._finishing = []

    def _take_slots(self, f: _Finishing, n: int) -> torch.Tensor | None:
        """``n`` slots for ``f``'s compressed region; without the radix cache, also free its prompt's slots.

        None (and nothing freed) when the pool has no room.
        """
        if self.radix:  # the tree takes over the prompt's slots after this batch; the lock is dropped then
            f.req.shared_prefix = True
            return self._alloc(n)
        extra = None
        if n > f.seq_len:  # budgets near 1.0: summaries and buffers outgrow the prompt's own slots
            extra = self._alloc(n - f.seq_len)
            if extra is None:
                return None
        req_to_token = self.req_to_token_pool.req_to_token
        staging = req_to_token[f.row, : f.seq_len].clone()
        # Zero the row first: whatever SGLang frees from this row later skips these positions (slot 0 is
        # padding and the plugin's allocator hook drops it), so each slot is freed exactly once.
        req_to_token[f.row, : f.seq_len] = 0
        self.allocator.free(staging[staging != 0])
        STORE.freed_by_compaction = True
        # Just freed f.seq_len slots and nothing ran in between, so this allocation cannot fail.
        slots = self._alloc(min(n, f.seq_len))
        return slots if extra is None else torch.cat([slots, extra])

    def _alloc(self, n: int) -> torch.Tensor | None:
        """``n`` pool slots, evicting unlocked radix-cache entries if needed; None if the pool has no room."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        slots = self.allocator.alloc(n)
        if slots is None and STORE.tree_cache is not None:
            self.allocator.evict_to_free_tokens(STORE.tree_cache, n)
            slots = self.allocator.alloc(n)
        return slots

    def _keep_uncompressed(self, f: _Finishing) -> None:
        logger.warning("hybridkv: request %s stays uncompressed: the pool has no room for its compressed form, even "
                       "after evicting radix-cache entries (budget %.2f)", f.req.rid, f.req.config.budget)
        STORE.stats_by_rid[f.req.rid] = {**f.req.stats(), "compressed": False}

    def _write_to_pool(self, req: RequestKV, slots: torch.Tensor) -> None:
        logical = KVBytes()
        for cl in req.layers.values():
            logical = logical + cl.nbytes()
        slot_bytes = sum(2 * cl.num_heads * cl.head_dim * cl.k_dev.element_size() for cl in req.layers.values())
        summaries = sum(2 * cl.kmin.numel() * cl.kmin.element_size() for cl in req.layers.values())
        for layer_id, cl in req.layers.items():
            where = pool_region.place(cl, slots)
            pool_region.write(self.token_to_kv_pool.get_key_buffer(layer_id),
                              self.token_to_kv_pool.get_value_buffer(layer_id), cl, where)
            pool_region.unload(cl)
            req.rows[layer_id] = where
        req.slots = slots
        # Device = the slots held (kept KV, summaries, retrieval buffers, packing waste); metadata = page tables.
        req.nbytes = KVBytes(logical.full, slots.numel() * slot_bytes, logical.host, logical.metadata - summaries)

    # ---- decode -------------------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        rows = forward_batch.req_pool_indices.tolist()
        compressed = [i for i, r in enumerate(rows) if STORE.get(r) is not None]
        if not compressed:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = torch.empty_like(q)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, hq, d)
        o_ = o.view(-1, hq, d)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        k_new = k.view(-1, hkv, d)
        v_new = v.view(-1, hkv, d)
        plain = sorted(set(range(len(rows))) - set(compressed))
        if plain:
            idx = torch.tensor(plain, device=q.device)
            sub_o = torch.empty_like(o_[idx])
            self._run_sdpa_forward_decode(q_[idx], sub_o, k_cache, v_cache, req_to_token,
                                          forward_batch.req_pool_indices[idx], forward_batch.seq_lens[idx], None,
                                          scaling=layer.scaling, enable_gqa=hq != hkv, causal=False)
            o_[idx] = sub_o
        for i in compressed:
            req = STORE.get(rows[i])
            cl = req.layers[layer.layer_id]
            pool_region.load(k_cache, v_cache, cl, req.rows[layer.layer_id])
            gen = req_to_token[rows[i], req.prompt_len: seq_lens[i] - 1].long()  # earlier decoded tokens
            cl.k_gen = k_cache[gen].transpose(0, 1)
            cl.v_gen = v_cache[gen].transpose(0, 1)
            out = decode_attention(cl, q_[i:i + 1], k_new[i:i + 1], v_new[i:i + 1], layer.scaling,
                                   req.config.retrieval_interval, req.config.chunk_score_scale)
            cl.k_gen = cl.v_gen = k_cache.new_empty(hkv, 0, d)  # generated KV lives in ordinary slots
            pool_region.unload(cl)
            o_[i] = out[0]
        return o
