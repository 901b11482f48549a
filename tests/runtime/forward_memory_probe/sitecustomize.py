"""Test probe, loaded into every process of a test server through PYTHONPATH (``test_overlap_schedule.py``):
records each pool-slot allocation or free and each radix eviction made while SGLang's ``ModelRunner.forward``
runs, with the stack that made it, one JSON line per call in ``$HYBRIDKV_FORWARD_MEMORY_LOG``. Not the code
under test: it only observes SGLang's own allocator, radix cache and model runner."""

import os

_LOG = os.environ.get("HYBRIDKV_FORWARD_MEMORY_LOG")


def _install() -> None:
    import functools
    import json
    import traceback

    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.model_executor.model_runner import ModelRunner

    depth = [0]

    def forward(orig):
        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            depth[0] += 1
            try:
                return orig(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    def watched(name, orig):
        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if depth[0]:
                stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack(limit=12)[:-1]]
                with open(_LOG, "a") as f:
                    f.write(json.dumps({"call": name, "pid": os.getpid(), "stack": stack}) + "\n")
            return orig(*args, **kwargs)
        return wrapper

    ModelRunner.forward = forward(ModelRunner.forward)
    for cls, names in ((TokenToKVPoolAllocator, ("alloc", "free")), (RadixCache, ("evict",))):
        for name in names:
            setattr(cls, name, watched(f"{cls.__name__}.{name}", getattr(cls, name)))


if _LOG:
    _install()
