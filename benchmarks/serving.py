"""Serving under load at a fixed KV pool: admitted requests, throughput and latency, full cache vs compression.

Starts SGLang itself (CPU by default) with ``--max-total-tokens POOL``: one server without compression and one
with ``--kv-compression hybridkv``, whose rows pick policy and budget per request (``custom_params``), so every
compressed row runs on the same pool in the same process. Both servers run with the radix cache off (distinct
prompts share little, and a tree of evictable prompts would blur what the pool holds), so the pool's free slots
are the only variable, and with SGLang's overlap scheduler on, its default (``--disable-overlap`` turns it off
for both). Each row sends all its long
requests at once through a small async streaming client and reads from SGLang's own decode log how many
requests were running at once. Workloads: ``captions`` (captioned-video prompts, SmolLM2 with real weights) or
``images`` (videos as frames, each an image, on a tiny random Qwen2.5-VL: SGLang's multimodal path). Defaults
are decode-heavy (long outputs), where compressed decode matters.

The *oracle* row (``"oracle_pool": true``) runs ``none`` again on a pool big enough for as many requests at
once as the first compressed row reached: it separates what compression buys by admitting more requests
from what it buys per decode step at the same concurrency.

Latency columns: TPOT p50 is per request, (end-to-end - TTFT) / (output - 1), so it also counts the time a
request waits, after its first token, while SGLang prefills requests admitted after it (SGLang runs a prefill
batch whenever one fits; compressed requests enter in several waves because each prefill needs its whole
prompt in the pool until compaction). ITL p50 (median gap between streamed tokens) and ``step@peak`` (median
decode step at peak concurrency, from SGLang's log) measure the decode step itself.

    .venv/bin/python benchmarks/serving.py --quick --json out.json
    .venv/bin/python benchmarks/serving.py --quick --workload images --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

from sglang_hybridkv.testing.captioned_video import sign_number
from sglang_hybridkv.testing.frames import data_url, frame_png, vl_prompt
from sglang_hybridkv.testing.models import cached_checkpoint, kv_bytes_per_token
from sglang_hybridkv.testing.server import decode_running_counts, decode_step_times, server_log, sglang_server

LOG = ["--log-level", "info", "--decode-log-interval", "1"]
BASELINE = ["--disable-radix-cache"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="captions", choices=["captions", "images"])
    p.add_argument("--model-path", default=None,
                   help="default: SmolLM2-135M-Instruct (captions) or a tiny random Qwen2.5-VL (images), offline")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer rows and requests (within 8 minutes on 2 cores)")
    p.add_argument("--pool-tokens", type=int, default=None, help="--max-total-tokens of both servers")
    p.add_argument("--requests", type=int, default=None, help="requests per row, all sent at once")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per request: captions ~13 tokens each (default 96, --quick 80), images 64 tokens each (12)")
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--rows", default=None, help="comma list of policy@budget, e.g. none,snapkv@0.1,hybridkv@0.1")
    p.add_argument("--no-oracle", action="store_true", help="skip the big-pool none row")
    p.add_argument("--disable-overlap", action="store_true",
                   help="run every server with --disable-overlap-schedule (default: SGLang's overlap scheduler on)")
    p.add_argument("--cores", default=None,
                   help="CPU cores the servers' OpenMP threads are bound to (SGLANG_CPU_OMP_THREADS_BIND, e.g. '1' "
                        "to leave core 0 to other work); default: SGLang's own (all cores)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", default=None)
    a = p.parse_args(argv)
    # Full run: prompts of ~1,230 tokens, long enough that a compressed request (prompt/10 + output) takes >= 4x
    # fewer slots than a full one while still generating >= 160 tokens. Quick run: ~1,030-token prompts, a pool
    # of three full requests (prompt + 128 outputs) where twelve compressed ones fit with one more prefilling,
    # so that it ends within 8 minutes on 2 cores (96 frames took 8 min 7 s on a fast hour, 9 min 40 s on a slow
    # one; 64 frames 6 min 22 s, but the ~820-token prompts leave TPOT at 0.69x the oracle's, near the bar).
    quick = {"pool_tokens": 4096, "requests": 12, "frames": 80, "output_len": 128,
             "rows": "none,hybridkv@0.1"}
    full = {"pool_tokens": 8192, "requests": 32, "frames": 96, "output_len": 160,
            "rows": "none,hybridkv@0.1,hybridkv@0.2,snapkv@0.1"}
    if a.workload == "images":
        quick["frames"] = full["frames"] = 12
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.rows = [_parse_row(r) for r in a.rows.split(",")]
    return a


def _parse_row(spec: str) -> tuple[str, float]:
    policy, _, budget = spec.strip().partition("@")
    return policy, float(budget or 1.0)


async def _one(session, url: str, body: dict, params: dict) -> dict:
    """Stream one /generate request; returns TTFT, end-to-end time, output tokens and the final meta_info."""
    t0 = time.perf_counter()
    ttft, last, stamps = None, None, []
    async with session.post(url + "/generate", json={**body, "sampling_params": params, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            last = json.loads(line[5:])
            stamps.append(time.perf_counter() - t0)
            if ttft is None:
                ttft = stamps[0]
    e2e = time.perf_counter() - t0
    meta = last["meta_info"]
    return {"ttft": ttft, "e2e": e2e, "out": meta["completion_tokens"], "prompt": meta["prompt_tokens"],
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "hybridkv": meta.get("hybridkv")}


async def _burst(url: str, bodies: list[dict], params: dict) -> tuple[list[dict], float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(session, url, b, params) for b in bodies))
        return results, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run_row(url: str, policy: str, budget: float, bodies: list[dict], output_len: int, full_bytes_per_token: int,
            solo_ttft_none: float | None, pool_tokens: int) -> dict:
    params = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    if policy != "none":
        params["custom_params"] = {"hybridkv": {"policy": policy, "budget": budget}}
    # Prefill cost alone, no queueing: best of two (the first request after start-up pays lazy initialisation);
    # two output tokens, because a request that generates one token is not compressed.
    solo_params = {**params, "max_new_tokens": 2}
    solo = min((asyncio.run(_burst(url, bodies[:1], solo_params))[0] for _ in range(2)), key=lambda r: r[0]["ttft"])
    offset = len(server_log(url))
    results, wall = asyncio.run(_burst(url, bodies, params))
    time.sleep(1)
    running = decode_running_counts(url, offset)
    peak = max(running, default=0)
    steps = [s for n, s in decode_step_times(url, offset) if n == peak]
    tpot = [(r["e2e"] - r["ttft"]) / max(1, r["out"] - 1) for r in results]
    itl = [x for r in results for x in r["itl"]]
    if policy == "none":
        kv_dev = statistics.mean(r["prompt"] for r in results) * full_bytes_per_token
    else:
        kv_dev = statistics.mean(r["hybridkv"]["kv_bytes_device"] for r in results)
    return {"policy": policy, "budget": budget, "pool_tokens": pool_tokens, "oracle_pool": False,
            "requests": len(results), "peak_running": peak,
            "throughput_tok_s": sum(r["out"] for r in results) / wall, "wall_s": wall,
            "ttft_p50_s": _pct([r["ttft"] for r in results], 0.5), "ttft_p99_s": _pct([r["ttft"] for r in results], 0.99),
            "tpot_p50_s": _pct(tpot, 0.5), "tpot_p99_s": _pct(tpot, 0.99), "itl_p50_s": _pct(itl, 0.5),
            "decode_step_at_peak_s": _pct(steps, 0.5), "kv_bytes_device_per_req": kv_dev,
            "solo_ttft_s": solo[0]["ttft"], "prompt": max(r["prompt"] for r in results),
            "prefill_overhead": solo[0]["ttft"] / solo_ttft_none if solo_ttft_none else 1.0}


def make_requests(workload: str, n: int, frames: int, row: int) -> list[dict]:
    """``n`` request bodies. Images: distinct videos in every request and every row, so neither SGLang's vision
    embedding cache nor the radix cache carries work from one row to the next."""
    if workload == "images":
        return [{"text": vl_prompt("What happens in this video?", frames),
                 "image_data": [data_url(frame_png(100_000 * row + 100 * r + i)) for i in range(frames)]}
                for r in range(n)]
    rng = random.Random(0)
    return [{"text": sign_number(rng, frames).text} for _ in range(n)]


def print_table(pool: int, rows: list[dict]) -> None:
    print(f"\npool {pool} tokens (oracle row: its own pool), {rows[0]['requests']} concurrent requests per row")
    print(f"{'policy':>10} {'budget':>6} {'pool':>6} {'peak run':>8} {'tok/s':>7} {'TTFT p50':>8} {'p99':>7} "
          f"{'TPOT p50':>8} {'p99':>7} {'ITL p50':>7} {'step@peak':>9} {'KV dev/req':>12} {'prefill':>7}")
    for r in rows:
        print(f"{r['policy']:>10} {r['budget']:>6.2f} {r['pool_tokens']:>6d} {r['peak_running']:>8d} "
              f"{r['throughput_tok_s']:>7.1f} "
              f"{r['ttft_p50_s']:>8.2f} {r['ttft_p99_s']:>7.2f} {r['tpot_p50_s']:>8.3f} {r['tpot_p99_s']:>7.3f} "
              f"{r['itl_p50_s']:>7.3f} {r['decode_step_at_peak_s']:>9.3f} "
              f"{r['kv_bytes_device_per_req']:>12,.0f} {r['prefill_overhead']:>6.2f}x")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = next((r for r in rows if r["policy"] == "none"), None)
    for ax, key, label in ((axes[0], "peak_running", "peak running requests"),
                           (axes[1], "throughput_tok_s", "output tokens / s")):
        for policy in sorted({r["policy"] for r in rows} - {"none"}):
            pts = sorted((r["budget"], r[key]) for r in rows if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if base:
            ax.axhline(base[key], color="gray", linestyle="--", label="none (full cache)")
        ax.set_xlabel("budget")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Same KV pool, full cache vs compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model_path or cached_checkpoint("tiny-qwen2.5-vl" if args.workload == "images" else "smollm2")
    per_token = kv_bytes_per_token(model, 4 if args.device == "cpu" else 2)
    rows: list[dict] = []
    common = BASELINE + LOG + (["--disable-overlap-schedule"] if args.disable_overlap else [])
    groups = [("none", common, args.pool_tokens), ("hybridkv", ["--kv-compression", "hybridkv"] + common, args.pool_tokens)]
    t_start = time.time()
    while groups:
        server, extra, pool = groups.pop(0)
        wanted = [r for r in args.rows if (r[0] == "none") == (server == "none")] if server != "oracle" else [("none", 1.0)]
        if not wanted:
            continue
        env = {"SGLANG_CPU_OMP_THREADS_BIND": args.cores} if args.cores else None
        with sglang_server(model, extra_args=extra, device=args.device, max_total_tokens=pool, progress=True,
                           env=env) as url:
            for policy, budget in wanted:
                print(f"  [{server}: {policy} @ {budget}, pool {pool}] {args.requests} requests of {args.frames} "
                      f"frames ... ({time.time() - t_start:.0f}s elapsed)", file=sys.stderr, flush=True)
                solo_none = next((r["solo_ttft_s"] for r in rows if r["policy"] == "none"), None)
                bodies = make_requests(args.workload, args.requests, args.frames, row=len(rows))
                rows.append(run_row(url, policy, budget, bodies, args.output_len, per_token, solo_none, pool))
                rows[-1]["oracle_pool"] = server == "oracle"
                print(f"    peak running {rows[-1]['peak_running']}, {rows[-1]['throughput_tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
        compressed = [r for r in rows if r["policy"] != "none"]
        if server == "hybridkv" and compressed and not args.no_oracle:
            # As many at once as the first compressed row ran: each holds its whole prompt and output.
            need = compressed[0]["peak_running"] * (compressed[0]["prompt"] + args.output_len)
            groups.append(("oracle", common, int(need * 1.05) + 64))
    print_table(args.pool_tokens, rows)
    report = {"pool_tokens": args.pool_tokens, "device": args.device, "cores": args.cores or "all",
              "model": model, "workload": args.workload, "overlap_schedule": not args.disable_overlap,
              "frames": args.frames,
              "output_len": args.output_len, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return report


if __name__ == "__main__":
    main()
