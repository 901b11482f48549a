"""The HF reference path and the SGLang server run the same compression step: for the same prompt tokens they
keep the same rows per head (``kept_digest``), for the default knobs and another window."""

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.digest import kept_digest
from sglang_hybridkv.hf.runner import HybridKVRunner
from sglang_hybridkv.testing.captioned_video import make_tasks
from sglang_hybridkv.testing.server import post, sglang_server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("window", [None, 8])
def test_hf_and_server_keep_the_same_rows(smollm2, smollm2_checkpoint, window):
    model, tokenizer = smollm2
    task = make_tasks(["sign_number"], 1, [24], seed=2)[0]
    ids = tokenizer(task.text)["input_ids"]
    cfg = HybridKVConfig() if window is None else HybridKVConfig(window=window)
    extra = ["--kv-compression", "hybridkv", "--hybridkv-window", str(cfg.window)]
    with sglang_server(smollm2_checkpoint, extra_args=extra) as url:
        out = post(url + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    runner = HybridKVRunner(model)
    state = runner.prefill(torch.tensor([ids]))
    cache = runner.compress(state, cfg)
    assert out["meta_info"]["hybridkv"]["kept_digest"] == kept_digest(cache.plans)
