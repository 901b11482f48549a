"""SGLang's overlap scheduler stays on with compression: compaction plans inside the forward and commits its pool
slots, host pages and radix changes on the scheduler side, between forwards.

One server with overlap on (SGLang's default) and one with ``--disable-overlap-schedule``, same requests: prompts
prefilled in 96-token chunks next to decoding requests (the batch after a compacting prefill is where overlap
would read a region not committed yet), compressed (hybridkv 0.2, all_dynamic) and uncompressed requests
together, radix cache on, SGLang's busy-time memory check on. A probe loaded into the server processes
(``forward_memory_probe/sitecustomize.py``) records any pool-slot alloc/free or radix eviction made while
``ModelRunner.forward`` runs. Tiny random Llama (plumbing, not accuracy)."""

import json
import os

import pytest

from sglang_hybridkv.testing.server import CPU_COMPAT, generate_all, get, server_log, sglang_server, wait_idle

pytestmark = pytest.mark.slow
PROBE = os.path.join(os.path.dirname(__file__), "forward_memory_probe")
ARGS = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.2", "--chunked-prefill-size", "96",
        "--max-prefill-tokens", "96", "--log-level", "info"]
GEN = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
POLICIES = [{}, {"policy": "all_dynamic"}, {"policy": "none"}, {"budget": 0.1}]


def _requests():
    out = []
    for i in range(8):
        text = f"Request {i}: describe the harbour, the ships and the weather over the sea. " * (3 + 2 * (i % 4))
        out.append({"text": text, "sampling_params": dict(GEN, custom_params={"hybridkv": POLICIES[i % 4]})})
    return out


def _serve(checkpoint, tmp_path, overlap: bool):
    log = tmp_path / f"forward-memory-{'on' if overlap else 'off'}.jsonl"
    env = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "HYBRIDKV_FORWARD_MEMORY_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([PROBE, CPU_COMPAT])}
    args = ARGS + ([] if overlap else ["--disable-overlap-schedule"])
    with sglang_server(checkpoint, extra_args=args, env=env) as url:
        out = generate_all(url, _requests(), together=True)
        state = wait_idle(url)
        info = get(url + "/server_info")
        text = server_log(url)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, state, info, text, calls


@pytest.fixture(scope="module")
def runs(tiny_llama_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    return {mode: _serve(tiny_llama_checkpoint, tmp, mode) for mode in (True, False)}


def test_overlap_stays_on_and_says_so(runs):
    _, _, info, text, _ = runs[True]
    assert info["disable_overlap_schedule"] is False
    assert "overlap scheduling on" in text
    assert runs[False][2]["disable_overlap_schedule"] is True


def test_same_tokens_with_overlap_on_and_off(runs):
    on, off = runs[True][0], runs[False][0]
    for i, (a, b) in enumerate(zip(on, off)):
        assert a["output_ids"] == b["output_ids"], f"request {i} ({POLICIES[i % 4]})"
        assert a["meta_info"].get("hybridkv", {}).get("kept_digest") == b["meta_info"].get("hybridkv", {}).get("kept_digest")
    compressed = [r for r in on if r["meta_info"].get("hybridkv", {}).get("compressed")]
    assert len(compressed) == 6
    assert any(r["meta_info"]["hybridkv"]["dynamic_heads"] > 0 for r in compressed)


def test_no_memory_work_inside_the_forward(runs):
    """No pool slot is allocated or freed and no radix entry evicted while the model forward runs, in either mode;
    the probe did see the forward (compactions happened and decode steps ran)."""
    for mode, (_, state, _, text, calls) in runs.items():
        assert calls == [], f"overlap {'on' if mode else 'off'}: {calls[:3]}"
        assert state["compacted_total"] == state["released_total"] == 6
        assert "Prefill batch" in text  # chunked prefill made several prefill batches


def test_idle_and_clean(runs):
    for _, state, _, text, _ in runs.values():
        assert state["compressed_slots_held"] == 0 and state["host_tier_pages_used"] == 0
        assert state["decode_plans_built"] == state["sglang_decode_forwards"] > 0
        assert state["retrieval_rows_copied"] > 0
        assert "leak" not in text.lower()
