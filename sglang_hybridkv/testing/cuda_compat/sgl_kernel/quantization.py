"""``sgl_kernel.quantization``: GGUF kernels, imported by SGLang's GGUF quantization layer (not served here)."""

from ._stub import unsupported

_NAMES = "ggml_dequantize ggml_moe_a8 ggml_mul_mat_a8 ggml_mul_mat_vec_a8".split()
globals().update({n: unsupported(f"sgl_kernel.quantization.{n}", "GGUF quantization") for n in _NAMES})
