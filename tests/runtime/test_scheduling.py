"""Compression is a function of the prompt alone: the same kept rows (``kept_digest``) and the same greedy
tokens however SGLang schedules a request — alone, or prefilled in 128-token chunks next to other requests,
retracted and re-prefilled by SGLang's own retraction drill — with SGLang's busy-time memory check on, radix
cache on and off. Real weights (SmolLM2), hybridkv at budget 0.1."""

import random

import pytest

from sglang_hybridkv.testing.captioned_video import sign_number
from sglang_hybridkv.testing.server import generate_all, get, server_log, sglang_server, wait_idle

pytestmark = pytest.mark.slow
COMPRESS = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
STRESS_ENV = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7",
              "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
GEN = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    long = [sign_number(rng, 40).text for _ in range(3)]
    short = [f"Write one sentence about the number {i}." for i in range(3)]
    return long, short


@pytest.fixture(scope="module")
def alone(smollm2_checkpoint, prompts):
    """Each long prompt alone on a server with no chunking and no retraction drill."""
    with sglang_server(smollm2_checkpoint, extra_args=COMPRESS) as url:
        yield generate_all(url, [{"text": p} for p in prompts[0]], GEN)


@pytest.fixture(scope="module", params=["radix", "no-radix"])
def stressed(request, smollm2_checkpoint, prompts):
    extra = COMPRESS + ["--chunked-prefill-size", "128", "--log-level", "info"]
    if request.param == "no-radix":
        extra.append("--disable-radix-cache")
    with sglang_server(smollm2_checkpoint, extra_args=extra, env=STRESS_ENV) as url:
        long, short = prompts
        mixed = [t for pair in zip(long, short) for t in pair]
        out = generate_all(url, [{"text": t} for t in mixed], GEN, together=True)
        yield url, out[0::2], out[1::2]


def test_same_kept_rows_and_tokens_as_alone(stressed, alone):
    url, long_out, short_out = stressed
    for got, want in zip(long_out, alone):
        assert got["meta_info"]["hybridkv"]["kept_digest"] == want["meta_info"]["hybridkv"]["kept_digest"]
        assert got["output_ids"] == want["output_ids"]
    assert all(r["meta_info"]["completion_tokens"] == GEN["max_new_tokens"] for r in short_out)
    # The stress really happened: chunked prefill and SGLang's retraction drill.
    assert sum(r["meta_info"].get("num_retractions", 0) for r in long_out + short_out) > 0
    assert "Prefill batch" in server_log(url)


def test_healthy_and_empty_after_idling(stressed):
    url = stressed[0]
    st = wait_idle(url)
    assert st["compacted_total"] == st["released_total"] > 0 and st["compressed_slots_held"] == 0
    assert st["host_tier_pages_used"] == 0
    get(url + "/health")
    assert "leak" not in server_log(url).lower()
    # Decode metadata built once per forward batch (SGLang's own count of decode forwards) and read by each of
    # SmolLM2's 30 layers.
    assert st["decode_plans_built"] == st["sglang_decode_forwards"] > 0
    assert st["decode_layer_calls"] == 30 * st["decode_plans_built"]


def test_mixed_batch_equals_each_request_alone(stressed, prompts):
    """Uncompressed, 0.1 and 1.0 requests decoded together (one attention call per layer) give each request
    the tokens it gets alone on the same server."""
    url = stressed[0]
    texts = prompts[0][:1] + prompts[1][:1]
    params = [dict(GEN, custom_params={"hybridkv": c}) for c in ({"policy": "none"}, {"budget": 0.1}, {"budget": 1.0})]
    cases = [{"text": t, "sampling_params": p} for t in texts for p in params]
    batched = generate_all(url, cases, together=True)
    for case, got, want in zip(cases, batched, generate_all(url, cases)):
        assert got["output_ids"] == want["output_ids"], case["sampling_params"]
