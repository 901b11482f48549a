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

Beside the full row, ``dense_ms`` is a stock dense decode of the same batch (``scaled_dot_product_attention``
with GQA over contiguous ``(B, H, L, D)`` KV), i.e. what an engine without a pool indirection runs. On CUDA,
``--graph`` also captures one whole step's attention (every layer, retrieval copy included; the plan is built
outside the graph, as a server's replay does) in a CUDA graph and times its replay (``*_graph_ms``), and
``plan_ms`` is the host-side plan build of a steady step.

    .venv/bin/python benchmarks/kernels.py --device cpu --quick --json out.json
    python3 benchmarks/kernels.py --device cuda --graph --json benchmarks/results/kernels-h200.json
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
import torch.nn.functional as F

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
    p.add_argument("--graph", action="store_true", help="CUDA only: also time the step replayed as a CUDA graph")
    p.add_argument("--mixed-budget", type=float, default=0.1,
                   help="budget of the mixed_long case (7 compressed + 1 uncompressed of 4x their length)")
    p.add_argument("--profile", action="store_true", help="print the profiler's top operators of each policy's "
                                                          "step at the largest size")
    a = p.parse_args(argv)
    a.tokens = a.tokens or ([4096] if a.quick else [4096, 16384])
    a.batch = a.batch or ([1, 8] if a.quick else [1, 16])
    a.repeat = a.repeat or (5 if a.quick else 10)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if a.graph and a.device != "cuda":
        raise SystemExit("--graph needs --device cuda")
    return a


def timed(fn, repeat: int, device: str) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` runs after one warm-up (wall clock, device synchronised)."""
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


def graph_timed(fn, repeat: int) -> float:
    """Median milliseconds of one replay of ``fn`` captured as a CUDA graph (warmed up outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # Triton compiles and autotunes here, not inside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def _profile(fraction: float, path: str) -> str:
    """A head profile marking the first ``fraction`` of each layer's KV heads static."""
    static = [[h < round(fraction * HKV) for h in range(HKV)] for _ in range(LAYERS)]
    with open(path, "w") as f:
        json.dump({"static": static}, f)
    return path


def build_pool(specs: list[tuple[HybridKVConfig | None, int]], dtype, dev: str) -> tuple[PoolBatch, list, torch.Tensor]:
    """A pool holding one request per ``(cfg, prompt tokens)`` of ``specs`` (kept whole where ``cfg`` is None,
    else compressed with it), each with GEN + 1 tokens after its prompt. Returns the pool, the requests' rows and
    their lengths."""
    slots = sum((n if cfg is None else n // 3) + GEN + 1 for cfg, n in specs) + 64
    ctx = max(n for _, n in specs) + GEN + 2
    pool = PoolBatch(LAYERS, HKV, D, slots + 1, rows=len(specs) + 1, ctx=ctx, dtype=dtype, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)  # on the device: host randn dominates a CUDA run otherwise
    rand = lambda *shape: torch.randn(*shape, generator=g, device=dev).to(dtype)
    for r, (cfg, n) in enumerate(specs, start=1):
        keys = [rand(HKV, n, D) for _ in range(LAYERS)]
        values = [rand(HKV, n, D) for _ in range(LAYERS)]
        if cfg is None:
            pool.add_uncompressed(r, keys, values)
        else:
            pool.add_compressed(r, cfg, keys, values, [rand(HQ, cfg.window, D) for _ in range(LAYERS)], D ** -0.5)
        gen = pool.alloc(GEN + 1)
        pool.req_to_token[r, n: n + GEN + 1] = gen.int()
        for l in range(LAYERS):
            pool.k[l][gen] = rand(GEN + 1, HKV, D)
            pool.v[l][gen] = rand(GEN + 1, HKV, D)
    return pool, list(range(1, len(specs) + 1)), torch.tensor([n + GEN + 1 for _, n in specs])


def build(batch: int, tokens: int, cfg: HybridKVConfig | None, dtype, dev: str) -> tuple[PoolBatch, list, torch.Tensor]:
    """A pool holding ``batch`` requests of ``tokens + TEXT`` prompt tokens and GEN generated tokens."""
    return build_pool([(cfg, tokens + TEXT)] * batch, dtype, dev)


def mixed_long_row(tokens: int, budget: float, profile: str, dtype, dev: str, repeat: int) -> dict:
    """The mixed case: 7 requests compressed with hybridkv plus one uncompressed request 4x their length, in one
    batch, against each group alone (same pool, same run). Per-layer milliseconds."""
    cfg = HybridKVConfig(policy="hybridkv", budget=budget, head_profile=profile)
    n = tokens + TEXT
    pool, rows, lens = build_pool([(cfg, n)] * 7 + [(None, 4 * n)], dtype, dev)
    small, long = rows[:7], rows[7:]
    ms = lambda rows: timed(step_fn(pool, rows, lens[[r - 1 for r in rows]], dtype, dev), repeat, dev) / LAYERS
    row = {"case": "mixed_long", "tokens": tokens, "long_tokens": int(lens[-1]), "batch": len(small) + 1,
           "budget": budget, "policy": "hybridkv", "mixed_ms": ms(small + long), "long_alone_ms": ms(long),
           "compressed_alone_ms": ms(small)}
    row["mixed_over_sum"] = row["mixed_ms"] / (row["long_alone_ms"] + row["compressed_alone_ms"])
    return row


def step_fn(pool: PoolBatch, rows: list[int], lens: torch.Tensor, dtype, dev: str):
    """One decode step over every layer: plan once, attend per layer (what the backend's forward does)."""
    q = torch.randn(len(rows), HQ * D, dtype=dtype, device=dev)

    def step():
        attend_fn(pool, pool.planner.build(rows, lens, pool.req_to_token), q)()

    return step


def attend_fn(pool: PoolBatch, plan, q: torch.Tensor):
    """Every layer's attention of one step on a built plan (the part a decode CUDA graph replays)."""
    def attend():
        for l in range(LAYERS):
            plan.attend(l, q, pool.k[l], pool.v[l], pool.buffers, pool.host, D ** -0.5)

    return attend


def extra_timings(pool: PoolBatch, rows: list[int], lens: torch.Tensor, dtype, dev: str, repeat: int,
                  graph: bool) -> dict:
    """Plan build time of a steady step and, with ``graph``, the CUDA-graph replay time of its attention."""
    out = {"plan_ms": timed(lambda: pool.planner.build(rows, lens, pool.req_to_token), repeat, dev)}
    if graph:
        q = torch.randn(len(rows), HQ * D, dtype=dtype, device=dev)
        out["graph_ms"] = graph_timed(attend_fn(pool, pool.planner.build(rows, lens, pool.req_to_token), q),
                                      repeat) / LAYERS
    return out


def profile_step(step, label: str, dev: str) -> None:
    """Top operators of a few steps by self time on the device (or CPU), to stderr."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"--- profile {label} (3 steps)\n" + prof.key_averages().table(sort_by=key, row_limit=12),
          file=sys.stderr, flush=True)


def dense_ms(batch: int, tokens: int, dtype, dev: str, repeat: int) -> float:
    """Stock dense decode of the same batch: SDPA with GQA over contiguous KV, per layer."""
    n = tokens + TEXT + GEN + 1
    q = torch.randn(batch, HQ, 1, D, dtype=dtype, device=dev)
    k = torch.randn(batch, HKV, n, D, dtype=dtype, device=dev)
    v = torch.randn(batch, HKV, n, D, dtype=dtype, device=dev)
    return timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeat, dev)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rows_out = []
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)"
    path = "triton" if dev == "cuda" else "torch"
    out = {"device": device_name, "dtype": str(dtype).replace("torch.", ""), "path": path,
           "function": "runtime.decode_plan: DecodePlanner.build + DecodePlan.attend per layer (ms per layer)",
           "graph": args.graph, "torch": torch.__version__,
           "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "text_tokens": TEXT, "generated": GEN},
           "rows": rows_out}
    with tempfile.TemporaryDirectory() as tmp:
        profile = _profile(args.static_fraction, os.path.join(tmp, "profile.json"))
        for tokens in args.tokens:
            for batch in args.batch:
                pool, rows, lens = build(batch, tokens, None, dtype, dev)
                out["host_tier"] = ("pinned host memory, read in place" if pool.host.pinned else
                                    "device memory" if pool.host.on_device else "host memory")
                full_ms = timed(step_fn(pool, rows, lens, dtype, dev), args.repeat, dev) / LAYERS
                full_extra = extra_timings(pool, rows, lens, dtype, dev, args.repeat, args.graph)
                full_rows = pool.device_rows(rows, lens)
                dense = dense_ms(batch, tokens, dtype, dev, args.repeat)
                del pool
                for budget in args.budgets:
                    for policy in args.policies:
                        frac = {"snapkv": 1.0, "all_static": 1.0, "all_dynamic": 0.0}.get(policy, args.static_fraction)
                        cfg = HybridKVConfig(policy=policy, budget=budget,
                                             head_profile=profile if policy == "hybridkv" else None)
                        pool, rows, lens = build(batch, tokens, cfg, dtype, dev)
                        ms = timed(step_fn(pool, rows, lens, dtype, dev), args.repeat, dev) / LAYERS
                        extra = extra_timings(pool, rows, lens, dtype, dev, args.repeat, args.graph)
                        if args.profile and (tokens, batch) == (args.tokens[-1], args.batch[-1]):
                            profile_step(step_fn(pool, rows, lens, dtype, dev), f"{policy}@{budget}", dev)
                        row = {"tokens": tokens, "batch": batch, "budget": budget, "policy": policy,
                               "full_ms": full_ms, "compressed_ms": ms, "speedup": full_ms / ms,
                               "dense_ms": dense, "speedup_vs_dense": dense / ms,
                               "full_plan_ms": full_extra["plan_ms"], "plan_ms": extra["plan_ms"],
                               "static_fraction": frac, "device_rows_ratio": full_rows / pool.device_rows(rows, lens)}
                        if args.graph:
                            row.update(full_graph_ms=full_extra["graph_ms"], graph_ms=extra["graph_ms"],
                                       graph_speedup=full_extra["graph_ms"] / extra["graph_ms"],
                                       graph_speedup_vs_dense=dense / extra["graph_ms"])
                        rows_out.append(row)
                        print(f"tokens {tokens:>6} batch {batch:>2} budget {budget:<4} {policy:>11}: full "
                              f"{full_ms:8.3f} ms  compressed {ms:8.3f} ms  speedup {row['speedup']:5.2f}x",
                              file=sys.stderr, flush=True)
                        del pool
                        write_json(args.json, out)  # after every row: a run cut short keeps what it measured
            row = mixed_long_row(tokens, args.mixed_budget, profile, dtype, dev, args.repeat)
            rows_out.append(row)
            print(f"mixed_long tokens {tokens} budget {args.mixed_budget}: mixed {row['mixed_ms']:.3f} ms, long "
                  f"alone {row['long_alone_ms']:.3f} ms + compressed alone {row['compressed_alone_ms']:.3f} ms "
                  f"({row['mixed_over_sum']:.2f}x their sum)", file=sys.stderr, flush=True)
            write_json(args.json, out)
    print(f"\nBatched decode step per layer, {out['device']} ({path} path, {out['dtype']})")
    graph_head = f" {'full gr.':>9} {'compr. gr.':>10} {'gr. spd':>8}" if args.graph else ""
    print(f"{'tokens':>7} {'batch':>5} {'budget':>6} {'policy':>11} {'dense ms':>9} {'full ms':>9} {'compr. ms':>10} "
          f"{'speedup':>8} {'vs dense':>8} {'plan ms':>8}{graph_head} {'rows ratio':>10}")
    for r in (r for r in rows_out if "case" not in r):
        graph_cols = (f" {r['full_graph_ms']:>9.3f} {r['graph_ms']:>10.3f} {r['graph_speedup']:>7.2f}x"
                      if args.graph else "")
        print(f"{r['tokens']:>7} {r['batch']:>5} {r['budget']:>6.2f} {r['policy']:>11} {r['dense_ms']:>9.3f} "
              f"{r['full_ms']:>9.3f} {r['compressed_ms']:>10.3f} {r['speedup']:>7.2f}x {r['speedup_vs_dense']:>7.2f}x "
              f"{r['plan_ms']:>8.3f}{graph_cols} {r['device_rows_ratio']:>9.1f}x")
    mixed = [r for r in rows_out if r.get("case") == "mixed_long"]
    if mixed:
        print("\nMixed batch: 7 compressed (hybridkv) + 1 uncompressed of 4x their length, ms per layer")
        print(f"{'tokens':>7} {'long':>6} {'budget':>6} {'mixed':>9} {'long alone':>11} {'compr. alone':>13} "
              f"{'mixed/sum':>10}")
        for r in mixed:
            print(f"{r['tokens']:>7} {r['long_tokens']:>6} {r['budget']:>6.2f} {r['mixed_ms']:>9.3f} "
                  f"{r['long_alone_ms']:>11.3f} {r['compressed_alone_ms']:>13.3f} {r['mixed_over_sum']:>9.2f}x")
    return out


def write_json(path: str | None, out: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
