"""End to end against real SGLang servers on loopback (CPU, SmolLM2-135M-Instruct, fp32)."""

import subprocess
import time

import pytest

from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.server import (HTTPError, cpu_env, decode_slot_counts, get, hybridkv_state, post,
                                            server_command, server_log, sglang_server, wait_idle)

pytestmark = pytest.mark.slow
LOG = ["--log-level", "info", "--decode-log-interval", "1"]
GEN = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def task():
    return make_tasks(["sign_number"], 1, [48], seed=0)[0]


@pytest.fixture(scope="module")
def none_server(smollm2_checkpoint):
    with sglang_server(smollm2_checkpoint, extra_args=LOG) as url:
        yield url


@pytest.fixture(scope="module")
def hkv_server(smollm2_checkpoint):
    with sglang_server(smollm2_checkpoint, extra_args=["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"] + LOG) as url:
        yield url


def test_without_flag_plugin_changes_nothing(none_server, task):
    r = post(none_server + "/generate", {"text": task.text, "sampling_params": GEN})
    assert task.answer in r["text"]
    assert "hybridkv" not in r["meta_info"]
    assert hybridkv_state(none_server) == {}
    # A request asking for compression from a server without it is refused, not silently ignored.
    with pytest.raises(HTTPError) as e:
        post(none_server + "/generate", {"text": "hi", "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"hybridkv": {"budget": 0.1}}}})
    assert e.value.status == 400 and "without --kv-compression" in e.value.body


def test_budget_one_equals_none(none_server, hkv_server, task):
    ref = post(none_server + "/generate", {"text": task.text, "sampling_params": GEN})
    params = dict(GEN, custom_params={"hybridkv": {"budget": 1.0}})
    out = post(hkv_server + "/generate", {"text": task.text, "sampling_params": params})
    assert out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["hybridkv"]["budget"] == 1.0


def test_compression_frees_staging_slots(none_server, hkv_server, task):
    before_none, before_hkv = len(server_log(none_server)), len(server_log(hkv_server))
    ref = post(none_server + "/generate", {"text": task.text, "sampling_params": GEN})
    out = post(hkv_server + "/generate", {"text": task.text, "sampling_params": GEN})
    stats = out["meta_info"]["hybridkv"]
    prompt = out["meta_info"]["prompt_tokens"]
    assert stats["policy"] == "hybridkv" and stats["budget"] == 0.1 and stats["prompt_tokens"] == prompt
    assert stats["static_heads"] + stats["dynamic_heads"] == 30 * 3  # SmolLM2: 30 layers x 3 KV heads
    assert stats["kv_bytes_full"] >= 9 * stats["kv_bytes_device"]
    assert stats["within_budget"] and stats["kv_fraction_device"] <= 0.102
    assert (stats["kv_bytes_host"] > 0) == (stats["dynamic_heads"] > 0)
    # The scheduler's own slot count while decoding: the none server holds the whole prompt, ours does not.
    time.sleep(1)
    used_none = decode_slot_counts(none_server, before_none)
    used_hkv = decode_slot_counts(hkv_server, before_hkv)
    assert used_none and used_hkv
    assert max(used_none) >= prompt + GEN["max_new_tokens"] - 2
    # Once the prompt is compacted the request holds its compressed region's slots and its decoded tokens.
    assert stats["compressed"] and 0 < stats["kv_slots_device"] <= prompt / 5
    assert stats["kv_slots_device"] < max(used_hkv) <= stats["kv_slots_device"] + GEN["max_new_tokens"] + 1
    assert len(ref["output_ids"]) == len(out["output_ids"]) == GEN["max_new_tokens"]


def test_openai_chat_and_frontend_program(hkv_server, task):
    import openai
    import sglang as sgl

    client = openai.OpenAI(base_url=hkv_server + "/v1", api_key="none")
    chat = client.chat.completions.create(model="default", temperature=0, max_tokens=12,
                                          messages=[{"role": "user", "content": task.text}])
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 600

    @sgl.function
    def video_qa(s, captions):
        s += captions
        s += sgl.gen("answer", max_tokens=8, temperature=0)

    backend = sgl.RuntimeEndpoint(hkv_server)
    state = video_qa.run(captions=task.text, backend=backend)
    assert task.answer[:2] in state["answer"]


@pytest.mark.parametrize("params,words", [
    ({"budget": 2.0}, ["budget=2.0", "out of range"]),
    ({"policy": "h2o"}, ["policy='h2o'", "snapkv"]),
    ({"chunk_size": 8}, ["chunk_size", "cannot be set per request"]),
    ({"budget": "low"}, ["budget='low'"]),
])
def test_bad_request_fields_get_400(hkv_server, params, words):
    with pytest.raises(HTTPError) as e:
        post(hkv_server + "/generate", {"text": "hello", "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"hybridkv": params}}})
    assert e.value.status == 400
    for w in words:
        assert w in e.value.body


def test_per_request_policy_and_no_leaks_at_idle(hkv_server, task):
    copied = hybridkv_state(hkv_server)["retrieval_rows_copied"]
    for policy in ("snapkv", "none", "all_dynamic"):
        out = post(hkv_server + "/generate", {"text": task.text, "sampling_params": dict(
            GEN, max_new_tokens=4, custom_params={"hybridkv": {"policy": policy}})})
        if policy == "none":
            assert "hybridkv" not in out["meta_info"]
        else:
            assert out["meta_info"]["hybridkv"]["policy"] == policy
    # Every head dynamic: the media KV went to the host tier, and decoding fetched chunks from it.
    stats = out["meta_info"]["hybridkv"]
    assert stats["dynamic_heads"] == 30 * 3 and stats["kv_bytes_host"] > 0
    assert hybridkv_state(hkv_server)["retrieval_rows_copied"] > copied
    # Every head dynamic at 0.05 cannot fit its chunk summaries into the budget: stats and the log say so.
    offset = len(server_log(hkv_server))
    out = post(hkv_server + "/generate", {"text": task.text, "sampling_params": dict(
        GEN, max_new_tokens=4, custom_params={"hybridkv": {"policy": "all_dynamic", "budget": 0.05}})})
    stats = out["meta_info"]["hybridkv"]
    assert not stats["within_budget"] and stats["kv_fraction_device"] > 0.05
    assert "over its budget 0.05" in server_log(hkv_server)[offset:]
    st = wait_idle(hkv_server)
    assert st["compacted_total"] == st["released_total"] > 0 and st["radix_protected_tokens"] == 0
    assert st["compressed_slots_held"] == 0 and st["host_tier_bytes"] == 0 and st["host_tier_pages_used"] == 0
    get(hkv_server + "/health")  # raises unless the server answers 200
    assert "sgl_kernel shim" not in server_log(hkv_server)


@pytest.mark.parametrize("extra,words", [
    (["--kv-compression", "hybridkv", "--enable-mixed-chunk"], ["does not work with", "--enable-mixed-chunk"]),
    (["--kv-compression", "hybridkv", "--hybridkv-budget", "0"], ["budget=0.0", "(0.0, 1.0]"]),
])
def test_unsupported_start_is_refused_with_a_message(smollm2_checkpoint, extra, words):
    cmd = server_command(smollm2_checkpoint, 1, extra_args=extra)
    p = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    for w in words:
        assert w in p.stderr
    assert "Traceback" not in p.stderr
