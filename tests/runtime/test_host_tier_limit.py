"""The host tier never holds more than ``--hybridkv-host-tier-gb``: a request whose dynamic heads need more pages
than are left is compressed with every head static, and its stats and the log say so; on a CPU the tier is
reserved at its limit once and takes resident memory only for pages written."""

import concurrent.futures as cf

import pytest
import torch

from sglang_hybridkv.runtime.host_tier import HostTier
from sglang_hybridkv.testing.server import hybridkv_state, post, server_log, sglang_server, wait_idle

PAGE = 2 * 2 * 16 * 32 * 4  # tiny-llama: 2 layers, chunk 16, head_dim 32, fp32 (K and V)
LIMIT_PAGES = 64
WORDS = "a red car parked near the bakery while a dog sleeps by the fountain".split()


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_the_tier_refuses_pages_beyond_its_limit_and_reuses_freed_ones():
    tier = HostTier(2, 16, 32, torch.float32, limit=LIMIT_PAGES * PAGE + PAGE // 2)
    assert tier.page_bytes == PAGE and tier.max_pages == LIMIT_PAGES
    a = tier.alloc(40)
    assert tier.alloc(30) is None and tier.refused == 1  # 70 pages would pass the limit
    b = tier.alloc(24)
    assert b is not None and tier.available_pages == 0 and tier.capacity * tier.page_bytes <= tier.limit
    tier.free(a)
    assert tier.alloc(40) is not None  # freed pages come back


def test_on_cpu_the_reserved_limit_takes_memory_only_when_written():
    before = _rss()
    tier = HostTier(2, 16, 32, torch.float32, limit=2 * 10**9)  # 2 GB reserved, nothing written
    assert _rss() - before < 50 * 2**20
    pages = tier.alloc(1000)
    tier.write(0, pages, torch.ones(2, 500 * 16, 32), torch.ones(2, 500 * 16, 32))
    assert float(tier.k[0][pages[:1000]].sum()) == 1000 * 16 * 32  # written pages hold the KV, unwritten zero


def _prompt(i: int, words: int) -> str:
    return f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))


@pytest.mark.slow
def test_a_request_the_tier_cannot_hold_is_compressed_static_and_says_so(tiny_llama_checkpoint):
    limit_gb = LIMIT_PAGES * PAGE / 1e9
    extra = ["--kv-compression", "hybridkv", "--hybridkv-host-tier-gb", str(limit_gb), "--log-level", "info"]
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True,
              "custom_params": {"hybridkv": {"policy": "all_dynamic", "budget": 0.2}}}
    with sglang_server(tiny_llama_checkpoint, extra_args=extra, max_total_tokens=8192) as url:
        small = post(url + "/generate", {"text": _prompt(0, 150), "sampling_params": params})["meta_info"]["hybridkv"]
        assert small["dynamic_heads"] > 0 and small["kv_bytes_host"] > 0 and not small["host_tier_fallback"]
        # Needs more pages than the whole tier: every head static, nothing in the host tier, still compressed.
        big = post(url + "/generate", {"text": _prompt(1, 900), "sampling_params": params})["meta_info"]["hybridkv"]
        assert big["compressed"] and big["host_tier_fallback"] and big["policy"] == "all_static"
        assert big["dynamic_heads"] == 0 and big["kv_bytes_host"] == 0
        # Several at once: those that fit keep dynamic heads, the others fall back; the tier stays in its limit.
        with cf.ThreadPoolExecutor(6) as ex:
            outs = list(ex.map(lambda i: post(url + "/generate", {"text": _prompt(i, 300), "sampling_params": params}),
                               range(2, 8)))
        stats = [o["meta_info"]["hybridkv"] for o in outs]
        assert all(o["meta_info"]["completion_tokens"] == 16 for o in outs)
        assert any(s["host_tier_fallback"] for s in stats) and any(s["kv_bytes_host"] > 0 for s in stats)
        st = hybridkv_state(url)
        assert st["host_tier_limit_bytes"] == int(limit_gb * 1e9)
        assert 0 < st["host_tier_bytes_peak"] <= st["host_tier_limit_bytes"] and st["host_tier_refusals"] >= 2
        assert "compressed with every head static" in server_log(url)
        st = wait_idle(url)
        assert st["host_tier_bytes"] == 0 and st["host_tier_pages_used"] == 0
        assert "leak" not in server_log(url).lower()
