"""``core.device_copy.to_device``: host tables reach the device unchanged, and on a GPU without a stream sync."""

import numpy as np
import pytest
import torch

from sglang_hybridkv.core.device_copy import to_device


def test_host_tensors_and_arrays_arrive_unchanged():
    t = torch.arange(12).view(3, 4)
    assert torch.equal(to_device(t, "cpu"), t)
    a = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]  # not contiguous
    out = to_device(a, "cpu")
    assert out.dtype == torch.int64 and out.tolist() == a.tolist()
    assert to_device(np.zeros(0, dtype=np.int64), "cpu").numel() == 0


@pytest.mark.gpu
def test_copy_to_a_gpu_does_not_sync_the_stream():
    host = torch.arange(1 << 16)
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy @ busy  # queued work a blocking copy would wait for
        out = to_device(host, "cuda")
        with pytest.raises(RuntimeError):  # the plain copy does sync: the check is live
            host.to("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.cpu(), host)
