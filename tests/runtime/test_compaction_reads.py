"""Compaction waits for the device once per layer: planning reads each layer's per-head figures in one transfer
(a second for hybridkv's coverage check), everything derived from the media mask is host arithmetic, the pool
layout and copies use the plans' host-side lengths, and the digest reads every layer's kept positions at once.

Compaction runs inside the prefill forward (planning) and between forwards (commit), for every layer of every
request; on a GPU each device read stalls the stream. Before this was counted, this test's request (4 layers of 4
KV heads) read the device 84 times under hybridkv and 72 under SnapKV (plan, commit and digest); now 9 and 5. The
watch (``tests/host_reads.py``) tracks values computed from the prompt's KV and window queries, the tensors that
live on the device in the server (host masks the code moves to the device are not tracked).
"""

from __future__ import annotations

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.digest import kept_digest
from sglang_hybridkv.testing.decode_batch import PoolBatch
from tests.host_reads import HostReadWatch

LAYERS, H, GROUP, D, L, W = 4, 4, 2, 32, 1200, 16


def _prompt(seed: int):
    """Per layer ``(H, L, D)`` keys and values and ``(H * GROUP, W, D)`` window queries; the first KV head's
    queries are zero, so its attention is spread (a dynamic head for hybridkv before its coverage check)."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(H, L, D, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(H, L, D, generator=g) for _ in range(LAYERS)]
    queries = [torch.randn(H * GROUP, W, D, generator=g) for _ in range(LAYERS)]
    for q in queries:
        q[:GROUP] = 0
    return keys, values, queries


@pytest.mark.parametrize("policy,reads_per_layer", [("hybridkv", 2), ("snapkv", 1), ("all_static", 1),
                                                    ("all_dynamic", 1)])
def test_compaction_reads_the_device_once_per_layer(policy, reads_per_layer):
    keys, values, queries = _prompt(0)
    cfg = HybridKVConfig(policy=policy, budget=0.1, window=W)
    pool = PoolBatch(LAYERS, H, D, 4000)
    watch = HostReadWatch(device_inputs=(*keys, *values, *queries))
    with watch.host_reads():
        layers = pool.add_compressed(1, cfg, keys, values, queries, D ** -0.5)
        digest = kept_digest({l: cl.plan for l, cl in layers.items()})
    # Every layer's figures are read (hybridkv's coverage check included: its spread heads start dynamic), and
    # nothing else but the digest's one read.
    assert reads_per_layer * LAYERS <= len(watch.seen) <= reads_per_layer * LAYERS + 1, watch.seen
    # What was read is what the unwatched run computes (the watch changes nothing), and the request compressed.
    assert digest == kept_digest({l: cl.plan for l, cl in PoolBatch(LAYERS, H, D, 4000).add_compressed(
        1, cfg, keys, values, queries, D ** -0.5).items()})
    assert pool.regions.get(1) is not None
    dynamic = sum(cl.plan.num_dynamic for cl in layers.values())
    assert dynamic == (H * LAYERS if policy == "all_dynamic" else 0)  # random keys: retrieval does not pay


def test_the_watch_follows_device_values_only():
    """Values computed from a device input are watched, host data is not (so the test above can fail)."""
    dev, host = torch.randn(3, 5), torch.arange(4)
    watch = HostReadWatch(device_inputs=(dev,))
    with watch.host_reads():
        int(host.max()), host.tolist(), host.nonzero()  # host bookkeeping: free
        derived = (dev * 2).sum(0)
        int(derived.argmax()), derived.cpu()
        copy = dev.cpu()  # the host copy is host data
        copy.tolist()
    assert watch.seen == ["aten._local_scalar_dense.default", "Tensor.cpu", "Tensor.cpu"]
