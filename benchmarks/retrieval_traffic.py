"""Host-tier traffic of dynamic heads on a real server: of the buffer rows decode attends to, how many were
copied from the host tier (a chunk selected again stays in its buffer slot) — the ratio to copying every
selected chunk each step, which is 1.0.

One SGLang server per row (CPU by default), SmolLM2-135M-Instruct with real weights, captioned-video prompts
sent together; the counts are the server's own (``/server_info``: ``retrieval_rows_selected``,
``retrieval_rows_copied``), first fills after compaction included.

    .venv/bin/python benchmarks/retrieval_traffic.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.models import cached_checkpoint
from sglang_hybridkv.testing.server import generate_all, sglang_server, wait_idle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="hybridkv@0.2,all_dynamic@0.1,all_dynamic@0.2",
                   help="comma list of policy@budget")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--per-kind", type=int, default=3, help="prompts per task kind (two kinds)")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = make_tasks(["sign_number", "two_needles"], args.per_kind, [args.frames], seed=9)
    gen = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    ckpt = cached_checkpoint("smollm2")
    rows = []
    for row in args.rows.split(","):
        policy, budget = row.split("@")
        t0 = time.time()
        flags = ["--kv-compression", policy, "--hybridkv-budget", budget]
        with sglang_server(ckpt, flags, device=args.device, max_total_tokens=16384) as url:
            out = generate_all(url, [{"text": t.text} for t in tasks], gen, together=True)
            st = wait_idle(url)
        selected, copied = st["retrieval_rows_selected"], st["retrieval_rows_copied"]
        rows.append({"policy": policy, "budget": float(budget), "requests": len(tasks),
                     "prompt_tokens": sum(o["meta_info"]["prompt_tokens"] for o in out),
                     "output_tokens": args.output_len, "dynamic_heads": sum(o["meta_info"]["hybridkv"]["dynamic_heads"]
                                                                            for o in out),
                     "retrieval_rows_selected": selected, "retrieval_rows_copied": copied,
                     "copied_vs_copy_all": round(copied / selected, 4) if selected else None,
                     "correct": sum(t.answer in o["text"] for t, o in zip(tasks, out)), "wall_s": round(time.time() - t0, 1)})
        print(f"  {row}: {rows[-1]['wall_s']} s", file=sys.stderr, flush=True)
    result = {"model": "SmolLM2-135M-Instruct", "device": args.device, "frames": args.frames, "rows": rows}
    print(f"\nRetrieval traffic, {len(tasks)} captioned-video prompts of {args.frames} frames decoded together, "
          f"{args.output_len} output tokens each")
    print(f"{'policy':>12} {'budget':>7} {'dyn heads':>10} {'rows selected':>14} {'rows copied':>12} {'copied/all':>11} "
          f"{'correct':>8}")
    for r in rows:
        ratio = "-" if r["copied_vs_copy_all"] is None else f"{r['copied_vs_copy_all']:.3f}"
        print(f"{r['policy']:>12} {r['budget']:>7.2f} {r['dynamic_heads']:>10} {r['retrieval_rows_selected']:>14} "
              f"{r['retrieval_rows_copied']:>12} {ratio:>11} {r['correct']:>5}/{r['requests']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
