"""``sgl_kernel.utils``: the Triton attention backend asks whether to launch with programmatic dependent launch."""


def is_arch_support_pdl() -> bool:
    """False: no kernel here is built for PDL, so SGLang launches its Triton kernels without it."""
    return False
