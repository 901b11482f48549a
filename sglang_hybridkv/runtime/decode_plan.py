"""The per-batch decode plan: built once per forward batch, read by every layer, one attention call per layer.

Every request of the batch (compressed or not) becomes ``H`` flattened sequences, one per KV head, with the
GQA group as query heads (``N = B * H``). A sequence's rows of the pool view (``(slots * H, D)``, row
``slot * H + h``) come in two parts, each cut into work items of at most ``split`` columns
(``kernels.row_decode``), so a sequence costs what its own length costs and one long uncompressed request does
not widen the compressed ones:

- *prompt* (per layer): the head's kept prompt tokens (static heads: the text-prior pick; dynamic heads: text,
  sink and window), then a dynamic head's retrieval buffer, refilled each step (or every
  ``retrieval_interval`` steps) with the chunks its current query scores highest (only chunks it does not hold
  yet are copied from the host tier); empty for uncompressed requests. These items depend only on which
  requests are in the batch: :class:`DecodePlanner` keeps them while the composition and the regions are
  unchanged.
- *tail* (shared by every layer): the tokens after the compressed prompt, read through SGLang's
  ``req_to_token`` (generated tokens; for an uncompressed request, all of its tokens). Rebuilt each step.

Host work happens in :meth:`DecodePlanner.build`, from host-side lengths only (``seq_lens_cpu``, the regions'
tables): item counts in numpy, then device gathers of known sizes; no device value is read back. The per-layer
path (:meth:`DecodePlan.attend`) is fixed-shape device work: batched chunk scoring and top-k over the layer's
retrieving heads, one copy of the selected rows from the host tier into the buffers, one ``row_decode`` call.
A layer where the batch has no dynamic head skips retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device_copy import to_device
from ..kernels.chunk_select import score_chunks_rows, select_chunks
from ..kernels.row_copy import copy_rows
from ..kernels.backend import triton_available
from ..kernels.row_decode import Workspace, merge_index, row_decode
from .host_tier import HostTier
from .regions import Regions


@dataclass
class _LayerRetrieval:
    """One layer's sequences that retrieve chunks (dynamic heads of compressed requests), ``Nd`` of them, so that
    scoring, top-k and the buffer update run over them only; a layer without any has no such object and skips
    retrieval. A buffer is ``k_max`` slots of ``chunk`` rows; its rows are also listed flat (``M`` = the layer's
    buffer rows), with what every step's update needs of each precomputed."""

    seq: torch.Tensor  # (Nd,) the batch sequence each entry is
    sum_rows: torch.Tensor  # (Nd, C)
    n_chunks: torch.Tensor  # (Nd,)
    host_pages: torch.Tensor  # (Nd, C)
    top_k: torch.Tensor  # (Nd,)
    k_max: int
    slot_first: torch.Tensor  # (Nd, K) pool row of each buffer slot's first row
    has_slot: torch.Tensor  # (Nd, K) bool
    row_seq: torch.Tensor  # (M,) entry of each buffer row
    row_slot: torch.Tensor  # (M,) its slot
    row_off: torch.Tensor  # (M,) its offset in the slot
    row_dst: torch.Tensor  # (M,) its pool row
    row_n_host: torch.Tensor  # (M,) host-tier tokens of its head (a short last chunk leaves rows empty)


@dataclass
class _Tables:
    """The composition-dependent part of a plan: the prompt items of every layer, ``(L, Ip, S)``, and what
    each step needs of the batch's regions. Items past a layer's own count are empty (no valid column)."""

    key: tuple
    rows: torch.Tensor  # (L, Ip, S) pool rows
    valid: torch.Tensor  # (L, Ip, S) bool, before the retrieval buffers' own validity
    is_buf: torch.Tensor  # (L, Ip, S) bool: a retrieval-buffer row (valid only while it holds a chunk)
    seq: torch.Tensor  # (L, Ip) sequence of each item
    retrieval: list[_LayerRetrieval | None]  # per layer
    tail_start: np.ndarray  # (B,) first position read through req_to_token, on the host
    tail_start_dev: torch.Tensor  # (B,)
    decode_start: torch.Tensor  # (B,) sequence length at compaction (0 for uncompressed requests)
    interval: torch.Tensor  # (B,) retrieval interval


class RetrievalBuffers:
    """What the retrieval buffers hold, owned by the backend and updated by every plan: per layer, the host-tier
    row each pool row holds (``-1``: none; 4 bytes per pool row and layer, a fixed cost of the server, not of a
    request), and running counts of buffer rows selected and rows copied from the host tier (device tensors,
    read only when reported, so no step waits on them)."""

    def __init__(self, num_layers: int, rows: int, device: torch.device | str) -> None:
        self.src = torch.full((num_layers, rows), -1, dtype=torch.int32, device=device)
        self.counts = torch.zeros(2, dtype=torch.long, device=device)  # rows selected, rows copied

    def totals(self) -> dict[str, int]:
        selected, copied = self.counts.tolist()
        return {"retrieval_rows_selected": selected, "retrieval_rows_copied": copied}


class DecodePlan:
    """One decode forward batch's attention metadata. See the module docstring.

    Attributes:
        rows, valid: ``(L, I, S)`` every layer's items (its prompt items, then the shared tail items).
        seq: ``(L, I)`` sequence of each item.
    """

    def __init__(self, tables: _Tables, rows: torch.Tensor, valid: torch.Tensor, seq: torch.Tensor,
                 refresh: torch.Tensor, fresh: torch.Tensor, num_kv_heads: int, chunk: int, score_scale: float,
                 merge: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.t = tables
        self.rows, self.valid, self.seq = rows, valid, seq
        self.merge = merge  # Triton path: every layer's items grouped by sequence (``merge_index``), once per step
        self.refresh = refresh  # (N,) bool: sequences whose dynamic heads re-select chunks this step
        self.fresh = fresh  # (N,) bool: first step on a region; its buffer rows hold nothing of it yet
        self.h, self.chunk, self.score_scale = num_kv_heads, chunk, score_scale
        self.workspace = Workspace()  # every layer gathers the same number of rows

    def attend(self, layer_id: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
               buffers: RetrievalBuffers, host: HostTier, scaling: float) -> torch.Tensor:
        """Decode attention of one layer for the whole batch.

        Args:
            q: ``(B, Hq * D)`` this step's queries.
            k_buffer, v_buffer: ``(slots, H, D)`` the layer's pool buffers (this step's KV already written).
            buffers: what the retrieval buffers hold (updated in place by this layer's retrieval).
        Returns: ``(B, Hq * D)``.
        """
        d = k_buffer.shape[-1]
        k_rows, v_rows = k_buffer.view(-1, d), v_buffer.view(-1, d)
        qg = q.view(q.shape[0] * self.h, -1, d)  # (N, group, D): query head j belongs to KV head j // group
        rows, valid = self.rows[layer_id], self.valid[layer_id]
        r = self.t.retrieval[layer_id]
        if r is not None:
            self._retrieve(layer_id, r, qg, k_rows, v_rows, buffers, host)
            valid = self._with_buffer_validity(layer_id, rows, valid, buffers)
        merge = None if self.merge is None else (self.merge[0][layer_id], self.merge[1][layer_id])
        return row_decode(qg, k_rows, v_rows, rows, valid, self.seq[layer_id], scaling,
                          workspace=self.workspace, merge=merge).view(q.shape)

    def _with_buffer_validity(self, layer_id: int, rows: torch.Tensor, valid: torch.Tensor,
                              buffers: RetrievalBuffers) -> torch.Tensor:
        """A buffer row counts only while it holds a chunk (a dropped slot, or the unfilled end of a short last
        chunk, holds none)."""
        ip = self.t.rows.shape[1]
        holds = buffers.src[layer_id].index_select(0, rows[:ip].reshape(-1)).view(rows[:ip].shape) >= 0
        prompt = valid[:ip] & (holds | ~self.t.is_buf[layer_id])
        return torch.cat([prompt, valid[ip:]]) if valid.shape[0] > ip else prompt

    def _retrieve(self, layer_id: int, r: _LayerRetrieval, qg: torch.Tensor, k_rows: torch.Tensor,
                  v_rows: torch.Tensor, buffers: RetrievalBuffers, host: HostTier) -> None:
        """Score the layer's retrieving heads' chunks and bring the top-k into their buffers, copying only the
        chunks not already there (fixed shapes, no host sync): select, match what the buffers hold, assign free
        slots to the missing chunks, expand slots to rows and copy."""
        refresh, fresh = self.refresh[r.seq], self.fresh[r.seq]
        row_src = buffers.src[layer_id]
        scores = score_chunks_rows(qg[r.seq], k_rows, v_rows, r.sum_rows, r.n_chunks, self.score_scale)
        ids, ok = _selected(scores, r.top_k * refresh, r.k_max)
        want = torch.where(ok, r.host_pages.gather(1, ids) * self.chunk, -2)  # first host row of each chunk
        held = torch.where(r.has_slot & ~fresh[:, None], row_src[r.slot_first].long(), -1)
        kept, need = _match_resident(want, held, ok)
        fill = _assign_slots(kept, need, r.has_slot)
        src, load_ok, stays, changed = _expand_to_rows(r, fill, ids, kept, refresh, self.chunk)
        dst = torch.where(load_ok, r.row_dst, 0)  # entries that copy nothing go to the pool's padding row 0
        d = k_rows.shape[1]
        copy_rows(host.k[layer_id].view(-1, d), src, k_rows, dst)
        copy_rows(host.v[layer_id].view(-1, d), src, v_rows, dst)
        buffers.counts += torch.stack([((stays & (row_src[r.row_dst] >= 0)) | load_ok).sum(), load_ok.sum()])
        # A loaded row records its source; a slot whose chunk was dropped and not refilled is emptied.
        row_src.index_copy_(0, torch.where(changed, r.row_dst, 0), torch.where(load_ok, src, -1).to(row_src.dtype))
        row_src[:1].fill_(-1)  # an in-place fill, not a host->device copy: CUDA-graph capturable


def _selected(scores: torch.Tensor, top_k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top chunks of each retrieving sequence in ascending chunk order, ``(Nd, K)`` ids and ``ok``.

    Ascending order: when every chunk is taken (the only case where a buffer is shorter than ``k_max * chunk``),
    a fresh buffer puts chunk ``i`` in slot ``i``, so the short last chunk ends at the buffer's end."""
    ids, ok = select_chunks(scores, top_k, k_max)
    big = scores.shape[1]
    ids = torch.where(ok, ids, big).sort(dim=1).values
    return ids.clamp(max=big - 1), ids < big


def _match_resident(want: torch.Tensor, held: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which buffer slots already hold a selected chunk (``kept (Nd, K)``, by slot) and which selected chunks
    must be copied (``need (Nd, K)``, by selection)."""
    match = (want[:, :, None] == held[:, None, :]) & (held >= 0)[:, None, :]  # (Nd, selected, slot)
    return match.any(1), ok & ~match.any(2)


def _assign_slots(kept: torch.Tensor, need: torch.Tensor, has_slot: torch.Tensor) -> torch.Tensor:
    """The j-th missing chunk goes to the j-th slot that holds no kept chunk. Returns ``fill (Nd, K + 1)``: per
    slot, the selection entry it loads (``-1``: none; the last column absorbs entries that load nothing)."""
    n, k = need.shape
    free_first = torch.sort((~(has_slot & ~kept)).to(torch.uint8), dim=1, stable=True).indices
    target = free_first.gather(1, (need.cumsum(1) - 1).clamp(min=0))
    fill = torch.full((n, k + 1), -1, dtype=torch.long, device=need.device)
    fill.scatter_(1, torch.where(need, target, k), torch.arange(k, device=need.device).expand(n, k).contiguous())
    return fill


def _expand_to_rows(r: _LayerRetrieval, fill: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor,
                    refresh: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Per buffer row (one entry each, so no two entries write the same pool row): its host-tier source row,
    whether it loads one, whether its slot keeps its chunk, and whether its record changes."""
    seq, slot = r.row_seq, r.row_slot
    entry = fill[seq, slot]
    write = refresh[seq]
    load = write & (entry >= 0)
    chunk_id = ids[seq, entry.clamp(min=0)]
    load_ok = load & (chunk_id * chunk + r.row_off < r.row_n_host)
    src = torch.where(load_ok, r.host_pages[seq, chunk_id] * chunk + r.row_off, 0)
    stays = write & kept[seq, slot]
    return src, load_ok, stays, load | (write & ~stays)


def item_layout(lengths: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    """Work items of sequences of ``lengths`` (``(N,)``, host): ``seq`` and ``first`` column of each item, a
    sequence's items in order, ``ceil(n / split)`` of them (none for an empty sequence)."""
    counts = -(-lengths.astype(np.int64) // split)
    seq = np.repeat(np.arange(lengths.shape[0]), counts)
    first = (np.arange(seq.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)) * split
    return seq, first


class DecodePlanner:
    """Builds :class:`DecodePlan` objects; keeps the composition-dependent tables between steps.

    ``split``: columns per work item (``kernels.row_decode``); ``None`` picks 256 on CUDA (split-K width of the
    Triton kernel) and 64 elsewhere (the torch path pays for padding columns, bounded by one item per part).
    """

    def __init__(self, regions: Regions, num_layers: int, num_kv_heads: int, chunk: int, score_scale: float,
                 device: torch.device, split: int | None = None) -> None:
        self.regions, self.num_layers, self.h = regions, num_layers, num_kv_heads
        self.chunk, self.score_scale, self.device = chunk, score_scale, torch.device(device)
        self.split = split or (256 if self.device.type == "cuda" else 64)
        self._tables: _Tables | None = None
        self.builds = 0  # plans built (the backend counts its own per forward for /server_info)
        self.table_builds = 0

    def build(self, rows: Sequence[int], seq_lens_cpu: torch.Tensor, req_to_token: torch.Tensor,
              seq_lens: torch.Tensor | None = None) -> DecodePlan:
        """Plan of one decode batch.

        Args:
            rows: the requests' ``req_to_token`` rows (host ints).
            seq_lens_cpu: ``(B,)`` their lengths on the host, this step's token included.
            seq_lens: the same on the device, if the caller has it (else copied from ``seq_lens_cpu``).
        """
        self.builds += 1
        key = (tuple(rows), self.regions.version)
        if self._tables is None or self._tables.key != key:
            self._tables = self._build_tables(key, list(rows))
            self.table_builds += 1
        t, dev, h = self._tables, self.device, self.h
        lens = seq_lens_cpu.numpy().astype(np.int64)
        if seq_lens is None:
            seq_lens = to_device(lens, dev)
        seq = seq_lens.to(dev).long()
        tail_rows, tail_valid, tail_seq = self._tail_items(rows, lens - t.tail_start, t.tail_start, req_to_token)
        n_layers = self.num_layers
        plan_rows = torch.cat([t.rows, tail_rows.expand(n_layers, -1, -1)], 1)
        plan_valid = torch.cat([t.valid, tail_valid.expand(n_layers, -1, -1)], 1)
        plan_seq = torch.cat([t.seq, tail_seq.expand(n_layers, -1)], 1)
        fresh = seq - 1 == t.decode_start
        refresh = ((seq - 1 - t.tail_start_dev) % t.interval == 0) | fresh
        merge = merge_index(plan_seq, len(rows) * h) if triton_available(dev) else None
        return DecodePlan(t, plan_rows, plan_valid, plan_seq, refresh.repeat_interleave(h),
                          fresh.repeat_interleave(h), h, self.chunk, self.score_scale, merge)

    def _tail_items(self, rows: Sequence[int], tail_len: np.ndarray, tail_start: np.ndarray,
                    req_to_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items over every sequence's tail (each of a request's heads reads the same slots): ``(It, S)`` rows and
        valid, ``(It,)`` sequence. Shared by every layer of the step."""
        dev, h, s = self.device, self.h, self.split
        tail_len = np.maximum(tail_len, 0)
        req, first = item_layout(tail_len, s)  # per request; then one copy per KV head
        offsets = np.cumsum(tail_len) - tail_len
        total = int(tail_len.sum())
        # The slots of every request's tail, concatenated: one gather from req_to_token.
        owner = np.repeat(np.arange(len(rows)), tail_len)
        col = np.arange(total) - np.repeat(offsets, tail_len) + np.repeat(tail_start, tail_len)
        row_ids = np.asarray(rows, dtype=np.int64)[owner]
        as_dev = lambda x: to_device(x, dev)
        rtt = req_to_token.device
        slots = req_to_token[to_device(row_ids, rtt), to_device(col, rtt)].to(dev).long()
        if total == 0:
            slots = torch.zeros(1, dtype=torch.long, device=dev)
        heads = np.arange(h)
        item_seq = (req[:, None] * h + heads[None]).reshape(-1)
        item_first = np.repeat(first, h)
        item_req = np.repeat(req, h)
        pos = as_dev(item_first)[:, None] + torch.arange(s, device=dev)[None]
        valid = pos < as_dev(tail_len[item_req])[:, None]
        at = (as_dev(offsets[item_req])[:, None] + pos).clamp_(max=slots.shape[0] - 1)
        row = slots[at] * h + as_dev(item_seq % h)[:, None]
        return row, valid, as_dev(item_seq)

    def _build_tables(self, key: tuple, rows: list[int]) -> _Tables:
        regions = [self.regions.get(r) for r in rows]
        tabs = [r.tables for r in regions if r is not None]
        dim = lambda name: max((getattr(x, name).shape[-1] for x in tabs), default=0)
        p, c, r = dim("kept_rows"), dim("sum_rows"), dim("buf_rows")
        L, h, dev = self.num_layers, self.h, self.device

        def stack(name: str, width: int | None) -> torch.Tensor:  # on the host (regions keep their tables there)
            parts = []
            for reg in regions:
                if reg is None:
                    shape = (L, h, width) if width is not None else (L, h)
                    parts.append(torch.zeros(shape, dtype=torch.long))
                else:
                    x = getattr(reg.tables, name)
                    parts.append(F.pad(x, (0, width - x.shape[-1])) if width is not None else x)
            out = torch.stack(parts, dim=1)  # (L, B, H, ...)
            return out.reshape(L, len(rows) * h, *out.shape[3:])

        kept_len, buf_len, buf_rows = stack("kept_len", None), stack("buf_len", None), stack("buf_rows", r)
        items = self._prompt_items(stack("kept_rows", p), kept_len, buf_rows, buf_len)
        as_t = lambda xs: to_device(torch.tensor(xs, dtype=torch.long), dev)
        tail_start = np.array([0 if g is None else g.prompt_len for g in regions], dtype=np.int64)
        return _Tables(
            key=key, **{k: to_device(v, dev) for k, v in items.items()},
            retrieval=self._retrieval(stack("top_k", None), buf_len, buf_rows, stack("sum_rows", c),
                                      stack("n_chunks", None), stack("host_pages", c), stack("n_host", None)),
            tail_start=tail_start, tail_start_dev=to_device(tail_start, dev),
            decode_start=as_t([0 if g is None else g.decode_start for g in regions]),
            interval=as_t([1 if g is None else g.retrieval_interval for g in regions]),
        )

    def _prompt_items(self, kept_rows: torch.Tensor, kept_len: torch.Tensor, buf_rows: torch.Tensor,
                      buf_len: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's prompt items (kept rows, then buffer rows, per sequence), packed to ``(L, Ip, S)`` with
        ``Ip`` the most any layer needs (on the host; the regions keep their tables there)."""
        L, n = kept_len.shape
        s = self.split
        p_len = kept_len + buf_len
        width = max(int(p_len.max()) if p_len.numel() else 0, 1)
        k_items = -(-width // s)
        col = torch.arange(k_items * s)
        pad = lambda x: F.pad(x, (0, max(1, x.shape[-1]) - x.shape[-1]))  # a gather needs one column at least
        kept = pad(kept_rows).gather(2, col.clamp(max=max(kept_rows.shape[-1], 1) - 1).expand(L, n, -1))
        buf_col = (col[None, None] - kept_len[..., None]).clamp(min=0, max=max(buf_rows.shape[-1], 1) - 1)
        buf = pad(buf_rows).gather(2, buf_col)
        in_kept = col[None, None] < kept_len[..., None]
        combo = torch.where(in_kept, kept, buf).view(L, n * k_items, s)
        valid = (col[None, None] < p_len[..., None]).view(L, n * k_items, s)
        is_buf = (~in_kept).view(L, n * k_items, s)
        used = (torch.arange(k_items) * s)[None, None] < p_len[..., None]  # (L, n, k_items): items holding rows
        ip = int(used.sum((1, 2)).max()) if used.numel() else 0
        order = torch.sort((~used).view(L, -1).to(torch.uint8), dim=1, stable=True).indices[:, :ip]
        live = used.view(L, -1).gather(1, order)  # items past a layer's own count stay empty
        take = lambda x: x.gather(1, order[..., None].expand(-1, -1, s))
        return {"rows": take(combo), "valid": take(valid) & live[..., None], "is_buf": take(is_buf),
                "seq": order // k_items}

    def _retrieval(self, top_k: torch.Tensor, buf_len: torch.Tensor, buf_rows: torch.Tensor, sum_rows: torch.Tensor,
                   n_chunks: torch.Tensor, host_pages: torch.Tensor, n_host: torch.Tensor) -> list[_LayerRetrieval | None]:
        """Each layer's retrieving sequences (``top_k > 0``), from the ``(L, N, ·)`` tables (on the host here)."""
        out: list[_LayerRetrieval | None] = []
        dev, c = self.device, self.chunk
        for l in range(top_k.shape[0]):
            seq = torch.nonzero(top_k[l] > 0).flatten()
            if seq.numel() == 0:
                out.append(None)
                continue
            k = int(top_k[l, seq].max())
            blen, bufs = buf_len[l, seq], buf_rows[l, seq]
            slot_col = torch.arange(k) * c
            row_seq = torch.repeat_interleave(torch.arange(seq.numel()), blen)
            row_col = torch.arange(row_seq.numel()) - (torch.cumsum(blen, 0) - blen)[row_seq]
            to = lambda x: to_device(x, dev)
            out.append(_LayerRetrieval(
                seq=to(seq), sum_rows=to(sum_rows[l, seq]), n_chunks=to(n_chunks[l, seq]),
                host_pages=to(host_pages[l, seq]), top_k=to(top_k[l, seq]), k_max=k,
                slot_first=to(bufs[:, slot_col.clamp(max=max(bufs.shape[1] - 1, 0))]),
                has_slot=to(slot_col[None] < blen[:, None]),
                row_seq=to(row_seq), row_slot=to(row_col // c), row_off=to(row_col % c),
                row_dst=to(bufs[row_seq, row_col]), row_n_host=to(n_host[l, seq][row_seq])))
        return out
