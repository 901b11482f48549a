"""SGLang modules that the GPU machine cannot import as shipped, answered from stand-ins in ``../sglang_files/``.

SGLang on CUDA imports ``sgl_kernel`` before it builds any layer, so the stand-in package installs this finder
when it is imported (SGLang's processes then find these modules here, whatever imported them first). Each entry
is a module SGLang imports unconditionally on CUDA whose own imports are absent there; its stand-in gives the
answer SGLang itself gives on a Hopper GPU.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

FILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sglang_files")
# SGLang module -> stand-in file. cutedsl_dual_gemm: the Llama / Qwen2 MLP asks it on every CUDA device whether
# its CuTe DSL dual GEMM applies; it imports ``cutlass`` (nvidia-cutlass-dsl), and the kernel is SM100-only.
MODULES = {"sglang.kernels.ops.gemm.cutedsl_dual_gemm": "cutedsl_dual_gemm.py"}


class _StandIns(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(FILES, MODULES[name]))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _StandIns) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandIns())
