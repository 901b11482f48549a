"""The per-batch decode plan: built once per forward batch, read by every layer, one attention call per layer.

Every request of the batch (compressed or not) becomes ``H`` flattened sequences, one per KV head, with the
GQA group as query heads (``N = B * H``). Each sequence's rows of the pool view (``(slots * H, D)``, row
``slot * H + h``) are three column blocks of one padded index matrix:

- *kept*: the head's kept prompt tokens (static heads: the text-prior pick; dynamic heads: text, sink and
  window); empty for uncompressed requests;
- *buffer*: a dynamic head's retrieval buffer, refilled each step (or every ``retrieval_interval`` steps)
  with the chunks its current query scores highest; only chunks it does not hold yet are copied from the
  host tier;
- *tail*: the tokens after the compressed prompt, read through SGLang's ``req_to_token`` (generated
  tokens; for an uncompressed request, all of its tokens).

Host work (``.tolist()``, region look-ups, padding) happens in :meth:`DecodePlanner.build`. The per-layer
path (:meth:`DecodePlan.attend`) is fixed-shape tensor work only: batched chunk scoring and top-k over the
layer's retrieving heads, one copy of the selected rows from the host tier into the buffers (``copy_rows``),
one ``row_decode`` call. Retrieval runs over the batch's dynamic heads only, and a layer where the batch has
none skips it (most layers at budget 0.1; its cost is per-op overhead, on a CPU and under eager launches on a
GPU, more than arithmetic). The plan's kept/buffer tables depend only on which requests are in the batch;
:class:`DecodePlanner` reuses them while the batch composition and the set of regions are unchanged, so a
steady decode step only rebuilds the tail block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.chunk_select import score_chunks_rows, select_chunks
from ..kernels.row_copy import copy_rows
from ..kernels.row_decode import row_decode
from .host_tier import HostTier
from .regions import Regions


@dataclass
class _LayerRetrieval:
    """One layer's sequences that retrieve chunks (dynamic heads of compressed requests), ``Nd`` of them, so that
    scoring, top-k and the buffer update run over them only; a layer without any has no such object and skips
    retrieval. The buffer rows are also listed flat (``M`` = the layer's buffer rows), with what every step's
    update needs of each precomputed."""

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
    """The composition-dependent part of a plan, ``(L, N, ·)`` over the batch's flattened sequences."""

    key: tuple
    kept_rows: torch.Tensor  # (L, N, P)
    kept_valid: torch.Tensor  # (L, N, P) bool
    buf_rows: torch.Tensor  # (L, N, R)
    buf_len: torch.Tensor  # (L, N)
    retrieval: list[_LayerRetrieval | None]  # per layer
    tail_start: torch.Tensor  # (B,) first position read through req_to_token
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
    """One decode forward batch's attention metadata. See the module docstring."""

    def __init__(self, tables: _Tables, tail_rows: torch.Tensor, tail_valid: torch.Tensor, refresh: torch.Tensor,
                 fresh: torch.Tensor, num_kv_heads: int, chunk: int, score_scale: float) -> None:
        self.t = tables
        self.tail_rows, self.tail_valid = tail_rows, tail_valid  # (N, G)
        self.refresh = refresh  # (N,) bool: sequences whose dynamic heads re-select chunks this step
        self.fresh = fresh  # (N,) bool: first step on a region; its buffer rows hold nothing of it yet
        self.h, self.chunk, self.score_scale = num_kv_heads, chunk, score_scale

    def attend(self, layer_id: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
               buffers: RetrievalBuffers, host: HostTier, scaling: float) -> torch.Tensor:
        """Decode attention of one layer for the whole batch.

        Args:
            q: ``(B, Hq * D)`` this step's queries.
            k_buffer, v_buffer: ``(slots, H, D)`` the layer's pool buffers (this step's KV already written).
            buffers: what the retrieval buffers hold (updated in place by this layer's retrieval).
        Returns: ``(B, Hq * D)``.
        """
        t = self.t
        d = k_buffer.shape[-1]
        k_rows, v_rows = k_buffer.view(-1, d), v_buffer.view(-1, d)
        qg = q.view(q.shape[0] * self.h, -1, d)  # (N, group, D): query head j belongs to KV head j // group
        if t.retrieval[layer_id] is not None:
            self._retrieve(layer_id, t.retrieval[layer_id], qg, k_rows, v_rows, buffers, host)
        buf = t.buf_rows[layer_id]
        buf_valid = (buffers.src[layer_id][buf] >= 0) & (torch.arange(buf.shape[1], device=buf.device)[None] < t.buf_len[layer_id][:, None])
        idx = torch.cat([t.kept_rows[layer_id], buf, self.tail_rows], dim=1)
        valid = torch.cat([t.kept_valid[layer_id], buf_valid, self.tail_valid], dim=1)
        return row_decode(qg, k_rows, v_rows, idx, valid, scaling).view(q.shape)

    def _retrieve(self, layer_id: int, r: _LayerRetrieval, qg: torch.Tensor, k_rows: torch.Tensor,
                  v_rows: torch.Tensor, buffers: RetrievalBuffers, host: HostTier) -> None:
        """Score the layer's retrieving heads' chunks and bring the top-k into their buffers, copying only the
        chunks not already there (fixed shapes, no host sync).

        A buffer is ``k_max`` slots of ``chunk`` rows; a slot's first row says (``buffers.src``) which chunk it holds.
        Selected chunks already resident keep their slot; the others are copied from the host tier into the
        slots whose chunk was dropped, the j-th missing chunk into the j-th free slot.
        """
        c, k = self.chunk, r.k_max
        n, dev = r.seq.shape[0], qg.device
        refresh, fresh = self.refresh[r.seq], self.fresh[r.seq]
        row_src = buffers.src[layer_id]
        scores = score_chunks_rows(qg[r.seq], k_rows, v_rows, r.sum_rows, r.n_chunks, self.score_scale)
        ids, ok = select_chunks(scores, r.top_k * refresh, k)  # (Nd, K)
        pages = r.host_pages
        # Ascending chunk order: when every chunk is taken (the only case where a buffer is shorter than
        # k_max * chunk), a fresh buffer puts chunk i in slot i, so the short last chunk ends at the buffer's end.
        big = pages.shape[1]
        ids = torch.where(ok, ids, big).sort(dim=1).values
        ok = ids < big
        ids = ids.clamp(max=big - 1)
        want = torch.where(ok, pages.gather(1, ids) * c, -2)  # first host row of each selected chunk
        held = torch.where(r.has_slot & ~fresh[:, None], row_src[r.slot_first].long(), -1)
        match = (want[:, :, None] == held[:, None, :]) & (held >= 0)[:, None, :]  # (Nd, selected, slot)
        kept = match.any(1)
        need = ok & ~match.any(2)
        free_first = torch.sort((~(r.has_slot & ~kept)).to(torch.uint8), dim=1, stable=True).indices
        target = free_first.gather(1, (need.cumsum(1) - 1).clamp(min=0))
        fill = torch.full((n, k + 1), -1, dtype=torch.long, device=dev)  # per slot: the selected entry loaded
        fill.scatter_(1, torch.where(need, target, k), torch.arange(k, device=dev).expand(n, k).contiguous())
        # One entry per buffer row: no two entries write the same pool row.
        seq, slot, dst = r.row_seq, r.row_slot, r.row_dst
        entry = fill[seq, slot]
        write = refresh[seq]
        load = write & (entry >= 0)
        chunk_id = ids[seq, entry.clamp(min=0)]
        load_ok = load & (chunk_id * c + r.row_off < r.row_n_host)
        src = torch.where(load_ok, pages[seq, chunk_id] * c + r.row_off, 0)
        dst_ok = torch.where(load_ok, dst, 0)  # entries that copy nothing go to the pool's padding row 0
        d = k_rows.shape[1]
        copy_rows(host.k[layer_id].view(-1, d), src, k_rows, dst_ok)
        copy_rows(host.v[layer_id].view(-1, d), src, v_rows, dst_ok)
        # A loaded row records its source; a slot whose chunk was dropped and not refilled is emptied.
        stays = write & kept[seq, slot]
        buffers.counts += torch.stack([((stays & (row_src[dst] >= 0)) | load_ok).sum(), load_ok.sum()])
        changed = load | (write & ~stays)
        row_src.index_copy_(0, torch.where(changed, dst, 0), torch.where(load_ok, src, -1).to(row_src.dtype))
        row_src[:1].fill_(-1)  # an in-place fill, not a host->device copy: CUDA-graph capturable


class DecodePlanner:
    """Builds :class:`DecodePlan` objects; caches the composition-dependent tables between steps."""

    def __init__(self, regions: Regions, num_layers: int, num_kv_heads: int, chunk: int, score_scale: float,
                 device: torch.device) -> None:
        self.regions, self.num_layers, self.h = regions, num_layers, num_kv_heads
        self.chunk, self.score_scale, self.device = chunk, score_scale, device
        self._tables: _Tables | None = None
        self.builds = 0  # plans built (one per decode forward batch); /server_info reports it
        self.table_builds = 0

    def build(self, rows: list[int], seq_lens: torch.Tensor, req_to_token: torch.Tensor) -> DecodePlan:
        """Plan of one decode batch (``rows``: the requests' ``req_to_token`` rows; ``seq_lens``: ``(B,)``)."""
        self.builds += 1
        key = (tuple(rows), self.regions.version)
        if self._tables is None or self._tables.key != key:
            self._tables = self._build_tables(key, rows)
            self.table_builds += 1
        t = self._tables
        dev = self.device
        seq = seq_lens.to(dev).long()
        tail_len = seq - t.tail_start
        g = int(tail_len.max()) if len(rows) else 0
        pos = (t.tail_start[:, None] + torch.arange(g, device=dev)[None]).clamp(max=req_to_token.shape[1] - 1)
        row_t = torch.tensor(rows, device=req_to_token.device, dtype=torch.long)
        slots = req_to_token[row_t[:, None], pos.to(req_to_token.device)].to(dev).long()  # (B, G)
        heads = torch.arange(self.h, device=dev)
        tail_rows = (slots[:, None, :] * self.h + heads[None, :, None]).reshape(-1, g)
        tail_valid = (torch.arange(g, device=dev)[None] < tail_len[:, None]).repeat_interleave(self.h, 0)
        step = seq - 1 - t.tail_start
        fresh = seq - 1 == t.decode_start
        refresh = ((step % t.interval == 0) | fresh).repeat_interleave(self.h)
        return DecodePlan(t, tail_rows, tail_valid, refresh, fresh.repeat_interleave(self.h), self.h, self.chunk,
                          self.score_scale)

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

        kept_len = stack("kept_len", None).to(dev)
        buf_rows, buf_len = stack("buf_rows", r), stack("buf_len", None)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)
        return _Tables(
            key=key,
            kept_rows=stack("kept_rows", p).to(dev),
            kept_valid=torch.arange(p, device=dev)[None, None] < kept_len[..., None],
            buf_rows=buf_rows.to(dev), buf_len=buf_len.to(dev),
            retrieval=self._retrieval(stack("top_k", None), buf_len, buf_rows, stack("sum_rows", c),
                                      stack("n_chunks", None), stack("host_pages", c), stack("n_host", None)),
            tail_start=as_t([0 if g is None else g.prompt_len for g in regions]),
            decode_start=as_t([0 if g is None else g.decode_start for g in regions]),
            interval=as_t([1 if g is None else g.retrieval_interval for g in regions]),
        )

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
            to = lambda x: x.to(dev)
            out.append(_LayerRetrieval(
                seq=to(seq), sum_rows=to(sum_rows[l, seq]), n_chunks=to(n_chunks[l, seq]),
                host_pages=to(host_pages[l, seq]), top_k=to(top_k[l, seq]), k_max=k,
                slot_first=to(bufs[:, slot_col.clamp(max=max(bufs.shape[1] - 1, 0))]),
                has_slot=to(slot_col[None] < blen[:, None]),
                row_seq=to(row_seq), row_slot=to(row_col // c), row_off=to(row_col % c),
                row_dst=to(bufs[row_seq, row_col]), row_n_host=to(n_host[l, seq][row_seq])))
        return out
