"""Tensor parallelism in core: ranks that each plan a slice of a layer's KV heads, gathering the per-head
figures the allocation needs, get exactly that slice of the one-rank plan, and the same digest.

The "collective" is in-process: one thread per rank, a barrier per gather (what SGLang's gloo group does
across processes)."""

import threading

import pytest
import torch

from sglang_hybridkv.config import HybridKVConfig
from sglang_hybridkv.core.compress import plan_layer, prompt_media_mask
from sglang_hybridkv.core.digest import kept_digest
from sglang_hybridkv.core.policies import make_policy
from sglang_hybridkv.core.shard import HeadShard, gather_heads

D, GROUP, SEQ, W = 16, 2, 400, 8


class _Group:
    """``n`` in-process ranks; ``gather`` concatenates every rank's tensor in rank order."""

    def __init__(self, n: int) -> None:
        self.n, self.barrier, self.slots, self.calls = n, threading.Barrier(n, timeout=30), [None] * n, [0] * n

    def shard(self, rank: int) -> HeadShard:
        def gather(t):
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()
            return out
        return HeadShard(rank, self.n, gather)

    def run(self, fn):
        """``fn(shard)`` on every rank at once; returns the results in rank order."""
        out, errors = [None] * self.n, []

        def one(r):
            try:
                out[r] = fn(self.shard(r))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def _mixed_layer(h=4):
    """Heads ``0, 1``: window query ``i`` looks sharply at media chunk ``3 i`` (retrieval pays: dynamic);
    the others random (spread, but static selection covers as much: static after settling)."""
    g = torch.Generator().manual_seed(5)
    k = 0.1 * torch.randn(h, SEQ, D, generator=g)
    q = torch.randn(h * GROUP, W, D, generator=g)
    q[: 2 * GROUP] = 0
    for i in range(W):
        start = 4 + 3 * i * 16
        k[:2, start:start + 16, i] = 6.0
        q[: 2 * GROUP, i, i] = 6.0
    k[2:] = torch.randn(h - 2, SEQ, D, generator=g)
    return q, k


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("policy,budget", [("hybridkv", 0.1), ("hybridkv", 0.2), ("hybridkv", 1.0), ("snapkv", 0.1),
                                           ("all_dynamic", 0.2), ("all_static", 0.1), ("full", 1.0)])
def test_each_rank_plans_its_slice_of_the_one_rank_plan(ranks, policy, budget):
    q, k = _mixed_layer()
    media = prompt_media_mask(SEQ, W, None)
    pol = make_policy(HybridKVConfig(policy=policy, budget=budget, window=W))
    one = plan_layer(pol, q, k, media, 0, D ** -0.5)
    if (policy, budget) == ("hybridkv", 0.2):
        assert one.num_dynamic == 2 and one.num_static == 2  # the layer mixes both types
    h = k.shape[0] // ranks
    group = _Group(ranks)

    def rank_plan(shard):
        r = shard.rank
        plan = plan_layer(pol, q[r * h * GROUP:(r + 1) * h * GROUP], k[r * h:(r + 1) * h], media, 0, D ** -0.5,
                          shard)
        return plan, kept_digest({0: plan}, shard.gather)

    for r, (plan, digest) in enumerate(group.run(rank_plan)):
        heads = slice(r * h, (r + 1) * h)
        assert torch.equal(plan.static, one.static[heads]) and plan.top_k == one.top_k
        assert torch.equal(plan.keep_len, one.keep_len[heads])
        for j in range(h):
            n = int(plan.keep_len[j])
            assert torch.equal(plan.keep_idx[j, :n], one.keep_idx[r * h + j, :n])
        if plan.num_dynamic:
            assert torch.equal(plan.host_idx, one.host_idx)
        assert digest == kept_digest({0: one})
    assert len(set(group.calls)) == 1  # every rank made the same collectives


def test_gather_heads_keeps_dtypes_and_is_a_no_op_on_one_rank():
    a, b = torch.tensor([3, 7]), torch.tensor([True, False])
    assert gather_heads(None, a, b)[0] is a
    got = _Group(2).run(lambda s: gather_heads(s, a + s.rank, b))
    assert got[0][0].tolist() == [3, 7, 4, 8] and got[1][1].dtype == torch.bool
    with pytest.raises(ValueError, match="rank=2"):
        HeadShard(2, 2, lambda t: t)


def test_head_profile_is_sliced_per_rank(tmp_path):
    q, k = _mixed_layer()
    path = tmp_path / "profile.json"
    path.write_text('{"static": [[true, false, false, true]]}')
    pol = make_policy(HybridKVConfig(policy="hybridkv", budget=0.2, window=W, head_profile=str(path)))
    media = prompt_media_mask(SEQ, W, None)
    one = plan_layer(pol, q, k, media, 0, D ** -0.5)
    plans = _Group(2).run(lambda s: plan_layer(pol, q[s.rank * 4:(s.rank + 1) * 4], k[s.rank * 2:(s.rank + 1) * 2],
                                               media, 0, D ** -0.5, s))
    assert torch.cat([p.static for p in plans]).tolist() == one.static.tolist()
