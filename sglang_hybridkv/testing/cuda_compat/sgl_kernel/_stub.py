"""Stand-ins for ``sgl_kernel`` ops that the served path imports but never calls."""

from typing import Callable, NoReturn


def unsupported(name: str, feature: str) -> Callable[..., NoReturn]:
    def op(*args, **kwargs) -> NoReturn:
        raise NotImplementedError(f"{name} ({feature}) is not in the CUDA sgl_kernel stand-in of sglang-hybridkv")

    op.__name__ = name.rsplit(".", 1)[-1]
    return op
