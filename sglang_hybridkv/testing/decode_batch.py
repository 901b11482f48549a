"""A decode batch on SGLang's pool layout without a server: the state one scheduler holds (per-layer pool
buffers, ``req_to_token``, regions, host tier), filled the way compaction fills it. Shared by the decode-plan
tests and ``benchmarks/kernels.py`` so that both measure the backend's own decode function."""

from __future__ import annotations

import torch

from ..config import HybridKVConfig
from ..core.cache import CompressedLayer
from ..core.compress import plan_layer, prompt_media_mask
from ..core.policies import make_policy
from ..runtime import pool_region
from ..runtime.decode_plan import DecodePlanner, RetrievalBuffers
from ..runtime.host_tier import HostTier
from ..runtime.regions import Region, Regions


class PoolBatch:
    """Pool buffers ``(slots, H, D)`` per layer, ``req_to_token``, free slots, regions and a planner."""

    def __init__(self, num_layers: int, h: int, d: int, slots: int, rows: int = 64, ctx: int = 1 << 17,
                 chunk: int = 16, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 7,
                 split: int | None = None) -> None:
        self.num_layers, self.h, self.d, self.dtype, self.device = num_layers, h, d, dtype, torch.device(device)
        self.k = [torch.zeros(slots, h, d, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(slots, h, d, dtype=dtype, device=device) for _ in range(num_layers)]
        self.req_to_token = torch.zeros(rows, ctx, dtype=torch.int32, device=device)
        self.free = torch.randperm(slots - 1, generator=torch.Generator().manual_seed(seed)) + 1  # never slot 0
        self.freed: list[torch.Tensor] = []
        self.host = HostTier(num_layers, chunk, d, dtype, device=device)
        self.regions = Regions(self.freed.append, self.host, slots)
        self.buffers = RetrievalBuffers(num_layers, slots * h, device)
        self.planner = DecodePlanner(self.regions, num_layers, h, chunk, 0.25, self.device, split)

    def alloc(self, n: int) -> torch.Tensor:
        if n > self.free.numel():
            raise RuntimeError(f"pool full: {n} slots asked, {self.free.numel()} free")
        out, self.free = self.free[:n], self.free[n:]
        return out.to(self.device)

    def add_uncompressed(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """A request that keeps its whole prompt (``(H, L, D)`` per layer) in ordinary slots."""
        n = keys[0].shape[1]
        slots = self.alloc(n)
        for l in range(self.num_layers):
            self.k[l][slots] = keys[l].transpose(0, 1).to(self.device, self.dtype)
            self.v[l][slots] = values[l].transpose(0, 1).to(self.device, self.dtype)
        self.req_to_token[row, :n] = slots.int()

    def add_compressed(self, row: int, cfg: HybridKVConfig, keys: list[torch.Tensor], values: list[torch.Tensor],
                       q_window: list[torch.Tensor], scale: float) -> dict[int, CompressedLayer]:
        """Compress a prompt (per layer ``(H, L, D)`` KV, ``(Hq, w, D)`` window queries) into the pool as
        compaction does; returns the compressed layers (for a reference decode)."""
        n = keys[0].shape[1]
        policy, mask = make_policy(cfg), prompt_media_mask(n, cfg.window, None)
        layers = {}
        for l in range(self.num_layers):
            plan = plan_layer(policy, q_window[l], keys[l], mask, l, scale)
            layers[l] = CompressedLayer(plan, keys[l], values[l])
        slots = self.alloc(pool_region.slots_needed(layers))
        pages = self.host.alloc(pool_region.host_pages_needed(layers))
        tables = pool_region.layout(layers, slots, pages)
        for l, cl in layers.items():
            pool_region.write(self.k[l], self.v[l], cl, tables, l)
            if cl.dyn_heads.numel() and cl.k_host.shape[1]:
                self.host.write(l, pages, cl.k_host, cl.v_host)
        self.regions.add(row, Region(str(row), n, n, cfg.retrieval_interval, slots, pages, 0, tables,
                                     int(pages.numel()) * self.host.page_bytes))
        return layers

    def device_rows(self, rows: list[int], lens: torch.Tensor) -> int:
        """Device rows (one token of one head) the batch's requests hold: region slots, or all their tokens;
        plus host-tier rows when the tier had to live on the device."""
        total = 0
        for r, n in zip(rows, lens.tolist()):
            region = self.regions.get(r)
            total += self.h * (n if region is None else int(region.slots.numel()) + n - region.prompt_len)
            if region is not None and self.host.on_device:
                total += int(region.pages.numel()) * self.host.page
        return total
