"""Host data onto the device without making the host wait for the device's queued work.

A plain ``tensor.to("cuda")`` from pageable memory synchronises the stream: the host waits until every kernel
already queued has finished. Compaction and the decode plan move small host tables (lengths, kept positions,
slot ids) to the device many times per forward, so each such copy would stall the host that should be queuing the
next layer. Staged in pinned memory (PyTorch's caching host allocator, which keeps the staging buffer alive until
the copy's stream event completes) the copy is asynchronous. On a CPU device this is a plain ``.to``.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``x`` (a host tensor or array) on ``device``, copied asynchronously where ``device`` is a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
