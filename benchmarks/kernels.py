"""Decode-attention step of one layer: full cache vs each compression policy, timed in the same run.

Shape of Qwen2.5-VL-7B (28 query heads over 4 KV heads, head size 128, group 7), ``tokens`` media tokens plus
64 text tokens per request. Full cache: one fused attention over the contiguous cache (SDPA on CPU; SGLang's
FlashInfer decode is the GPU baseline to add when a GPU is lent). Compressed: everything a decode step does
per layer — score the dynamic heads' chunks, pick top-k, fetch them from the host tier into the device buffer,
join them to the resident page lists, plan, and run the paged decode over flattened (request, KV head)
sequences. On CPU the torch path runs (``paged_decode_reference``), on CUDA the Triton kernels.

Static-head fraction per policy: snapkv/all_static 1.0, all_dynamic 0.0, hybridkv ``--static-fraction``
(default 0.5: the paper does not publish it; on SmolLM2 captions the classifier finds 0.11 at budget 0.1).

    .venv/bin/python benchmarks/kernels.py --device cpu --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from sglang_hybridkv.kernels.chunk_topk import score_chunks_batched, select_pages
from sglang_hybridkv.kernels.page_lists import fetch_pages, join_retrieved
from sglang_hybridkv.kernels.paged_decode import PagedDecodePlan, paged_decode

HQ, HKV, D, PAGE, TEXT = 28, 4, 128, 16, 64
POLICIES = ["snapkv", "hybridkv", "all_static", "all_dynamic"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="4k and 16k tokens only (within 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--static-fraction", type=float, default=0.5, help="hybridkv's share of static heads")
    p.add_argument("--repeat", type=int, default=None)
    a = p.parse_args(argv)
    a.tokens = a.tokens or ([4096, 16384] if a.quick else [4096, 16384, 65536])
    a.batch = a.batch or [1, 16]
    a.repeat = a.repeat or (5 if a.quick else 10)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return a


def timed(fn, repeat: int, device: str) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class CompressedStep:
    """A batch's compressed layer laid out as the runtime keeps it, and one decode step over it."""

    def __init__(self, batch: int, tokens: int, budget: float, static_fraction: float, dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        n_seq = batch * HKV
        n_static = round(static_fraction * HKV)
        self.static = torch.tensor([h < n_static for _ in range(batch) for h in range(HKV)])
        kept = math.floor(budget * tokens)
        n_chunks = tokens // PAGE  # full chunks in the host tier; the remainder stays resident
        remainder = tokens - n_chunks * PAGE
        self.top_k = max(1, math.floor(budget * tokens) // PAGE)
        lens = torch.where(self.static, kept + TEXT, TEXT + remainder)
        pages = (lens + PAGE - 1) // PAGE
        n_dyn = int((~self.static).sum())
        total_dev = int(pages.sum()) + n_dyn * self.top_k
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)
        self.k_pages, self.v_pages = rnd(total_dev, PAGE, D), rnd(total_dev, PAGE, D)
        self.indptr = torch.zeros(n_seq + 1, dtype=torch.int32)
        self.indptr[1:] = pages.cumsum(0)
        self.indices = torch.arange(int(pages.sum()), dtype=torch.int32)
        self.last = ((lens - 1) % PAGE + 1).to(torch.int32)
        self.dyn = (~self.static).nonzero().flatten().to(torch.int32)
        # Host tier: every dynamic head's full media chunks, and their summaries on the device.
        host_dev = "cpu"
        self.host_k = torch.randn(n_dyn * n_chunks, PAGE, D, generator=g).to(dtype).to(host_dev)
        self.host_v = torch.randn(n_dyn * n_chunks, PAGE, D, generator=g).to(dtype).to(host_dev)
        if device == "cuda":
            self.host_k, self.host_v = self.host_k.pin_memory(), self.host_v.pin_memory()
        self.kmin = self.host_k.amin(1).to(device)
        self.kmax = self.host_k.amax(1).to(device)
        self.sum_indptr = (torch.arange(n_dyn + 1) * n_chunks).to(torch.int32).to(device)
        self.chunk_pages = torch.arange(n_dyn * n_chunks, dtype=torch.int32).to(device)
        self.buffer_ids = (int(pages.sum()) + torch.arange(n_dyn * self.top_k)).view(n_dyn, self.top_k).to(device)
        self.q = rnd(n_seq, HQ // HKV, D)
        self.device = device
        self.indptr, self.indices, self.last = (x.to(device) for x in (self.indptr, self.indices, self.last))
        self.dyn = self.dyn.to(device)
        self.device_bytes = (int(pages.sum()) + n_dyn * self.top_k) * PAGE * D * 2 * self.k_pages.element_size()

    def __call__(self) -> torch.Tensor:
        indptr, indices = self.indptr, self.indices
        if self.dyn.numel():
            scores = score_chunks_batched(self.q[self.dyn.long()], self.kmin, self.kmax, self.sum_indptr, 0.25)
            host_pages, counts = select_pages(scores, self.top_k, self.sum_indptr, self.chunk_pages)
            fetch_pages(self.host_k, self.host_v, host_pages, self.k_pages, self.v_pages, self.buffer_ids)
            buf = torch.where(host_pages >= 0, self.buffer_ids.to(torch.int32), -1)
            indptr, indices = join_retrieved(indptr, indices, self.dyn, buf, counts)
        plan = PagedDecodePlan(indptr, self.last, PAGE, HQ // HKV, D)
        return paged_decode(plan, self.q, self.k_pages, self.v_pages, indices, D ** -0.5)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        for batch in args.batch:
            n = tokens + TEXT
            k = torch.randn(batch, HKV, n, D, dtype=dtype, device=dev)
            v = torch.randn(batch, HKV, n, D, dtype=dtype, device=dev)
            q = torch.randn(batch, HQ, 1, D, dtype=dtype, device=dev)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            full_ms = timed(sdpa, args.repeat, dev)
            full_bytes = k.numel() * k.element_size() * 2
            del k, v
            for budget in args.budgets:
                for policy in args.policies:
                    frac = {"snapkv": 1.0, "all_static": 1.0, "all_dynamic": 0.0}.get(policy, args.static_fraction)
                    step = CompressedStep(batch, tokens, budget, frac, dtype, dev)
                    ms = timed(step, args.repeat, dev)
                    row = {"tokens": tokens, "batch": batch, "budget": budget, "policy": policy,
                           "full_ms": full_ms, "compressed_ms": ms, "speedup": full_ms / ms,
                           "static_fraction": frac, "bytes_ratio": full_bytes / step.device_bytes}
                    rows.append(row)
                    print(f"tokens {tokens:>6} batch {batch:>2} budget {budget:<4} {policy:>11}: full {full_ms:8.3f} ms"
                          f"  compressed {ms:8.3f} ms  speedup {row['speedup']:5.2f}x", file=sys.stderr, flush=True)
                    del step
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)"
    out = {"device": device_name, "dtype": str(dtype).replace("torch.", ""), "shape": {"q_heads": HQ, "kv_heads": HKV,
           "head_dim": D, "page": PAGE, "text_tokens": TEXT}, "path": "triton" if dev == "cuda" else "torch",
           "rows": rows}
    print(f"\nDecode attention, one layer, {out['device']} ({out['path']} path, {out['dtype']})")
    print(f"{'tokens':>7} {'batch':>5} {'budget':>6} {'policy':>11} {'full ms':>9} {'compr. ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['batch']:>5} {r['budget']:>6.2f} {r['policy']:>11} {r['full_ms']:>9.3f} "
              f"{r['compressed_ms']:>10.3f} {r['speedup']:>7.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
