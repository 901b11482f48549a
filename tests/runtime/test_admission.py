"""The product claim at the scheduler: on the same pool, slots freed by compaction admit more requests at once.
Read from SGLang's own decode log (#running-req), not from the plugin's counters."""

import concurrent.futures as cf

import pytest

from sglang_hybridkv.testing.server import decode_running_counts, post, server_log, sglang_server
from tests.runtime.filler import filler

pytestmark = pytest.mark.slow
LOG = ["--log-level", "info", "--decode-log-interval", "1", "--disable-radix-cache"]
PARAMS = {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}


def _peak_running(checkpoint, extra, prompts):
    with sglang_server(checkpoint, extra_args=extra + LOG, max_total_tokens=2000) as url:
        offset = len(server_log(url))
        with cf.ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda p: post(url + "/generate", {"text": p, "sampling_params": PARAMS}), prompts))
        assert all(o["meta_info"]["completion_tokens"] == PARAMS["max_new_tokens"] for o in outs)
        return max(decode_running_counts(url, offset))


def test_freed_slots_admit_more_requests_on_the_same_pool(tiny_llama_checkpoint):
    prompts = [filler("Clip", s, 560) for s in range(8)]
    none = _peak_running(tiny_llama_checkpoint, [], prompts)
    compressed = _peak_running(tiny_llama_checkpoint, ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"],
                               prompts)
    assert none <= 3  # ~600-token prompts + 48 outputs in a 2,000-slot pool
    assert compressed >= 2 * none and compressed >= 6, (none, compressed)
