"""Apply some of the hooks the plugin's scheduler install registers, with SGLang's own ``HookRegistry``, so a test
can run SGLang's real functions as the server runs them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_hybridkv.runtime import scheduler_hooks


@contextlib.contextmanager
def scheduler_hooks_applied(targets: set[str] | tuple[str, ...]) -> Iterator[list[tuple]]:
    """The plugin's hooks on ``targets`` (only those) applied; the registry reset afterwards. Yields the
    ``(target, fn, hook_type)`` applied. The caller restores what the hooks patched."""
    registered = []

    class Recorder:
        register = staticmethod(lambda target, fn, hook_type: registered.append((target, fn, hook_type)))

    scheduler_hooks.install(Recorder, HookType)
    hooks = [h for h in registered if h[0] in targets]
    HookRegistry.reset()
    for hook in hooks:
        HookRegistry.register(*hook)
    HookRegistry.apply_hooks()
    try:
        yield hooks
    finally:
        HookRegistry.reset()
