"""The server's decode with the project's Triton kernels (run by Triton's interpreter on this CPU) gives the
torch path's tokens: the kernels the GPU runs are the ones the CPU tests exercise inside SGLang."""

import pytest

from sglang_hybridkv.testing.server import post, sglang_server

from .filler import filler

pytestmark = pytest.mark.slow
ARGS = ["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1"]
GEN = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def _generate(checkpoint, env):
    with sglang_server(checkpoint, extra_args=ARGS, env=env) as url:
        outs = []
        for i, budget in enumerate((0.1, 1.0)):
            params = dict(GEN, custom_params={"hybridkv": {"budget": budget, "policy": "hybridkv"}})
            outs.append(post(url + "/generate", {"text": filler("Clip", 30 + i, 300) + " Summary?",
                                                 "sampling_params": params}))
        return outs


def test_interpreted_triton_decode_gives_the_torch_tokens(tiny_llama_checkpoint):
    torch_path = _generate(tiny_llama_checkpoint, {})
    triton_path = _generate(tiny_llama_checkpoint, {"TRITON_INTERPRET": "1"})
    for a, b in zip(torch_path, triton_path):
        assert a["meta_info"]["hybridkv"]["kept_digest"] == b["meta_info"]["hybridkv"]["kept_digest"]
        assert a["output_ids"] == b["output_ids"]
