"""The SGLang operator's tools against one compressed CPU server: ``sglang serve``, Prometheus ``/metrics``, the
OpenAI client with ``extra_body``, token budgets, SGLang's own serving benchmark; and ``sgl.Engine``."""

import json
import os
import subprocess
import sys

import pytest
import requests

from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.server import HTTPError, cpu_env, free_port, get, post, sglang_server, wait_idle

pytestmark = pytest.mark.slow
BUDGET_TOKENS = 64  # server-wide: each compressed request keeps about 64 pool slots
GEN = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def prompts():
    return [t.text for t in make_tasks(["sign_number"], 3, [24], seed=1)]


@pytest.fixture(scope="module")
def server(smollm2_checkpoint):
    extra = ["--enable-metrics", "--kv-compression", "hybridkv", "--hybridkv-budget-tokens", str(BUDGET_TOKENS)]
    with sglang_server(smollm2_checkpoint, extra_args=extra, serve=True, port=free_port(32000, 33000)) as url:
        yield url


def scrape(url: str) -> dict[tuple, float]:
    """``/metrics`` parsed by prometheus_client's own text parser: (sample name, policy label) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=30).text
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("sglang:hybridkv_"):
                key = (s.name, s.labels.get("policy"), s.labels.get("le"))
                out[key] = out.get(key, 0.0) + s.value
    return out


def delta(after: dict, before: dict, name: str, policy: str | None = None) -> float:
    return after.get((name, policy, None), 0.0) - before.get((name, policy, None), 0.0)


def test_metrics_count_requests_and_match_their_stats(server, prompts):
    before = scrape(server)
    stats = [post(server + "/generate", {"text": p, "sampling_params": GEN})["meta_info"]["hybridkv"]
             for p in prompts]
    assert all(s["compressed"] and s["budget_tokens"] == BUDGET_TOKENS for s in stats)
    after = scrape(server)
    assert delta(after, before, "sglang:hybridkv_compressed_requests_total", "hybridkv") == 3
    for field in ("kv_bytes_device", "kv_bytes_full", "kv_bytes_host"):
        assert delta(after, before, f"sglang:hybridkv_compressed_{field}_total", "hybridkv") == sum(s[field] for s in stats)
    assert delta(after, before, "sglang:hybridkv_compression_ratio_count", "hybridkv") == 3
    ratios = sum(s["kv_bytes_full"] / s["kv_bytes_device"] for s in stats)
    assert delta(after, before, "sglang:hybridkv_compression_ratio_sum", "hybridkv") == pytest.approx(ratios)
    shares = sum(s["static_heads"] / (s["static_heads"] + s["dynamic_heads"]) for s in stats)
    assert delta(after, before, "sglang:hybridkv_static_head_share_sum", "hybridkv") == pytest.approx(shares)
    # SGLang's own series are still there, next to ours.
    assert "sglang:num_running_reqs" in requests.get(server + "/metrics", timeout=30).text


def test_device_bytes_gauge_is_what_running_requests_hold(server, prompts):
    """While a streamed request decodes, the gauge equals its stats; at idle it is back to 0."""
    body = {"text": prompts[0], "stream": True, "sampling_params": dict(GEN, max_new_tokens=64)}
    seen = {}
    with requests.post(server + "/generate", json=body, stream=True, timeout=300) as r:
        chunks = 0
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunks += 1
            stats = json.loads(line[6:])["meta_info"].get("hybridkv")
            if stats and chunks >= 3 and not seen:
                seen = {"stats": stats, "metrics": scrape(server)}
    assert seen, "the stream ended before stats and metrics were seen"
    live = seen["metrics"]
    assert live[("sglang:hybridkv_kv_bytes_device", None, None)] == seen["stats"]["kv_bytes_device"]
    assert live[("sglang:hybridkv_kv_bytes_saved", None, None)] == (seen["stats"]["kv_bytes_full"]
                                                                     - seen["stats"]["kv_bytes_device"])
    assert live[("sglang:hybridkv_compressed_requests_running", None, None)] == 1
    wait_idle(server)
    assert scrape(server)[("sglang:hybridkv_kv_bytes_device", None, None)] == 0


def test_openai_extra_body_overrides_and_budget_tokens(server, prompts):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none")

    def chat(hybridkv: dict):
        return client.chat.completions.create(
            model="default", temperature=0, max_tokens=4, messages=[{"role": "user", "content": prompts[1]}],
            extra_body={"custom_params": {"hybridkv": hybridkv}, "return_meta_info": True})

    # The server-wide token budget: ~BUDGET_TOKENS pool slots whatever the prompt length.
    stats = chat({})
    stats = stats.choices[0].model_extra["meta_info"]["hybridkv"]
    assert stats["budget_tokens"] == BUDGET_TOKENS
    assert stats["budget"] == pytest.approx(BUDGET_TOKENS / stats["prompt_tokens"])
    assert stats["kv_slots_device"] <= BUDGET_TOKENS + 1
    # Per request: another policy and another token budget; or a fraction instead of tokens.
    out = chat({"policy": "snapkv", "budget_tokens": 2 * BUDGET_TOKENS}).choices[0].model_extra["meta_info"]["hybridkv"]
    assert (out["policy"], out["budget_tokens"]) == ("snapkv", 2 * BUDGET_TOKENS)
    assert stats["kv_slots_device"] < out["kv_slots_device"] <= 2 * BUDGET_TOKENS + 1
    out = chat({"budget": 0.2}).choices[0].model_extra["meta_info"]["hybridkv"]
    assert out["budget"] == 0.2 and "budget_tokens" not in out
    # A bad override is refused with 400, naming the field.
    for bad, words in (({"budget_tokens": 0}, "budget_tokens=0"), ({"budget": 0.1, "budget_tokens": 8}, "exactly one"),
                       ({"chunk_size": 8}, "chunk_size")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(bad)
        assert e.value.status_code == 400 and words in str(e.value)
    with pytest.raises(HTTPError) as e:  # the native API says the same
        post(server + "/generate", {"text": "hi", "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"hybridkv": {"budget_tokens": 1.5}}}})
    assert e.value.status == 400 and "budget_tokens=1.5" in e.value.body


def test_sglang_benchmark_serving_with_per_request_policy(server, smollm2_checkpoint, prompts, tmp_path):
    """SGLang's own benchmark, random dataset sampled from a local ShareGPT-format file (no download), every
    request overriding the policy through ``--extra-request-body``."""
    dataset = tmp_path / "captions.json"
    # The random dataset draws one prompt per conversation: at least as many conversations as requests.
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": "ok"}]}
                                   for p in prompts * 2]))
    out = tmp_path / "bench.jsonl"
    before = scrape(server)
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai", "--base-url", server,
           "--model", smollm2_checkpoint, "--tokenizer", smollm2_checkpoint, "--dataset-name", "random",
           "--dataset-path", str(dataset), "--random-input-len", "256", "--random-output-len", "8",
           "--random-range-ratio", "1", "--num-prompts", "4", "--warmup-requests", "1", "--disable-tqdm",
           "--output-file", str(out),
           "--extra-request-body", json.dumps({"custom_params": {"hybridkv": {"policy": "snapkv"}}})]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 4 and result["total_output_tokens"] == 4 * 8
    after = scrape(server)
    assert delta(after, before, "sglang:hybridkv_compressed_requests_total", "snapkv") == 4 + 1  # + warm-up
    assert delta(after, before, "sglang:hybridkv_compressed_requests_total", "hybridkv") == 0


def test_engine_runs_the_multi_turn_example_in_process(tiny_vl_checkpoint, tmp_path):
    """``sgl.Engine(..., kv_compression="hybridkv", hybridkv_budget=0.1)``: every turn compressed, later turns
    served from the radix cache."""
    report = tmp_path / "engine.json"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "multi_turn_video_qa.py"), "--engine", "--model-path",
           tiny_vl_checkpoint, "--frames", "4", "--turns", "2", "--max-new-tokens", "4", "--json", str(report)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=cpu_env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    turns = json.loads(report.read_text())["turns"]
    assert len(turns) == 2 and all(t["media_tokens"] > 0 for t in turns)
    assert all(0 < t["kv_bytes_device"] < t["kv_bytes_full"] for t in turns)
    assert turns[1]["cached_tokens"] >= 0.9 * turns[0]["prompt_tokens"]  # the first turn, from the radix cache
