"""Stand-in for ``sglang.kernels.ops.gemm.cutedsl_dual_gemm`` (found through ``sgl_kernel.sglang_modules``):
SGLang's Llama MLP imports that module on every CUDA device to ask whether its CuTe DSL dual GEMM
applies, and the module imports ``cutlass`` (nvidia-cutlass-dsl), which the GPU machine lacks. The kernel is
SM100-only, so on Hopper SGLang's own answer is "no" too; this one always says no, and the MLP runs its plain
GEMMs."""

from enum import IntEnum

MAX_DUAL_GEMM_DECODE_TOKENS = 16


class DualGemmQuantMode(IntEnum):
    STATIC_PER_TENSOR = 0
    STATIC_PER_TOKEN = 1
    DYNAMIC_PER_TENSOR = 2
    DYNAMIC_PER_TOKEN = 3
    UNQUANT = 4

    @property
    def is_quantized(self) -> bool:
        return self is not self.UNQUANT


def can_use_dual_gemm(num_tokens: int, hidden_size: int, intermediate_size: int,
                      quant_mode: DualGemmQuantMode) -> bool:
    return False
