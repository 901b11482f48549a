"""Soak: many requests against one compressing server with every switch on at once; at idle, nothing is held.

One SGLang server (tiny random Qwen2.5-VL on CPU, loopback) runs with the radix cache, ``--chunked-prefill-size
128``, SGLang's retraction drill (``SGLANG_TEST_RETRACT``) and its busy-time slot check
(``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``), a small host tier (``--hybridkv-host-tier-gb``, so that some
requests fall back to static heads) and a per-request override switch (``--hybridkv-request-overrides
policy,budget``). The clients send a seeded mix: text and image requests with per-request policies and budgets,
all behind one shared system prompt; multi-turn conversations (each turn repeats the previous ones: radix
hits); streaming clients that disconnect mid-answer; clients that give up during prefill; and bad requests
(values out of range, knobs no request may set, overrides the switch refuses). At idle it reads the server's
own counters (``/server_info``) and the processes' resident memory.

    .venv/bin/python benchmarks/soak.py --requests 1000 --json benchmarks/results/soak-cpu.json

Passes when ``completed + aborted + refused_4xx == requests`` (every request got the outcome its kind allows:
an answer of the asked length, a client-side abort, or a 4xx naming the problem), ``errors_5xx == 0``, nothing
is leaked (slots, host-tier bytes, radix locks) and SGLang's own leak checks stayed quiet; exits 1 otherwise.
It stops by itself: the load phase ends at ``--max-minutes`` (minus start-up and the idle check), unanswered
requests then count in no bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_hybridkv.testing.frames import data_url, frame_png, vl_prompt  # noqa: E402
from sglang_hybridkv.testing.models import cached_checkpoint  # noqa: E402
from sglang_hybridkv.testing.server import abandon_after, hybridkv_state, server_log, sglang_server  # noqa: E402

FIELDS = ("requests", "completed", "aborted", "refused_4xx", "errors_5xx", "leaked_slots", "leaked_host_bytes",
          "radix_locks", "rss_growth_mb", "host_tier_peak_bytes", "wall_s")
OVERRIDES = "policy,budget"  # the operator switch under test: theta and the others are refused per request
POLICIES = ("hybridkv", "hybridkv", "snapkv", "all_dynamic", "all_static", "full", "none")
BUDGETS = (0.05, 0.1, 0.2, 0.5, 1.0)
SYSTEM = ("You are a careful assistant for a city's traffic cameras. Answer briefly and name the frame you "
          "rely on. ") * 3
WORDS = ("red car parked near a tree while two people walk past the bakery on the corner and a dog sleeps "
         "under the bench by the fountain in the square at noon").split()
# (override, text the 400 must contain)
BAD = [({"budget": 1.5}, "budget=1.5"), ({"policy": "h2o"}, "policy='h2o'"), ({"budget": "low"}, "budget='low'"),
       ({"theta": 0.5}, "--hybridkv-request-overrides"), ({"chunk_size": 8}, "cannot be set per request")]
FRAMES = 4  # distinct images (64 tokens each on the tiny model), shared by image requests: radix hits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--pool-tokens", type=int, default=4096, help="--max-total-tokens (small: queueing, retraction)")
    p.add_argument("--host-tier-gb", type=float, default=0.002, help="small enough that the limit is reached")
    p.add_argument("--max-minutes", type=float, default=10.0, help="the whole run, server start-up included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default=None, help="default: the tiny random Qwen2.5-VL (written on first use)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    t0 = time.time()
    model = args.model_path or cached_checkpoint("tiny-qwen2.5-vl")
    extra = ["--kv-compression", "hybridkv", "--chunked-prefill-size", "128", "--hybridkv-host-tier-gb",
             str(args.host_tier_gb), "--hybridkv-request-overrides", OVERRIDES, "--log-level", "info"]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "11",
           "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
    with sglang_server(model, extra_args=extra, max_total_tokens=args.pool_tokens, env=env, progress=True) as url:
        plan = make_plan(args.requests, random.Random(args.seed))
        deadline = t0 + args.max_minutes * 60 - 75  # leave time for the idle check and the server's shutdown
        rss = RSSProbe(url)
        outcomes = asyncio.run(run_load(url, plan, args.concurrency, deadline, rss, random.Random(args.seed + 1)))
        st = idle_state(url)
        rss.sample("end")
        log = server_log(url)
    counts = {k: sum(1 for o in outcomes if o == k) for k in ("completed", "aborted", "refused_4xx", "errors_5xx")}
    n = sum(len(task) for task in plan)
    result = {"requests": n, **counts,
              "leaked_slots": st["staging_max_total_tokens"] - st["staging_available_tokens"]
              - st["radix_evictable_tokens"],
              "leaked_host_bytes": max(st["host_tier_bytes"], st["host_tier_pages_used"] * st["host_tier_page_bytes"]),
              "radix_locks": st["radix_protected_tokens"], "rss_growth_mb": rss.growth_mb(),
              "host_tier_peak_bytes": st["host_tier_bytes_peak"], "wall_s": round(time.time() - t0, 1)}
    unexpected = [o for o in outcomes if o not in counts]
    sglang_leak = "leak" in log.lower()
    _print_table(result, st, unexpected, sglang_leak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    ok = (counts["completed"] + counts["aborted"] + counts["refused_4xx"] == n and counts["errors_5xx"] == 0
          and result["leaked_slots"] == 0 and result["leaked_host_bytes"] == 0 and result["radix_locks"] == 0
          and not sglang_leak and result["host_tier_peak_bytes"] <= st["host_tier_limit_bytes"])
    return 0 if ok else 1


# ---- the request mix --------------------------------------------------------------------------------------
def make_plan(n: int, rng: random.Random) -> list[list[dict]]:
    """``n`` requests as a list of tasks; a task is one request or the turns of one conversation (sent in order).
    Each request: ``kind``, ``body`` (``/generate``), and for bad ones the text its 400 must contain."""
    tasks, count = [], 0
    while count < n:
        roll = rng.random()
        if roll < 0.15 and n - count >= 3:  # a conversation: three turns, each prompt repeating the ones before
            turns = [_request("turn", rng) for _ in range(3)]
            tasks.append(turns)
            count += 3
            continue
        kind = ("bad" if roll < 0.25 else "stream_disconnect" if roll < 0.35 else "abort_prefill" if roll < 0.45
                else "image" if roll < 0.65 else "text")
        tasks.append([_request(kind, rng)])
        count += 1
    return tasks


def _request(kind: str, rng: random.Random) -> dict:
    params = {"max_new_tokens": rng.choice([1, 2, 4, 8, 12, 16]), "temperature": 0, "ignore_eos": True}
    if kind in ("stream_disconnect", "abort_prefill"):
        params["max_new_tokens"] = rng.choice([16, 24])  # long enough to leave mid-answer
    override = {"policy": rng.choice(POLICIES), "budget": rng.choice(BUDGETS)}
    expect = None
    if kind == "bad":
        override, expect = rng.choice(BAD)
    params["custom_params"] = {"hybridkv": {k: v for k, v in override.items() if rng.random() < 0.9 or kind == "bad"}}
    # Mostly short questions (several fit one 128-token prefill chunk), a fifth long (prefilled over chunks).
    words = rng.randint(100, 300) if rng.random() < 0.2 else rng.randint(5, 50)
    question = "Question: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "?"
    if kind == "image":
        frames = rng.choice([1, 1, 2, FRAMES])
        body = {"text": vl_prompt(question, frames), "image_data": [IMAGES[i] for i in range(frames)]}
    elif kind == "turn":  # the conversation so far goes before it (run_load)
        body = {"text": f"User: {question}\nAssistant:"}
    else:
        body = {"text": SYSTEM + question}
    return {"kind": kind, "body": dict(body, sampling_params=params), "expect": expect}


IMAGES = [data_url(frame_png(i)) for i in range(FRAMES)]


# ---- clients ----------------------------------------------------------------------------------------------
async def run_load(url: str, plan: list[list[dict]], concurrency: int, deadline: float, rss: "RSSProbe",
                   rng: random.Random) -> list[str]:
    """Send every task (at most ``concurrency`` requests in flight); the outcome of each request, in plan order
    ("unanswered" for those the deadline cut off)."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    total = sum(len(t) for t in plan)
    done = {"n": 0}
    outcomes: list[list[str]] = [[] for _ in plan]

    async def one(session, req: dict) -> str:
        async with gate:
            out = await _send(session, url, req, rng)
        done["n"] += 1
        if done["n"] == max(1, total // 10):  # warm: caches, pools and allocators have settled
            rss.sample("warm")
        return out

    async def task(session, i: int, turns: list[dict]) -> None:
        history = SYSTEM  # a conversation's turns follow the shared system prompt
        for req in turns:
            if req["kind"] == "turn":
                req = dict(req, body=dict(req["body"], text=history + req["body"]["text"]))
            outcome = await one(session, req)
            outcomes[i].append(outcome if isinstance(outcome, str) else "completed")
            if not isinstance(outcome, str):  # an answered turn: the next one repeats it
                history = req["body"]["text"] + outcome["text"] + "\n"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        jobs = [asyncio.ensure_future(task(session, i, t)) for i, t in enumerate(plan)]
        finished, pending = await asyncio.wait(jobs, timeout=max(1.0, deadline - time.time()))
        for job in pending:
            job.cancel()
        for job in finished:
            job.result()  # a client-side bug must not pass silently
    flat = [o for per_task in outcomes for o in per_task]
    return flat + ["unanswered"] * (total - len(flat))


async def _send(session, url: str, req: dict, rng: random.Random):
    """One request; its outcome: "completed" (the answer dict for a conversation turn), "aborted",
    "refused_4xx", "errors_5xx", or a description of anything its kind does not allow."""
    kind, body, params = req["kind"], req["body"], req["body"]["sampling_params"]
    if kind == "bad":
        async with session.post(url + "/generate", json=body) as r:
            text = await r.text()
            if 400 <= r.status < 500 and req["expect"] in text:
                return "refused_4xx"
            return "errors_5xx" if r.status >= 500 else f"bad request answered {r.status}: {text[:200]}"
    if kind in ("stream_disconnect", "abort_prefill"):
        return await _abandon(session, url, body, kind, rng)
    async with session.post(url + "/generate", json=body) as r:
        text = await r.text()
        if r.status >= 500:
            return "errors_5xx"
        if r.status != 200:
            return f"{kind} request refused {r.status}: {text[:200]}"
        out = json.loads(text)
    if out["meta_info"]["completion_tokens"] != params["max_new_tokens"]:
        return f"{kind} request answered {out['meta_info']['completion_tokens']} of {params['max_new_tokens']} tokens"
    return out if kind == "turn" else "completed"


async def _abandon(session, url: str, body: dict, kind: str, rng: random.Random) -> str:
    """A streaming client that leaves: after two chunks (mid-answer) or after a few ms (queued or in prefill).
    A request that finished before its client left counts as completed."""
    state = {"chunks": 0, "done": False, "status": None}

    async def consume() -> None:
        async with session.post(url + "/generate", json=dict(body, stream=True)) as r:
            state["status"] = r.status
            async for raw in r.content:
                if raw.startswith(b"data: [DONE]"):
                    state["done"] = True
                elif raw.startswith(b"data:"):
                    state["chunks"] += 1
                    if kind == "stream_disconnect" and state["chunks"] == 2:
                        return  # leaving the block closes the connection mid-answer

    if kind == "abort_prefill":
        await abandon_after(consume(), rng.uniform(0.0, 0.05))
    else:
        await consume()
    if state["status"] is not None and state["status"] >= 500:
        return "errors_5xx"
    if state["status"] not in (None, 200):
        return f"{kind} request refused {state['status']}"
    return "completed" if state["done"] else "aborted"


# ---- the server's state at idle ---------------------------------------------------------------------------
def idle_state(url: str, timeout: float = 60) -> dict:
    """``/server_info`` counters once no request holds KV (aborted requests finish asynchronously), or after
    ``timeout`` as they are (a leak then shows in them)."""
    end = time.time() + timeout
    while True:
        st = hybridkv_state(url)
        held = st["staging_max_total_tokens"] - st["staging_available_tokens"] - st["radix_evictable_tokens"]
        if (st["compressed_requests_live"] == 0 and held == 0) or time.time() > end:
            return st
        time.sleep(0.5)


class RSSProbe:
    """Resident memory of the server's processes (launcher, scheduler, detokenizer: one session)."""

    def __init__(self, url: str) -> None:
        port = url.rsplit(":", 1)[1]
        self.session = next(pid for pid in _pids() if f"--port\0{port}\0" in _read(f"/proc/{pid}/cmdline"))
        self.samples: dict[str, int] = {}

    def sample(self, name: str) -> None:
        total = 0
        for pid in _pids():
            stat = _read(f"/proc/{pid}/stat")
            if stat and int(stat.rsplit(")", 1)[1].split()[3]) == self.session:  # field 6: session id
                status = _read(f"/proc/{pid}/status")
                total += next((int(line.split()[1]) * 1024 for line in status.splitlines()
                               if line.startswith("VmRSS")), 0)
        self.samples[name] = total

    def growth_mb(self) -> float | None:
        if "warm" not in self.samples or "end" not in self.samples:
            return None
        return round((self.samples["end"] - self.samples["warm"]) / 2**20, 1)


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _print_table(result: dict, st: dict, unexpected: list[str], sglang_leak: bool) -> None:
    print("\n| field | value |\n|---|---|")
    for k in FIELDS:
        print(f"| {k} | {result[k]} |")
    print(f"| (host tier limit, bytes) | {st['host_tier_limit_bytes']} |")
    print(f"| (host-tier refusals: requests made static) | {st['host_tier_refusals']} |")
    print(f"| (compacted / released) | {st['compacted_total']} / {st['released_total']} |")
    print(f"| (SGLang leak check) | {'LEAK REPORTED' if sglang_leak else 'quiet'} |")
    for u in sorted(set(unexpected)):
        print(f"unexpected ({unexpected.count(u)}x): {u}")


if __name__ == "__main__":
    sys.exit(main())
