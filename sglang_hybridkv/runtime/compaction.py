"""Compaction at the end of a request's prefill: plan per KV head, move what survives into the pool.

Compression is a function of the prompt alone. The observation window is the prompt's last ``window``
positions, whichever extend chunks computed them (chunked prefill, a prompt split to fit a batch, a
re-prefill after retraction): every extend batch stashes the window queries it computes on the request's
handle, and the batch whose chunk reaches the end of the prompt (``origin_input_ids``) compacts it with them.
Tokens after the prompt (outputs recomputed after a retraction) stay in the request's ordinary slots, like
tokens generated later, and attend over the compressed prompt exactly as they did when they were decoded:
in the compacting chunk through the torch reference (``core.attention.decode_attention``, teacher-forced),
in later chunks through the backend's decode plan (``backend.forward_extend``).

Two steps, on two sides of SGLang, as its own memory management is split:

- **Plan, inside the forward** (the attention backend computes): per layer, right after the stock extend
  attention, :meth:`CompactionBatch.after_layer` plans with ``core.compress`` (the same step the HF reference
  path runs) and keeps a compact copy. A policy that ranks by the cross-layer prior (hybridkv's default) needs
  every layer before it can plan one: ``after_layer`` then computes the layer's share of the prior, and
  :meth:`CompactionBatch.finish` (after the last layer) plans every layer from the pool, where the prompt's KV
  still is. The planned request (:class:`PromptCompaction`) is left on its handle (``handle.pending``). No pool
  slot, host page or radix entry is touched inside the forward. The prior is kept on the handle, so a
  re-prefill after retraction plans layer by layer again and replays its outputs in place.
- **Commit, on the scheduler side between forwards** (:class:`Commit`, called by the scheduler hooks before SGLang
  processes the prefill batch's result, so before it releases or checkpoints any of the batch's requests):
  allocate the region's pool slots (evicting radix entries if needed) and host pages, copy the compact KV into
  them, register the region, and give the prompt's staging slots back. With the radix cache off the staging
  slots are freed first; with it on, the tree takes them over in the same result processing and the scheduler
  hooks drop the request's lock (``handle.pending_unlock``). With SGLang's overlap scheduler the commit runs
  before the next batch is formed (``scheduler_hooks``), so admission sees the freed slots and the next decode
  plan the committed region.

Tensor parallelism: each rank holds a slice of every layer's KV heads (``layer.tp_k_head_num``) and compacts
its own. Ranks agree through SGLang's TP group (gloo CPU group, small tensors, once per layer and request):
the policies gather the per-head figures the budget allocation needs (``core/shard.py``), so head types and
budgets are the one-rank ones; at commit the ranks take the largest slot count any of them needs (SGLang's
scheduler runs on every rank with one slot pool per rank, and their allocations must stay identical), and the
stats are summed over ranks (only rank 0's output reaches the tokenizer manager). Every rank processes the
same batch results in the same order, so commit's collectives line up as the forward's do.

Faults are contained per request: an exception in a request's compaction (any layer, planning, or commit) aborts that
request — SGLang finishes it after this forward with an HTTP 500 naming the stage and the error — and returns
what it took (pool slots, host pages; its staging slots and radix lock go back through SGLang's own release of
an aborted request), while the batch's other requests go on. Aborting rather than serving it uncompressed:
with the radix cache off, commit has already given the prompt's staging slots back (the region reuses them),
so after a late fault the full prompt KV no longer exists. A fault must reach every rank alike under tensor
parallelism (a rank that raises alone leaves the others in a collective). ``FAULT_ENV`` injects faults for
tests.

The host tier has a limit (``host_tier.HostTier``): a request whose dynamic heads need more pages than the tier
has left is planned again with every head static (policy ``all_static``: it needs no host pages), and its
stats say ``host_tier_fallback``.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass, field

import torch

from ..core.attention import decode_attention
from ..core.budget import within_budget
from ..core.cache import CompressedLayer, KVBytes
from ..core.compress import cross_layer_prior, layer_prior, plan_layer, prompt_media_mask
from ..core.digest import kept_digest
from ..core.plan import LayerPlan
from ..core.policies import make_policy
from ..core.shard import HeadShard
from . import pool_region
from .host_tier import HostTier
from .regions import Region, Regions
from .requests import RequestHandle

logger = logging.getLogger("sglang_hybridkv")

# Fault injection for tests: comma-separated "<stage>:<rid prefix>" items make stage "layer" (after_layer) or
# "commit" (after the request's slots and host pages were taken and written) raise for requests whose id starts
# with the prefix.
FAULT_ENV = "SGLANG_HYBRIDKV_TEST_FAULT"


@dataclass
class PromptCompaction:
    """One request of the extend batch that has window positions in this chunk or completes its prompt; once
    planned (``finish``), what the scheduler side commits."""

    handle: RequestHandle
    row: int
    q_start: int  # first query row of the request in the batch
    pos_start: int  # first position this extend computes (prefix length)
    pos_end: int  # sequence length after this extend
    finishing: bool
    layers: dict[int, CompressedLayer] = field(default_factory=dict)
    plans: dict[int, LayerPlan] = field(default_factory=dict)
    priors: dict[int, torch.Tensor] = field(default_factory=dict)  # per layer, until commit plans them all
    scaling: dict[int, float] = field(default_factory=dict)

    @functools.cached_property
    def media_mask(self) -> torch.Tensor:
        """``(prompt_len,)`` bool, the prompt's media positions outside the window: once per request, not per layer."""
        h = self.handle
        return prompt_media_mask(h.prompt_len, h.window, h.media_mask)

    def plan(self, lid: int, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> CompressedLayer:
        """Plan layer ``lid`` (``(H, L, D)`` prompt KV) and keep its compact copy."""
        h = self.handle
        plan = plan_layer(_policy(h.config), h.q_window.get(lid), keys, self.media_mask, lid, scaling, tp_shard(),
                          h.prior)
        self.plans[lid] = plan
        self.layers[lid] = CompressedLayer(plan, keys, values)  # copies what it keeps
        return self.layers[lid]

    def plan_all(self, kv_pool, prompt_slots: torch.Tensor) -> None:
        """Plan every layer from the prompt's KV, still in the pool at ``prompt_slots``."""
        for lid in range(kv_pool.layer_num):
            k_buf, v_buf = kv_pool.get_key_buffer(lid), kv_pool.get_value_buffer(lid)
            self.plan(lid, k_buf[prompt_slots].transpose(0, 1), v_buf[prompt_slots].transpose(0, 1),
                      self.scaling[lid])


class CompactionBatch:
    """Per extend batch: window-query stash and compaction (see the module docstring)."""

    def __init__(self, entries: list[PromptCompaction]) -> None:
        self.entries = entries
        self.finishing = [e for e in entries if e.finishing]

    @classmethod
    def build(cls, forward_batch, incoming: dict[int, tuple], rows: list[int]) -> "CompactionBatch | None":
        """From the handles the scheduler handed over for this batch (``row -> (handle, full length)``) and the
        batch's ``req_to_token`` rows on the host (``rows``: SGLang's host copy, so that no device value is read);
        None when nothing to do."""
        if not incoming:
            return None
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        ext = forward_batch.extend_seq_lens_cpu
        entries, q_start = [], 0
        for i, row in enumerate(rows):
            item = incoming.get(row)
            q_len = int(ext[i])
            if item is not None and item[0].error is None:  # an aborted request compacts nothing more
                handle, full_len = item
                end, start = int(seq_lens[i]), int(seq_lens[i]) - q_len
                w = handle.window
                in_window = start < handle.prompt_len and end > handle.prompt_len - w
                finishing = start < handle.prompt_len <= end
                if in_window or finishing:
                    if start == 0 or handle.q_filled is None:
                        handle.q_window, handle.q_filled = {}, torch.zeros(w, dtype=torch.bool)
                    entries.append(PromptCompaction(handle, rows[i], q_start, start, end, finishing))
            q_start += q_len
        return cls(entries) if entries else None

    # ---- per layer ----------------------------------------------------------------------------------
    def after_layer(self, layer, q: torch.Tensor, o: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    req_to_token: torch.Tensor) -> None:
        """Stash this chunk's window queries; plan and compact the requests whose prompt ends in this chunk;
        re-attend the output tokens that follow the prompt in this chunk over the compressed prompt.

        Args:
            q: ``(tokens, Hq * D)`` this batch's queries of the layer (post-RoPE).
            o: ``(tokens, Hq * D)`` the stock attention output, overwritten for those output tokens.
            k_cache, v_cache: ``(slots, H, D)`` the layer's pool buffers (this chunk already written).
        """
        q_all = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        for e in self.entries:
            if e.handle.error is not None:
                continue
            try:
                self._layer(e, layer, q_all, o, k_cache, v_cache, req_to_token)
            except Exception as exc:  # noqa: BLE001 - contained: this request is aborted, the batch goes on
                _fail(e, f"layer {layer.layer_id}", exc)

    def _layer(self, e: PromptCompaction, layer, q_all: torch.Tensor, o: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, req_to_token: torch.Tensor) -> None:
        """:meth:`after_layer` for one request (``q_all``: ``(tokens, Hq, D)``)."""
        lid = layer.layer_id
        h = e.handle
        w = h.window
        first = h.prompt_len - w
        lo, hi = max(first, e.pos_start), min(h.prompt_len, e.pos_end)
        if lo < hi:
            buf = h.q_window.get(lid)
            if buf is None:
                buf = h.q_window[lid] = q_all.new_zeros(layer.tp_q_head_num, w, layer.qk_head_dim)
            buf[:, lo - first: hi - first] = q_all[e.q_start + lo - e.pos_start: e.q_start + hi - e.pos_start].transpose(0, 1)
            if lid == 0:
                h.q_filled[lo - first: hi - first] = True
        if not e.finishing or not bool(h.q_filled.all()):
            return
        _inject("layer", h.rid)
        slots = req_to_token[e.row, : h.prompt_len].long()
        keys = k_cache[slots].transpose(0, 1)  # (H, L, D)
        policy = _policy(h.config)
        e.scaling[lid] = layer.scaling
        if policy.uses_prior() and h.prior is None:  # first compaction: planned after the last layer (finish)
            e.priors[lid] = layer_prior(policy, h.q_window[lid], keys, layer.scaling, e.media_mask, tp_shard())
            return
        cl = e.plan(lid, keys, v_cache[slots].transpose(0, 1), layer.scaling)
        if e.pos_end > h.prompt_len:  # outputs re-prefilled after a retraction
            first = e.q_start + h.prompt_len - e.pos_start
            last = e.q_start + e.pos_end - e.pos_start
            out_slots = req_to_token[e.row, h.prompt_len: e.pos_end].long()
            replay = copy.copy(cl)  # decode_attention appends to its layer: keep ``cl`` as compacted
            o_view = o.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o_view[first:last] = decode_attention(
                replay, q_all[first:last], k_cache[out_slots], v_cache[out_slots], layer.scaling,
                h.config.retrieval_interval, h.config.chunk_score_scale).to(o.dtype)

    def finish(self, kv_pool, req_to_token: torch.Tensor) -> None:
        """After the last layer: plan what waited for the cross-layer prior, and leave each finishing request's
        planned compaction on its handle (``handle.pending``) for the scheduler side (:class:`Commit`)."""
        for e in self.finishing:
            h = e.handle
            if h.error is not None:
                continue
            try:
                if e.priors and len(e.priors) == kv_pool.layer_num:  # every layer seen: the prior, then the plans
                    h.prior = cross_layer_prior(e.priors, kv_pool.layer_num)
                    e.plan_all(kv_pool, req_to_token[e.row, : h.prompt_len].long())
            except Exception as exc:  # noqa: BLE001 - contained: this request is aborted, the batch goes on
                _fail(e, "planning", exc)
                continue
            if len(e.layers) != kv_pool.layer_num:
                h.q_window, h.q_filled = {}, None
                logger.warning("hybridkv: request %s stays uncompressed: its observation window was not fully "
                               "computed in this prefill", h.rid)
                h.stats = {"policy": h.config.policy, "compressed": False, "prompt_tokens": h.prompt_len}
                continue
            h.pending = e


class Commit:
    """The scheduler side of compaction (see the module docstring): between forwards, move each planned request
    into pool slots and host-tier pages and register its region.

    Args:
        allocator: SGLang's token-slot allocator (its KV cache is the pool the regions live in).
        req_to_token_pool: SGLang's ``ReqToTokenPool`` (its aux cache is ``regions``).
        tree_cache: SGLang's prefix cache; when on, it owns the prompt's staging slots and is evicted for room.
        keep_free: slots the pool must still be able to give (free or evictable) after a region takes its own:
            SGLang allocates the next chunk of a chunked prompt without checking the pool (it counted those
            tokens when it admitted the request), so a region that took them would make that chunk fail.
    """

    def __init__(self, allocator, req_to_token_pool, regions: Regions, tree_cache, keep_free: int = 0) -> None:
        self.keep_free = keep_free
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = allocator.get_kvcache()
        self.regions, self.host = regions, regions.host
        self.tree_cache = tree_cache
        self.radix = tree_cache is not None and not getattr(tree_cache, "disable", True)

    def run(self, reqs) -> None:
        """Commit the planned compaction of each of ``reqs`` (an extend batch whose result is being processed,
        in batch order: the same on every TP rank). A request retracted or finished since its forward commits
        nothing (a re-prefill plans again); one whose commit raises is aborted and gives back what it took."""
        for req in reqs:
            h = getattr(req, "hybridkv", None)
            e = None if h is None else h.pending
            if e is None:
                continue
            h.pending = None
            if req.is_retracted or req.finished() or req.kv.req_pool_idx != e.row:
                h.q_window, h.q_filled = {}, None
                continue
            held = _Held()
            try:
                self._commit(e, held)
            except Exception as exc:  # noqa: BLE001 - contained: this request is aborted, the batch goes on
                held.release(e.row, self.allocator, self.regions, self.host)
                _fail(e, "commit", exc)

    def _commit(self, e: PromptCompaction, held: "_Held") -> None:
        """:meth:`run` for one request; what it takes is recorded in ``held`` as it goes."""
        shard = tp_shard()
        h, kv_pool, host = e.handle, self.kv_pool, self.host
        req_to_token = self.req_to_token_pool.req_to_token
        fallback = self._fit_host_tier(e, req_to_token[e.row, : h.prompt_len].long(), shard)
        h.q_window, h.q_filled = {}, None
        n_slots = pool_region.slots_needed(e.layers)
        if shard is not None:  # one slot count on every rank: the most any rank's heads need
            n_slots = int(shard.gather(torch.tensor([n_slots], dtype=torch.int64)).max())
        staging = req_to_token[e.row, : h.prompt_len].clone()
        slots = self._take_slots(e, staging, n_slots, held)
        if slots is None:
            chunk = f" and keeping {self.keep_free} slots for SGLang's next prompt chunk" if self.keep_free else ""
            logger.warning("hybridkv: request %s stays uncompressed: the pool has no room for its compressed "
                           "form, even after evicting radix-cache entries%s (budget %.2f)", h.rid, chunk,
                           h.config.budget)
            h.stats = {**_plan_stats(h, e, shard), "compressed": False, "host_tier_fallback": fallback}
            return
        pages = host.alloc(pool_region.host_pages_needed(e.layers))
        if pages is None:  # _fit_host_tier left room: nothing else allocates pages in between
            raise RuntimeError("the host tier refused pages it had room for")
        held.pages = pages
        tables = pool_region.layout(e.layers, slots, pages)
        for lid, cl in e.layers.items():
            pool_region.write(kv_pool.get_key_buffer(lid), kv_pool.get_value_buffer(lid), cl, tables, lid)
            if cl.k_host.shape[1] and cl.dyn_heads.numel():
                host.write(lid, pages, cl.k_host, cl.v_host)
        _inject("commit", h.rid)
        region = Region(h.rid, h.prompt_len, e.pos_end, h.config.retrieval_interval, slots, pages,
                        0 if self.radix else h.prompt_len, tables, int(pages.numel()) * host.page_bytes)
        self.regions.add(e.row, region)
        held.registered = True
        h.stats = {**_stats(h, e, region, kv_pool, shard, host.on_device), "host_tier_fallback": fallback}
        h.pending_unlock = self.radix
        s = h.stats
        if not s["within_budget"]:
            logger.warning("hybridkv: request %s keeps %.3f of its full KV on the device, over its budget %.2f "
                           "(%s cannot go below its always-kept tokens%s)", h.rid, s["kv_fraction_device"],
                           h.config.budget, h.config.policy,
                           " and chunk summaries" if s["dynamic_heads"] else "")
        logger.info("hybridkv: compressed request %s (%d prompt tokens, %s @ %.2f): %d static / %d dynamic heads, "
                    "device KV %d -> %d bytes (%.1fx), host tier %d bytes", h.rid, h.prompt_len, h.config.policy,
                    h.config.budget, s["static_heads"], s["dynamic_heads"], s["kv_bytes_full"],
                    s["kv_bytes_device"], s["kv_bytes_full"] / max(1, s["kv_bytes_device"]), s["kv_bytes_host"])

    def _fit_host_tier(self, e: PromptCompaction, prompt_slots: torch.Tensor, shard: HeadShard | None) -> bool:
        """Keep the host tier within its limit: when the request's dynamic heads need more pages than it has
        left (on any rank), plan the request again with every head static (the prompt's KV is still in the pool
        at ``prompt_slots``). Returns whether it did."""
        h, host, kv_pool = e.handle, self.host, self.kv_pool
        need = pool_region.host_pages_needed(e.layers)
        short = not host.fits(need)
        if shard is not None:  # every rank takes the same branch (the planning below gathers)
            short = bool(shard.gather(torch.tensor([int(short)], dtype=torch.int64)).max())
        if not short:
            return False
        logger.warning("hybridkv: request %s: the host tier has room for %d pages, its %s heads need %d "
                       "(--hybridkv-host-tier-gb: %d of %d bytes used); compressed with every head static",
                       h.rid, host.available_pages, h.config.policy, need, host.used_pages * host.page_bytes,
                       host.limit)
        h.config = h.config.replace(policy="all_static")
        policy = _policy(h.config)
        if policy.uses_prior() and h.prior is None:
            priors = {}
            for lid in range(kv_pool.layer_num):
                keys = kv_pool.get_key_buffer(lid)[prompt_slots].transpose(0, 1)
                priors[lid] = layer_prior(policy, h.q_window[lid], keys, e.scaling[lid], e.media_mask, shard)
            h.prior = cross_layer_prior(priors, kv_pool.layer_num)
        e.plan_all(kv_pool, prompt_slots)
        return True

    def _take_slots(self, e: PromptCompaction, staging: torch.Tensor, n: int, held: "_Held"):
        """``n`` slots for the region (recorded in ``held``); radix cache off: the prompt's staging slots are
        freed first."""
        allocator = self.allocator
        if self.radix:  # the tree takes the prompt's slots over when SGLang processes this result
            return held.take(_alloc(allocator, self.tree_cache, n, self.keep_free))
        p = staging.numel()
        extra = None
        if n > p:  # budgets near 1.0: summaries and buffers outgrow the prompt's own slots
            extra = held.take(_alloc(allocator, self.tree_cache, n - p, self.keep_free))
            if extra is None:
                return None
        # Zero the row first: whatever SGLang frees from this row later skips these positions (slot 0 is
        # padding and the plugin's allocator hook drops it), so each slot is freed exactly once.
        self.req_to_token_pool.req_to_token[e.row, :p] = 0
        allocator.free(staging[staging != 0])
        slots = held.take(_alloc(allocator, self.tree_cache, min(n, p)))  # just freed p slots: cannot fail
        return slots if extra is None else torch.cat([slots, extra])


def _fail(e: PromptCompaction, stage: str, exc: Exception) -> None:
    """Abort ``e``'s request: compaction of it raised ``exc`` in ``stage``."""
    message = (f"hybridkv: compaction of request {e.handle.rid} failed in {stage} "
               f"({type(exc).__name__}: {exc}); the request is aborted")
    logger.error(message, exc_info=exc)
    e.handle.fail(message)

@dataclass
class _Held:
    """What one request's commit has taken so far, so that a fault gives it back."""

    slots: list[torch.Tensor] = field(default_factory=list)
    pages: torch.Tensor | None = None
    registered: bool = False  # the region (slots and pages) is in ``Regions``, which frees it

    def take(self, slots: torch.Tensor | None) -> torch.Tensor | None:
        if slots is not None:
            self.slots.append(slots)
        return slots

    def release(self, row: int, allocator, regions: Regions, host: HostTier) -> None:
        if self.registered:
            regions.free(row)
            return
        for slots in self.slots:
            if slots.numel():
                allocator.free(slots)
        if self.pages is not None and self.pages.numel():
            host.free(self.pages)


def _inject(stage: str, rid: str) -> None:
    """Raise where ``FAULT_ENV`` (comma-separated ``stage:rid-prefix`` items) names ``stage`` and ``rid`` (tests)."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, prefix = item.partition(":")
        if name == stage and prefix and rid.startswith(prefix):
            raise RuntimeError(f"fault injected by {FAULT_ENV}={item}")


def _alloc(allocator, tree_cache, n: int, keep: int = 0) -> torch.Tensor | None:
    """``n`` pool slots, evicting unlocked radix-cache entries if needed; None if the pool has no room for them
    with ``keep`` slots still free or evictable afterwards."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    evictable = tree_cache.evictable_size() if tree_cache is not None else 0
    if allocator.available_size() + evictable - n < keep:
        return None
    slots = allocator.alloc(n)
    if slots is None and tree_cache is not None:
        allocator.evict_to_free_tokens(tree_cache, n)
        slots = allocator.alloc(n)
    return slots


@functools.lru_cache(maxsize=64)
def _policy(cfg):
    """Policies are stateless apart from a loaded head profile: one per distinct (frozen) config."""
    return make_policy(cfg)


def _plan_stats(h: RequestHandle, e: PromptCompaction, shard: HeadShard | None, local: dict | None = None) -> dict:
    """Stats of a planned request; ``local`` holds further per-rank figures. Whole-model figures: counts and
    bytes are summed over the TP ranks, the digest is over every rank's heads (collectives under TP)."""
    n_static = sum(int(p.static.sum()) for p in e.plans.values())
    n_heads = sum(p.static.numel() for p in e.plans.values())
    summed = _sum_over_ranks(shard, {"static_heads": n_static, "dynamic_heads": n_heads - n_static, **(local or {})})
    media = {} if h.media is None else h.media.tokens
    return {"policy": h.config.policy, "budget": h.config.budget, "prompt_tokens": h.prompt_len,
            "media_tokens": sum(media.values()), "image_tokens": media.get("image", 0),
            "video_tokens": media.get("video", 0), **summed, "tp_size": 1 if shard is None else shard.size,
            "kept_digest": kept_digest(e.plans, None if shard is None else shard.gather)}


def _stats(h: RequestHandle, e: PromptCompaction, region: Region, kv_pool, shard: HeadShard | None,
           host_on_device: bool) -> dict:
    """Stats of a compacted request: every byte of the slots it holds counts as device KV, and its host-tier
    pages too when the tier had to live on the device. Under TP the slots are the same on every rank
    (``kv_slots_device``) and the bytes are every rank's together."""
    logical = KVBytes()
    for cl in e.layers.values():
        logical = logical + cl.nbytes()
    first = e.layers[0]
    slot_bytes = 2 * kv_pool.layer_num * first.num_heads * first.head_dim * first.k_dev.element_size()
    tables = region.tables
    table_bytes = 4 * (tables.kept_len.sum().item() + tables.n_chunks.sum().item())  # int32 row ids per step
    device = int(region.slots.numel()) * slot_bytes
    tier_device, tier_host = (region.host_bytes, 0) if host_on_device else (0, region.host_bytes)
    local = {"kv_bytes_full": logical.full, "kv_bytes_device": device + tier_device + int(table_bytes),
             "kv_bytes_host": tier_host, "kv_bytes_metadata": int(table_bytes)}
    stats = {**_plan_stats(h, e, shard, local), "compressed": True, "kv_slots_device": int(region.slots.numel())}
    fraction = stats["kv_bytes_device"] / max(1, stats["kv_bytes_full"])
    return {**stats, "kv_fraction_device": round(fraction, 4),
            "within_budget": within_budget(fraction, h.config.budget, h.config.budget_unit)}


def _sum_over_ranks(shard: HeadShard | None, figures: dict) -> dict:
    """``figures`` (ints) summed over the TP ranks, in one collective; unchanged on one rank."""
    if shard is None:
        return {k: int(v) for k, v in figures.items()}
    every = shard.gather(torch.tensor([[float(v) for v in figures.values()]], dtype=torch.float64))
    return {k: int(round(float(x))) for k, x in zip(figures, every.sum(0))}


_TP_SHARD: list = []  # cached once SGLang's TP group exists


def tp_shard() -> HeadShard | None:
    """This rank's :class:`HeadShard` in SGLang's TP group (gathers over its gloo CPU group); None on one rank
    or outside an SGLang scheduler (no TP group)."""
    if _TP_SHARD:
        return _TP_SHARD[0]
    from sglang.srt.distributed.parallel_state import get_tp_group

    try:
        group = get_tp_group()
    except AssertionError:  # not initialised: not inside a scheduler process
        return None
    shard = None
    if group.world_size > 1:
        cpu_group, n = group.cpu_group, group.world_size

        def gather(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu").contiguous()
            out = [torch.empty_like(t) for _ in range(n)]
            torch.distributed.all_gather(out, t, group=cpu_group)
            return torch.cat(out)

        shard = HeadShard(group.rank_in_group, n, gather)
    _TP_SHARD.append(shard)
    return shard
