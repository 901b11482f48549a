"""Compression policies behind one base class; :func:`make_policy` maps a config's ``policy`` to one."""

from __future__ import annotations

from ...config import HybridKVConfig
from .all_dynamic import AllDynamicPolicy
from .all_static import AllStaticPolicy
from .base import CompressionPolicy
from .full import FullPolicy
from .hybridkv import HybridKVPolicy
from .snapkv import SnapKVPolicy

POLICY_CLASSES: dict[str, type[CompressionPolicy]] = {
    p.name: p for p in (FullPolicy, SnapKVPolicy, HybridKVPolicy, AllStaticPolicy, AllDynamicPolicy)
}


def make_policy(config: HybridKVConfig) -> CompressionPolicy:
    """The policy object for ``config.policy`` ("none" has no policy: the caller must not compress)."""
    if config.policy not in POLICY_CLASSES:
        raise ValueError(f"policy={config.policy!r} does not compress; choose one of {sorted(POLICY_CLASSES)}")
    return POLICY_CLASSES[config.policy](config)


__all__ = ["CompressionPolicy", "POLICY_CLASSES", "make_policy", "FullPolicy", "SnapKVPolicy",
           "HybridKVPolicy", "AllStaticPolicy", "AllDynamicPolicy"]
