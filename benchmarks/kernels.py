"""Decode step of the backend's own batched path: uncompressed requests vs each compression policy, same run.

Measures exactly what ``runtime/backend.py`` runs per decode step, on SGLang's pool layout
(``testing.decode_batch.PoolBatch``): ``DecodePlanner.build`` once per step, then per layer
``DecodePlan.attend`` (batched chunk scoring + top-k, the copy of the selected chunks from the host tier
into the retrieval buffers, one ``row_decode`` call over flattened (request, KV head) sequences). The full
row is the same function over uncompressed requests (every head reads every token), i.e. what the backend
does for a request that is not compressed. Shape of Qwen2.5-VL-7B (28 query heads over 4 KV heads, head
size 128, group 7); ``tokens`` media tokens plus 64 text tokens per request; 8 generated tokens so far.

Static-head fraction per policy: snapkv/all_static 1.0, all_dynamic 0.0, hybridkv ``--static-fraction``
(default 0.5, through a head profile: the paper does not publish the fraction).

    .venv/bin/python benchmarks/kernels.py --device cpu --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.testing.decode_batch import PoolBatch

HQ, HKV, D, TEXT, GEN, LAYERS = 28, 4, 128, 64, 8, 2
POLICIES = ["snapkv", "hybridkv", "all_static", "all_dynamic"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="4k tokens, batch 1 and 8 (within 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--static-fraction", type=float, default=0.5, help="hybridkv's share of static heads")
    p.add_argument("--repeat", type=int, default=None)
    a = p.parse_args(argv)
    a.tokens = a.tokens or ([4096] if a.quick else [4096, 16384])
    a.batch = a.batch or ([1, 8] if a.quick else [1, 16])
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


def _profile(fraction: float, path: str) -> str:
    """A head profile marking the first ``fraction`` of each layer's KV heads static."""
    static = [[h < round(fraction * HKV) for h in range(HKV)] for _ in range(LAYERS)]
    with open(path, "w") as f:
        json.dump({"static": static}, f)
    return path


def build(batch: int, tokens: int, cfg: HybridKVConfig | None, dtype, dev: str) -> tuple[PoolBatch, list, torch.Tensor]:
    """A pool holding ``batch`` requests of ``tokens + TEXT`` prompt tokens and GEN generated tokens."""
    n = tokens + TEXT
    regions_rows = batch * (n if cfg is None else n // 3) + batch * (GEN + 1) + 64
    pool = PoolBatch(LAYERS, HKV, D, regions_rows + 1, rows=batch + 1, ctx=n + GEN + 2, dtype=dtype, device=dev)
    g = torch.Generator().manual_seed(0)
    rows = list(range(1, batch + 1))
    for r in rows:
        keys = [torch.randn(HKV, n, D, generator=g).to(dtype) for _ in range(LAYERS)]
        values = [torch.randn(HKV, n, D, generator=g).to(dtype) for _ in range(LAYERS)]
        if cfg is None:
            pool.add_uncompressed(r, keys, values)
        else:
            q_win = [torch.randn(HQ, cfg.window, D, generator=g).to(dtype) for _ in range(LAYERS)]
            pool.add_compressed(r, cfg, [k.to(dev) for k in keys], [v.to(dev) for v in values],
                                [q.to(dev) for q in q_win], D ** -0.5)
        gen = pool.alloc(GEN + 1)
        pool.req_to_token[r, n: n + GEN + 1] = gen.int()
        for l in range(LAYERS):
            pool.k[l][gen] = torch.randn(GEN + 1, HKV, D, generator=g).to(dev, dtype)
            pool.v[l][gen] = torch.randn(GEN + 1, HKV, D, generator=g).to(dev, dtype)
    return pool, rows, torch.full((batch,), n + GEN + 1, dtype=torch.long)


def step_fn(pool: PoolBatch, rows: list[int], lens: torch.Tensor, dtype, dev: str):
    """One decode step over every layer: plan once, attend per layer (what the backend's forward does)."""
    q = torch.randn(len(rows), HQ * D, dtype=dtype, device=dev)

    def step():
        plan = pool.planner.build(rows, lens, pool.req_to_token)
        for l in range(LAYERS):
            plan.attend(l, q, pool.k[l], pool.v[l], pool.row_valid[l], pool.host, D ** -0.5)

    return step


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        profile = _profile(args.static_fraction, os.path.join(tmp, "profile.json"))
        for tokens in args.tokens:
            for batch in args.batch:
                pool, rows, lens = build(batch, tokens, None, dtype, dev)
                full_ms = timed(step_fn(pool, rows, lens, dtype, dev), args.repeat, dev) / LAYERS
                full_rows = pool.device_rows(rows, lens)
                del pool
                for budget in args.budgets:
                    for policy in args.policies:
                        frac = {"snapkv": 1.0, "all_static": 1.0, "all_dynamic": 0.0}.get(policy, args.static_fraction)
                        cfg = HybridKVConfig(policy=policy, budget=budget,
                                             head_profile=profile if policy == "hybridkv" else None)
                        pool, rows, lens = build(batch, tokens, cfg, dtype, dev)
                        ms = timed(step_fn(pool, rows, lens, dtype, dev), args.repeat, dev) / LAYERS
                        row = {"tokens": tokens, "batch": batch, "budget": budget, "policy": policy,
                               "full_ms": full_ms, "compressed_ms": ms, "speedup": full_ms / ms,
                               "static_fraction": frac, "device_rows_ratio": full_rows / pool.device_rows(rows, lens)}
                        rows_out.append(row)
                        print(f"tokens {tokens:>6} batch {batch:>2} budget {budget:<4} {policy:>11}: full "
                              f"{full_ms:8.3f} ms  compressed {ms:8.3f} ms  speedup {row['speedup']:5.2f}x",
                              file=sys.stderr, flush=True)
                        del pool
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)"
    path = "triton" if dev == "cuda" else "torch"
    out = {"device": device_name, "dtype": str(dtype).replace("torch.", ""), "path": path,
           "function": "runtime.decode_plan: DecodePlanner.build + DecodePlan.attend per layer (ms per layer)",
           "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "text_tokens": TEXT, "generated": GEN},
           "rows": rows_out}
    print(f"\nBatched decode step per layer, {out['device']} ({path} path, {out['dtype']})")
    print(f"{'tokens':>7} {'batch':>5} {'budget':>6} {'policy':>11} {'full ms':>9} {'compr. ms':>10} {'speedup':>8} "
          f"{'rows ratio':>10}")
    for r in rows_out:
        print(f"{r['tokens']:>7} {r['batch']:>5} {r['budget']:>6.2f} {r['policy']:>11} {r['full_ms']:>9.3f} "
              f"{r['compressed_ms']:>10.3f} {r['speedup']:>7.2f}x {r['device_rows_ratio']:>9.1f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
