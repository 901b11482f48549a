"""Tensor parallelism: ``--tp-size 2`` with compression gives what one rank gives.

A tiny random Llama (2 KV heads: one per rank, fp32) on CPU through gloo (``TP_ENV``, the recipe in the
README). One TP=1 server answers the reference requests and stops; one TP=2 server, radix cache on, chunked
prefill and SGLang's retraction drill on, answers the same requests all at once. Each request must get the
same greedy tokens and keep the same rows per head (``kept_digest``, combined over the ranks' heads) as on one
rank, report whole-model figures, and the server must end clean after aborts and idling."""

import asyncio
import contextlib

import pytest

from sglang_hybridkv.testing.server import (free_port, generate_all, get, post, server_log, sglang_server,
                                            wait_idle)
from tests.runtime.filler import filler

pytestmark = pytest.mark.slow
COMPRESS = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
# One core per rank; NCCL's library made unloadable, so all-reduce falls through to the gloo CPU group.
TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so"}
TP_ARGS = ["--tp-size", "2", "--disable-custom-all-reduce"]
STRESS_ENV = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7",
              "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
GEN = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
# hybridkv at 0.1 and 1.0, and every head dynamic (host tier and chunk retrieval on each rank).
OVERRIDES = [{"budget": 0.1}, {"budget": 1.0}, {"policy": "all_dynamic", "budget": 0.2}]
PROMPTS = [filler("Video", s, 700) + " What happened in the video?" for s in (1, 2)]
CASES = [(p, dict(GEN, custom_params={"hybridkv": o})) for p in PROMPTS for o in OVERRIDES[:2]] + \
    [(PROMPTS[0], dict(GEN, custom_params={"hybridkv": OVERRIDES[2]}))]
BODIES = [{"text": t, "sampling_params": p} for t, p in CASES]


def _port():
    return free_port(31000, 31500)


@pytest.fixture(scope="module")
def one_rank(tiny_llama_checkpoint):
    """The reference: each case alone on one rank (the server stops before the TP=2 one starts)."""
    with sglang_server(tiny_llama_checkpoint, extra_args=COMPRESS, port=_port()) as url:
        return generate_all(url, BODIES)


async def _aborted(url, text):
    """One client leaves mid-decode (after two streamed chunks), one while its request is queued/prefilling."""
    import aiohttp

    body = {"text": text, "sampling_params": dict(GEN, max_new_tokens=24), "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def mid_decode():
            chunks = 0
            async with s.post(url + "/generate", json=body) as r:
                async for raw in r.content:
                    chunks += raw.startswith(b"data:")
                    if chunks == 2:
                        return chunks

        async def in_prefill():
            async with s.post(url + "/generate", json=body) as r:
                async for _ in r.content:
                    pass

        task = asyncio.ensure_future(in_prefill())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return await mid_decode()


@pytest.fixture(scope="module")
def two_ranks(tiny_llama_checkpoint, one_rank):
    extra = COMPRESS + TP_ARGS + ["--chunked-prefill-size", "256"]
    with sglang_server(tiny_llama_checkpoint, extra_args=extra, env={**TP_ENV, **STRESS_ENV}, port=_port(),
                       timeout=400) as url:
        yield url, generate_all(url, BODIES, together=True)


def test_same_tokens_and_kept_rows_as_one_rank(two_ranks, one_rank):
    _, outs = two_ranks
    for (_, params), got, want in zip(CASES, outs, one_rank):
        g, w = got["meta_info"]["hybridkv"], want["meta_info"]["hybridkv"]
        assert got["output_ids"] == want["output_ids"], params
        assert g["compressed"] and w["compressed"]
        assert g["kept_digest"] == w["kept_digest"], params
        # Whole-model figures, summed over the ranks.
        assert (g["tp_size"], w["tp_size"]) == (2, 1)
        for key in ("static_heads", "dynamic_heads", "kv_bytes_full", "kv_bytes_host", "prompt_tokens"):
            assert g[key] == w[key], (key, params)
        # Every rank holds the most slots any rank's heads need: at least what one rank packs them in.
        assert g["kv_slots_device"] >= w["kv_slots_device"]
        assert g["kv_bytes_device"] < g["kv_bytes_full"] or params["custom_params"]["hybridkv"].get("budget") == 1.0
    dynamic = [o["meta_info"]["hybridkv"] for (_, p), o in zip(CASES, outs)
               if p["custom_params"]["hybridkv"].get("policy") == "all_dynamic"]
    assert all(s["dynamic_heads"] == 4 and s["kv_bytes_host"] > 0 for s in dynamic)
    # The stress really happened: SGLang's retraction drill re-prefilled some requests.
    assert sum(o["meta_info"].get("num_retractions", 0) for o in outs) > 0


def test_aborts_then_idle_clean(two_ranks):
    url, _ = two_ranks
    assert asyncio.run(_aborted(url, PROMPTS[0] + " Again.")) == 2
    st = wait_idle(url)
    assert st["compacted_total"] == st["released_total"] > 0 and st["compressed_slots_held"] == 0
    assert st["host_tier_pages_used"] == 0 and st["host_tier_bytes"] == 0 and st["radix_protected_tokens"] == 0
    # Rank 0: one decode plan per SGLang decode forward, read by each of the model's 2 layers.
    assert st["decode_plans_built"] == st["sglang_decode_forwards"] > 0
    assert st["decode_layer_calls"] == 2 * st["decode_plans_built"]
    get(url + "/health")
    out = post(url + "/generate", {"text": PROMPTS[1], "sampling_params": GEN})  # still serving after idling
    assert out["meta_info"]["hybridkv"]["compressed"]
    assert "leak" not in server_log(url).lower()
