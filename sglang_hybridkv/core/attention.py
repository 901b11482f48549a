"""Decode attention over a :class:`CompressedLayer` (the plain torch reference of the decode path).

Each KV head attends over its own key set: its kept prompt tokens, for dynamic heads the chunks retrieved
for the current query, and the decoded tokens. ``T >= 1`` new tokens may come in one call (teacher forcing);
they attend causally among themselves and each selects its own chunks, exactly as ``T`` single steps would.
"""

from __future__ import annotations

import torch

from .cache import CompressedLayer
from .chunks import chunk_tokens, score_chunks, top_chunks


def select_for_steps(layer: CompressedLayer, q: torch.Tensor, interval: int, scale: float) -> torch.Tensor:
    """Chunk ids per new token, honouring the retrieval interval.

    Args:
        q: ``(T, H_d, group, D)`` queries of the dynamic heads.
    Returns: ``(T, H_d, k)``; step ``s`` uses the selection made at step ``s - s % interval``.
    """
    t = q.shape[0]
    fresh = top_chunks(score_chunks(q, layer.kmin, layer.kmax, scale), layer.top_k)  # (T, H_d, k)
    steps = torch.arange(layer.steps, layer.steps + t)
    anchor = steps - steps % interval
    out = fresh[(anchor - layer.steps).clamp(min=0)]
    old = anchor < layer.steps
    if bool(old.any()):
        out[old] = layer.selection
    last = int(anchor[-1] - layer.steps)
    layer.selection = out[-1] if last < 0 else fresh[last]
    layer.steps += t
    return out


def decode_attention(layer: CompressedLayer, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     scaling: float, retrieval_interval: int = 1, chunk_score_scale: float = 0.25) -> torch.Tensor:
    """Attention of ``T`` new tokens over the compressed layer; appends their KV first.

    Args:
        q: ``(T, Hq, D)`` queries; ``Hq`` a multiple of the layer's KV heads ``H``.
        k_new, v_new: ``(T, H, D)`` the new tokens' keys and values.
    Returns: ``(T, Hq, D)`` in ``q``'s dtype.
    """
    t, hq, d = q.shape
    h = layer.num_heads
    group = hq // h
    layer.append(k_new, v_new)
    qg = q.float().view(t, h, group, d)
    neg = float("-inf")

    # Kept prompt tokens.
    s_dev = torch.einsum("thgd,hpd->thgp", qg, layer.k_dev.float()) * scaling
    valid = torch.arange(layer.k_dev.shape[1], device=q.device)[None] < layer.dev_len[:, None]
    s_dev.masked_fill_(~valid[None, :, None], neg)
    parts_s, parts_v = [s_dev], [layer.v_dev.float()[None].expand(t, -1, -1, -1)]

    # Retrieved chunks of dynamic heads (static heads see nothing here).
    n_host = layer.k_host.shape[1]
    if layer.dyn_heads.numel() and n_host and layer.top_k:
        dyn = layer.dyn_heads
        ids = select_for_steps(layer, qg[:, dyn], retrieval_interval, chunk_score_scale)
        tok, ok = chunk_tokens(ids, layer.chunk_size, n_host)  # (T, H_d, k*c)
        host_dev = layer.k_host.device
        gidx = tok.to(host_dev)[..., None].expand(-1, -1, -1, d)
        k_ret = layer.k_host[None].expand(t, -1, -1, -1).gather(2, gidx).to(q.device).float()
        v_ret = layer.v_host[None].expand(t, -1, -1, -1).gather(2, gidx).to(q.device).float()
        s_ret = torch.full((t, h, group, tok.shape[-1]), neg, device=q.device)
        s_ret[:, dyn] = torch.einsum("thgd,thkd->thgk", qg[:, dyn], k_ret) * scaling
        s_ret[:, dyn] = s_ret[:, dyn].masked_fill(~ok[:, :, None], neg)
        v_all = torch.zeros(t, h, tok.shape[-1], d, device=q.device)
        v_all[:, dyn] = v_ret
        parts_s.append(s_ret)
        parts_v.append(v_all)

    # Decoded tokens, causal among the new ones.
    g = layer.k_gen.shape[1]
    s_gen = torch.einsum("thgd,hjd->thgj", qg, layer.k_gen.float()) * scaling
    seen = torch.arange(g, device=q.device)[None] <= (g - t + torch.arange(t, device=q.device))[:, None]
    s_gen.masked_fill_(~seen[:, None, None], neg)
    parts_s.append(s_gen)
    parts_v.append(layer.v_gen.float()[None].expand(t, -1, -1, -1))

    p = torch.softmax(torch.cat(parts_s, dim=-1), dim=-1)  # (T, H, G, K)
    v = torch.cat(parts_v, dim=2)  # (T, H, K, D)
    out = torch.einsum("thgk,thkd->thgd", p, v)
    return out.reshape(t, hq, d).to(q.dtype)
