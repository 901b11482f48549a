"""The server's decode with the project's Triton kernels (run by Triton's interpreter on this CPU) gives the
torch path's tokens: the kernels the GPU runs are the ones the CPU tests exercise inside SGLang."""

import pytest

from sglang_hybridkv.testing.server import hybridkv_state, post, sglang_server

from .filler import filler

pytestmark = pytest.mark.slow
ARGS = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
GEN = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


CASES = [("hybridkv", 0.1), ("hybridkv", 1.0), ("all_dynamic", 0.2)]  # the last: chunk scoring and copies


def _generate(checkpoint, env):
    with sglang_server(checkpoint, extra_args=ARGS, env=env) as url:
        outs = []
        for i, (policy, budget) in enumerate(CASES):
            params = dict(GEN, custom_params={"hybridkv": {"budget": budget, "policy": policy}})
            outs.append(post(url + "/generate", {"text": filler("Clip", 30 + i, 300) + " Summary?",
                                                 "sampling_params": params}))
        return outs, hybridkv_state(url)


def test_interpreted_triton_decode_gives_the_torch_tokens(tiny_llama_checkpoint):
    torch_path, torch_state = _generate(tiny_llama_checkpoint, {})
    triton_path, triton_state = _generate(tiny_llama_checkpoint, {"TRITON_INTERPRET": "1"})
    for a, b in zip(torch_path, triton_path):
        assert a["meta_info"]["hybridkv"]["kept_digest"] == b["meta_info"]["hybridkv"]["kept_digest"]
        assert a["output_ids"] == b["output_ids"]
    # The Triton scoring and copy kernels ran: dynamic heads fetched chunks, the same rows as the torch path.
    assert triton_path[-1]["meta_info"]["hybridkv"]["dynamic_heads"] == 2 * 2
    assert triton_state["retrieval_rows_copied"] == torch_state["retrieval_rows_copied"] > 0
