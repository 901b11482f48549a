"""CUDA stand-in for SGLang's compiled ``sgl_kernel``: SGLang 0.5.23 serving Llama / Qwen2 / Qwen2-VL on a GPU
with ``--attention-backend triton`` (or ``hybridkv``), the pytorch sampler and
``SGLANG_FORCE_FUSED_OP_BACKEND=torch``, where the real wheel (built against another torch) cannot be installed.

Every name SGLang imports from ``sgl_kernel`` on that path is defined here, explicitly: a name SGLang starts to
import and this module lacks fails the simulated-CUDA import test (``launch_imports.py`` beside this package)
on a CPU, not on the GPU machine. No module-level ``__getattr__``, for the same reason. Ops the path can call are
plain torch; ops only imported by features this project refuses or does not serve (quantized GEMMs, MoE, the
HiCache host pool in ``kvcacheio``, GGUF kernels in ``quantization``) raise ``NotImplementedError`` naming the
op. Submodules SGLang probes for an ImportError to pick a fallback (``flash_attn``, ``scalar_type``,
``allreduce``, ``mamba``, ``elementwise``) are deliberately absent. Importing it also installs stand-ins for
the few SGLang modules the GPU machine cannot import as shipped (``sglang_modules``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sglang_modules
from ._stub import unsupported

sglang_modules.install()  # SGLang modules whose own imports the GPU machine lacks (see sglang_modules)

__version__ = "0.0.0+hybridkv-cuda-stand-in"


# ---- norms (layernorm.py imports them on CUDA; forward_native runs with the forced torch backend) ----------
def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
            enable_pdl: bool | None = None) -> torch.Tensor:
    y = (_rms(input, eps) * weight.float()).to(input.dtype)
    return y if out is None else out.copy_(y)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """In place, as the kernel: ``residual += input``; ``input = rmsnorm(residual)``."""
    residual.add_(input)
    input.copy_(rmsnorm(residual, weight, eps))


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                  enable_pdl: bool | None = None) -> torch.Tensor:
    y = (_rms(input, eps) * (1.0 + weight.float())).to(input.dtype)
    return y if out is None else out.copy_(y)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                            enable_pdl: bool | None = None) -> None:
    residual.add_(input)
    input.copy_(gemma_rmsnorm(residual, weight, eps))


# ---- gated activations (activation.py): ``act(x[..., :d]) * x[..., d:]`` ---------------------------------
def _gated(act, input: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d = input.shape[-1] // 2
    y = act(input[..., :d]) * input[..., d:]
    return y if out is None else out.copy_(y)


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None) -> torch.Tensor:
    return _gated(F.silu, input, out)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None) -> torch.Tensor:
    return _gated(F.gelu, input, out)


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None,
                      enable_pdl: bool | None = None) -> torch.Tensor:
    return _gated(lambda x: F.gelu(x, approximate="tanh"), input, out)


# ---- sampling (sampler.py): renormalise each row over its top-k / top-p tokens ----------------------------
def top_k_renorm_prob(probs: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """``probs`` ``(batch, vocab)``; ``top_k`` per row (or one int): the k largest kept, rows summing to 1."""
    k = torch.as_tensor(top_k, device=probs.device).expand(probs.shape[0]).clamp(1, probs.shape[1])
    sorted_probs = probs.sort(dim=-1, descending=True).values
    pivot = sorted_probs.gather(1, (k - 1).long()[:, None])
    kept = torch.where(probs >= pivot, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """``probs`` ``(batch, vocab)``; keeps, per row, the most likely tokens until their mass reaches ``top_p``."""
    p = torch.as_tensor(top_p, device=probs.device, dtype=probs.dtype).expand(probs.shape[0])
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_kept = torch.where(mass_before < p[:, None], sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(1, order, sorted_kept)
    return kept / kept.sum(-1, keepdim=True)


# ---- breakable CUDA graphs (runner_backend_utils/weak_ref_tensor.py) ----------------------------------------
def weak_ref_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over ``tensor``'s memory that does not keep it alive (the kernel's ``from_blob``): breakable
    graphs hand captured intermediates back to the graph pool this way. Same shape, strides and dtype."""
    if tensor.numel() == 0:
        return tensor
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    storage = torch._C._construct_storage_from_data_pointer(tensor.data_ptr(), tensor.device,
                                                             span * tensor.element_size())
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(storage, 0, tensor.shape, tensor.stride())


# ---- imported by quantized and MoE layers: never run for the dense models this stand-in serves ------------
int8_scaled_mm = unsupported("sgl_kernel.int8_scaled_mm", "int8 quantized GEMM")
moe_sum = unsupported("sgl_kernel.moe_sum", "MoE")
moe_sum_reduce = unsupported("sgl_kernel.moe_sum_reduce", "MoE")
