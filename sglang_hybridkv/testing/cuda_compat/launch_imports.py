"""Import SGLang 0.5.23's server launch path as a CUDA machine would, on a machine without one.

    python sglang_hybridkv/testing/cuda_compat/launch_imports.py

``torch.cuda`` is made to report one Hopper device (nothing is allocated on it), the CUDA ``sgl_kernel`` stand-in
beside this file comes first on ``sys.path`` and the environment is the one ``scripts/gpu_server_check.sh`` sets,
so a symbol SGLang imports from ``sgl_kernel`` on CUDA that the stand-in lacks fails here, not on the lent GPU.
The MLP's GEMM choice is asked as Llama's layer constructor asks it. Then the layers a Llama / Qwen2-VL forward
runs outside attention (RMSNorm, SiluAndMul, RoPE, M-RoPE) run once
on CPU tensors and must dispatch to their torch paths: on the GPU the ``sgl_kernel`` ones would not be there.
``scripts/gpu_bundle.sh`` runs it over only the GPU machine's packages and the bundle. Exit status 0 when all
of it works; otherwise the traceback of the first failure.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
# What `scripts/gpu_server_check.sh` exports on the GPU machine.
ENV = {"SGLANG_FORCE_FUSED_OP_BACKEND": "torch", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
       "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python"}
# The launcher, HTTP server, tokenizer manager, scheduler, model runner and loader, the Triton attention backend,
# breakable decode graphs, the pytorch sampler, the model families we serve, and the plugin.
MODULES = """
    sglang.launch_server sglang.srt.entrypoints.http_server sglang.srt.managers.tokenizer_manager
    sglang.srt.managers.detokenizer_manager sglang.srt.managers.scheduler sglang.srt.model_executor.model_runner
    sglang.srt.model_loader.loader sglang.srt.layers.attention.triton_backend sglang.srt.layers.sampler
    sglang.srt.model_executor.runner.decode_cuda_graph_runner
    sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend
    sglang.srt.model_executor.runner_backend_utils.weak_ref_tensor
    sglang.srt.models.llama sglang.srt.models.qwen2 sglang.srt.models.qwen2_vl sglang.srt.models.qwen2_5_vl
    sglang_hybridkv.runtime.plugin sglang_hybridkv.runtime.backend
""".split()


def simulate_cuda() -> None:
    """Make ``torch.cuda`` report one H200 (compute capability 9.0) without touching a driver."""
    import torch

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 << 30,
                                  multi_processor_count=132, L2_cache_size=60 << 20)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_name = lambda device=None: props.name
    torch.cuda.get_device_properties = lambda device=None: props


def check_forward_ops() -> list[str]:
    """Run the non-attention layers of Llama / Qwen2 / Qwen2-VL once; returns ``op:backend`` per call."""
    import torch
    from sglang.kernels.fused_op import enable_fused_op_trace, get_fused_op_trace
    from sglang.srt.layers.activation import SiluAndMul
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.rotary_embedding import get_rope

    enable_fused_op_trace()
    x, q, k = torch.randn(3, 64), torch.randn(3, 4 * 64), torch.randn(3, 2 * 64)
    norm = RMSNorm(64)
    norm(x)
    norm(x, x.clone())
    SiluAndMul()(torch.randn(3, 128))
    get_rope(64, 64, 128, 10000, True)(torch.arange(3), q, k)
    mrope = get_rope(64, 64, 128, 10000, True, rope_scaling={"rope_type": "default", "mrope_section": [8, 12, 12]})
    mrope(torch.arange(3).expand(3, 3).contiguous(), q, k)
    return [f"{r.op}:{r.backend}" for r in get_fused_op_trace()]


def check_mlp_gemm_choice() -> None:
    """The Llama / Qwen2 MLP asks SGLang's CuTe DSL dual GEMM whether it applies on every CUDA device (its module
    imports ``cutlass``, absent on the GPU machine); the answer on Hopper must be "no": plain GEMMs."""
    import torch
    from sglang.srt.layers.dual_gemm import DualGemm
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    gate_up = types.SimpleNamespace(quant_method=UnquantizedLinearMethod(), params_dtype=torch.bfloat16,
                                    output_partition_sizes=[14336, 14336])
    probe = DualGemm.__new__(DualGemm)
    probe.down_proj, probe.tp_size, probe.max_tokens = None, 1, 0
    if probe._select_mode(gate_up, 4096) is not None:
        raise RuntimeError("the MLP chose SGLang's CuTe DSL dual GEMM, which the GPU machine cannot run")


def main() -> int:
    os.environ.update(ENV)
    sys.path.insert(0, HERE)
    simulate_cuda()
    for name in MODULES:
        importlib.import_module(name)
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils.common import is_cuda

    if not is_cuda():  # torch.version.cuda is None on a CPU-only torch build: SGLang took its CPU imports
        raise RuntimeError("SGLang did not see CUDA: the simulation needs a CUDA build of torch")

    load_plugins()
    import sgl_kernel.utils

    if not sgl_kernel.__file__.startswith(HERE):
        raise ImportError(f"sgl_kernel came from {sgl_kernel.__file__}, not the stand-in in {HERE}")
    print(f"imported {len(MODULES)} launch-path modules with CUDA simulated")
    check_mlp_gemm_choice()
    print("MLP: plain GEMMs (no CuTe DSL dual GEMM)")
    ops = check_forward_ops()
    print("forward ops:", " ".join(ops))
    if len(ops) != 5 or any(not op.endswith(":torch") for op in ops):
        raise RuntimeError(f"expected 5 fused-op calls on their torch paths, got {ops}")
    if sgl_kernel.utils.is_arch_support_pdl():
        raise RuntimeError("is_arch_support_pdl() must be False: the stand-in launches nothing with PDL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
