import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """Real SmolLM2-135M-Instruct weights (fp32) and tokenizer, loaded once per test session."""
    from sglang_hybridkv.hf.models import load_smollm2

    return load_smollm2(torch.float32)


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct saved as safetensors (real weights) for SGLang to load."""
    from sglang_hybridkv.testing.models import write_checkpoint

    return write_checkpoint("smollm2", str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def tiny_vl_checkpoint(tmp_path_factory):
    """A tiny random Qwen2.5-VL with a tokenizer and processor, for SGLang's real multimodal path."""
    from sglang_hybridkv.testing.models import write_checkpoint

    return write_checkpoint("tiny-qwen2.5-vl", str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")))


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory):
    """A random 2-layer Llama with the SmolLM2 tokenizer: fast servers for plumbing and load tests."""
    from sglang_hybridkv.testing.models import write_checkpoint

    return write_checkpoint("tiny-llama", str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_checkpoint(tmp_path_factory):
    """A tiny random Qwen2-VL (its own vision tower and processor) with the same tokenizer."""
    from sglang_hybridkv.testing.models import write_checkpoint

    return write_checkpoint("tiny-qwen2-vl", str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="session")
def tiny_llava_ov_checkpoint(tmp_path_factory):
    """A tiny random LLaVA-OneVision (``LlavaQwenForCausalLM``, SigLIP tower in a subdirectory), same tokenizer."""
    from sglang_hybridkv.testing.models import write_checkpoint

    return write_checkpoint("tiny-llava-ov", str(tmp_path_factory.mktemp("tiny-llava-ov")))
