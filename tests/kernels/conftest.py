import pytest
import torch

from sglang_hybridkv.kernels import triton_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def triton_or_skip(device: str) -> None:
    if not triton_available(device):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 (scripts/test.sh sets it)")


def tol(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
