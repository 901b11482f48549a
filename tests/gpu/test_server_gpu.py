"""A whole SGLang server on CUDA (``pytest -m gpu``; skipped without a CUDA device or without SGLang): compressed
decode inside SGLang's breakable decode CUDA graphs gives the tokens of the eager path, budget 1.0 gives the
tokens of stock SGLang, and every slot is free again at idle."""

import pytest

pytest.importorskip("sglang")

from sglang_hybridkv.testing.captioned_video import make_tasks  # noqa: E402
from sglang_hybridkv.testing.server import generate_all, hybridkv_state, sglang_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.gpu
# fp32 on both sides, so that greedy tokens compare across attention kernels.
CUDA = ["--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens", "65536"]
HKV = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
GEN = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompts():
    # Eight requests sent together: a decode batch of 8 replays the graph captured for 8; as requests finish the
    # batch is padded to the next captured size.
    tasks = make_tasks(["sign_number"], 8, [48, 96], seed=3)
    return [{"text": t.text} for t in tasks[:8]]


def _outputs(url, prompts, params=None):
    outs = generate_all(url, prompts, dict(GEN, **(params or {})), together=True)
    return [o["output_ids"] for o in outs], outs


def test_breakable_decode_graphs_give_the_eager_tokens_and_free_every_slot(smollm2_checkpoint, prompts):
    with sglang_server(smollm2_checkpoint, HKV + CUDA + ["--disable-cuda-graph"], device="cuda") as url:
        eager, _ = _outputs(url, prompts)
        wait_idle(url)
    with sglang_server(smollm2_checkpoint, HKV + CUDA, device="cuda") as url:
        graphed, outs = _outputs(url, prompts)
        st = wait_idle(url)
        assert all(o["meta_info"]["hybridkv"]["within_budget"] for o in outs)
        assert st["compressed_requests_live"] == 0 and st["released_total"] == st["compacted_total"] > 0
        assert st["decode_plans_built"] == st["decode_batches"]
    assert graphed == eager


def test_budget_one_on_cuda_gives_stock_sglang_tokens(smollm2_checkpoint, prompts):
    with sglang_server(smollm2_checkpoint, CUDA + ["--attention-backend", "triton"], device="cuda") as url:
        stock, _ = _outputs(url, prompts)
    with sglang_server(smollm2_checkpoint, HKV + CUDA, device="cuda") as url:
        full, _ = _outputs(url, prompts, {"custom_params": {"hybridkv": {"budget": 1.0}}})
        wait_idle(url)
        assert hybridkv_state(url)["compressed_requests_live"] == 0
    assert full == stock
