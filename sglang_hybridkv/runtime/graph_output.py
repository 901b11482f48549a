"""Let SGLang 0.5.23's breakable decode CUDA graphs keep a language model's output.

The breakable backend copies each captured forward's output into one buffer shared by every graph size, and its
buffer helpers (``_alloc_full_buffer``, ``_copy_output_to_buffer``, ``_slice_output``) know tensors, tuples,
lists and ``PPProxyTensors`` only. A language model's decode forward returns a ``LogitsProcessorOutput``
(a dataclass), so capture stops with ``TypeError: Unsupported BCG output type`` (seen on the lent H200,
2026-12-04; upstream sgl-project/sglang#36749 proposes the same support). Around each helper, a dataclass output
is handled field by field: tensor fields go through SGLang's own helper, ``None`` fields stay ``None``; any other
field value cannot live in a graph buffer and stops capture with a message naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

_BCG = "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend"
TARGETS = (f"{_BCG}._alloc_full_buffer", f"{_BCG}._slice_output", f"{_BCG}._copy_output_to_buffer")


def install(registry, hook_type) -> None:
    registry.register(TARGETS[0], _per_field, hook_type.AROUND)
    registry.register(TARGETS[1], _per_field, hook_type.AROUND)
    registry.register(TARGETS[2], _copy_per_field, hook_type.AROUND)


def _is_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _tensor_fields(output: Any) -> list[str]:
    """Names of the fields that hold tensors; raises for a field the buffer cannot hold."""
    names = []
    for field in dataclasses.fields(output):
        value = getattr(output, field.name)
        if torch.is_tensor(value):
            names.append(field.name)
        elif value is not None:
            raise TypeError(f"hybridkv: breakable decode graphs cannot keep {type(output).__name__}.{field.name} "
                            f"({type(value).__name__}); only tensor and None fields fit the graph output buffer")
    return names


def _per_field(orig: Callable, self, output: Any, rows: int) -> Any:
    """``_alloc_full_buffer(output, size)`` / ``_slice_output(output, num_tokens)`` for a dataclass output: the
    same dataclass with each tensor field allocated (sliced) by SGLang's helper."""
    if not _is_instance(output):
        return orig(self, output, rows)
    return dataclasses.replace(output, **{name: orig(self, getattr(output, name), rows)
                                          for name in _tensor_fields(output)})


def _copy_per_field(orig: Callable, self, output: Any, output_buffer: Any, num_tokens: int) -> None:
    """``_copy_output_to_buffer`` for a dataclass output: each tensor field into the buffer's same field."""
    if not (_is_instance(output) or _is_instance(output_buffer)):
        return orig(self, output, output_buffer, num_tokens)
    if type(output) is not type(output_buffer) or _tensor_fields(output) != _tensor_fields(output_buffer):
        raise ValueError("hybridkv: the breakable decode graph's output changed structure between capture sizes: "
                         f"{type(output).__name__} vs {type(output_buffer).__name__}")
    for name in _tensor_fields(output):
        orig(self, getattr(output, name), getattr(output_buffer, name), num_tokens)
