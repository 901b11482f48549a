"""A wall-clock stack sampler for SGLang's server processes, with nothing to install (the lent GPU machine has no
py-spy and may not allow ptrace). Loaded through PYTHONPATH when ``HYBRIDKV_STACK_SAMPLES`` names a file prefix:
a daemon thread samples every other thread's Python stack every ``HYBRIDKV_STACK_INTERVAL_MS`` (default 5) and
rewrites ``<prefix>.<pid>.txt`` every 2 s in the collapsed format (``thread;outer;...;inner count``) that
``benchmarks/stack_summary.py`` and flame-graph tools read. A thread waiting on the GPU (a host sync) shows at
the Python line that waits.
"""

import os

_PREFIX = os.environ.get("HYBRIDKV_STACK_SAMPLES")


def _start(prefix: str) -> None:
    import collections
    import sys
    import threading
    import time

    interval = float(os.environ.get("HYBRIDKV_STACK_INTERVAL_MS", "5")) / 1000
    counts: collections.Counter = collections.Counter()
    path = f"{prefix}.{os.getpid()}.txt"

    def frame_name(f) -> str:
        code = f.f_code
        return f"{code.co_name} ({os.path.basename(code.co_filename)}:{f.f_lineno})"

    def sample() -> None:
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        last_write = time.monotonic()
        while True:
            time.sleep(interval)
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None:
                    stack.append(frame_name(frame))
                    frame = frame.f_back
                counts[";".join([names.get(ident, str(ident))] + stack[::-1])] += 1
            if time.monotonic() - last_write > 2:
                last_write = time.monotonic()
                with open(path + ".tmp", "w") as f:
                    f.writelines(f"{k} {v}\n" for k, v in counts.items())
                os.replace(path + ".tmp", path)

    threading.Thread(target=sample, name="hybridkv-stack-sampler", daemon=True).start()


if _PREFIX:
    _start(_PREFIX)
