"""A fault in one request's compaction is contained: that request is aborted with an error naming the stage, what
it held (pool slots, host pages, radix lock) comes back, the requests beside it and after it are served, and SGLang's
own leak checks stay quiet. Faults are injected with ``compaction.FAULT_ENV`` (a layer's planning, or commit after
the request's slots and host pages were taken and written), on servers with the radix cache on and off."""

import concurrent.futures as cf

import pytest

from sglang_hybridkv.runtime.compaction import FAULT_ENV
from sglang_hybridkv.testing.server import HTTPError, post, server_log, sglang_server, wait_idle

pytestmark = pytest.mark.slow
PROMPT = "Request {}: " + " ".join(["a red car parked near the bakery while a dog sleeps by the fountain"] * 20)
# all_dynamic: every head keeps host-tier pages, so a commit fault holds slots and pages when it strikes.
PARAMS = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True,
          "custom_params": {"hybridkv": {"policy": "all_dynamic", "budget": 0.2}}}


@pytest.fixture(scope="module", params=["radix", "no-radix"])
def faulty_server(request, tiny_llama_checkpoint):
    extra = ["--kv-compression", "hybridkv", "--log-level", "info"]
    if request.param == "no-radix":  # compaction frees the prompt's staging slots itself
        extra.append("--disable-radix-cache")
    env = {FAULT_ENV: "layer:fault-layer-,commit:fault-commit-", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
    with sglang_server(tiny_llama_checkpoint, extra_args=extra, max_total_tokens=4096, env=env) as url:
        yield url


def _generate(url, rid, i):
    try:
        return post(url + "/generate", {"rid": rid, "text": PROMPT.format(i), "sampling_params": PARAMS})
    except HTTPError as e:
        return e


@pytest.mark.parametrize("stage", ["layer", "commit"])
def test_a_faulty_compaction_aborts_only_its_request_and_leaks_nothing(faulty_server, stage):
    url = faulty_server
    rids = [f"ok-{stage}-0", f"fault-{stage}-1", f"ok-{stage}-2"]
    with cf.ThreadPoolExecutor(3) as ex:  # the faulty request shares its prefill batch with the others
        out = list(ex.map(lambda a: _generate(url, *a), [(r, i) for i, r in enumerate(rids)]))
    fault = out[1]
    assert isinstance(fault, HTTPError) and fault.status == 500, fault
    assert f"compaction of request {rids[1]} failed in {stage}" in fault.body and "fault injected" in fault.body
    for res in (out[0], out[2]):
        assert res["meta_info"]["completion_tokens"] == PARAMS["max_new_tokens"]
        assert res["meta_info"]["hybridkv"]["compressed"] and res["meta_info"]["hybridkv"]["dynamic_heads"] > 0
    # Idle: every slot free or an evictable radix entry, no region, no host page, no radix lock.
    st = wait_idle(url)
    assert st["compressed_slots_held"] == 0 and st["host_tier_pages_used"] == 0 and st["host_tier_bytes"] == 0
    assert st["radix_protected_tokens"] == 0
    # The next request is served, compressed, and SGLang's idle and busy leak checks found nothing.
    nxt = _generate(url, f"next-{stage}", 9)
    assert nxt["meta_info"]["completion_tokens"] == PARAMS["max_new_tokens"] and nxt["meta_info"]["hybridkv"]["compressed"]
    wait_idle(url)
    log = server_log(url)
    assert f"compaction of request {rids[1]} failed in {stage}" in log
    assert "leak" not in log.lower()
