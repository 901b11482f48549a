"""Watching for host reads of device values on a CPU-only machine.

On CPU every tensor is a host tensor, so a test cannot see a GPU stream block. It can see what would block one:
scalar reads (``.item()``, ``int()``, ``bool()``), ``.tolist()`` / ``.numpy()`` / ``.cpu()``, and ops whose output
size depends on values (``nonzero``, boolean-mask indexing, ``repeat_interleave`` without an output size). On a
GPU, ``torch.cuda.set_sync_debug_mode`` checks the same code for real.

Which tensors would live on the device: either every tensor except ``allowed`` (what SGLang hands over on the
host), or, with ``device_inputs``, those inputs and every tensor computed from them (taint tracking), so that
code mixing host bookkeeping with device work can be checked.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}
_INDEX = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)


class HostReadWatch(TorchDispatchMode):
    """Records every read of a device value on the host (``seen``, in order).

    Args:
        allowed: tensors that are host data in the code under test (never counted).
        device_inputs: when given, only these and tensors computed from them are device values; None: all are.
    """

    def __init__(self, allowed: tuple[torch.Tensor, ...] = (), device_inputs: tuple[torch.Tensor, ...] | None = None
                 ) -> None:
        super().__init__()
        self.allowed, self.seen = allowed, []
        self.track = device_inputs is not None
        self._device: dict[int, weakref.ref] = {}
        for t in device_inputs or ():
            self._mark(t)

    def _mark(self, t: torch.Tensor) -> None:
        self._device[id(t)] = weakref.ref(t)

    def on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or any(t is a for a in self.allowed):
            return False
        if not self.track:
            return True
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        device_in = any(self.on_device(x) for x in inputs)
        if device_in and func in _DATA_DEPENDENT and not (func is aten.repeat_interleave.Tensor
                                                           and kwargs.get("output_size")):
            self.seen.append(str(func))
        if func in _INDEX and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and self.on_device(i)
                                  for i in args[1] if i is not None):
            self.seen.append(f"{func} with a boolean mask")
        out = func(*args, **kwargs)
        if self.track and device_in:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark(t)
        return out

    @contextlib.contextmanager
    def host_reads(self):
        """Enter the watch, also recording ``.tolist()`` / ``.numpy()`` / ``.cpu()`` (not dispatched ops)."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

        def watched(name):
            def read(t, *a, **k):
                if self.on_device(t):
                    self.seen.append(f"Tensor.{name}")
                    if name == "cpu":  # the host copy is host data
                        copy = originals["cpu"](t, *a, **k).clone()
                        self._device.pop(id(copy), None)
                        return copy
                return originals[name](t, *a, **k)
            return read

        for name in originals:
            setattr(torch.Tensor, name, watched(name))
        try:
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
