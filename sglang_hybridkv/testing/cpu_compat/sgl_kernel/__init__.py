"""CPU stand-in for SGLang's compiled `sgl_kernel` (test and CPU-demo infrastructure, never used on a GPU).

With `SGLANG_USE_CPU_ENGINE=1`, SGLang 0.5.23 imports CPU kernels from `sgl_kernel` when modules are imported,
but on a CPU without AMX it runs its torch `forward_native` paths and never calls them. Every attribute here
is a stub that raises `NotImplementedError` naming the op, so a stub that does get called fails loudly. The
schema-only `torch.ops.sgl_kernel.*` names are the ones SGLang reads at import time; capability probes are
left out so that SGLang picks its native path. Submodules are stubbed only when listed in
`SGL_SHIM_SUBMODULES` (SGLang relies on ImportError from some of them to choose its fallback).
"""

import importlib.abc
import importlib.machinery
import os
import sys
import types

__version__ = "0.0.0+hybridkv-cpu-shim"


def _stub(name):
    def f(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel shim: {name} not implemented on CPU")

    f.__name__ = name.rsplit(".", 1)[-1]
    return f


def _getattr_for(modname):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{modname}.{name}")

    return __getattr__


__getattr__ = _getattr_for("sgl_kernel")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        subs = {x for x in os.environ.get("SGL_SHIM_SUBMODULES", "").split(",") if x}
        if fullname.startswith("sgl_kernel.") and fullname.split(".")[1] in subs:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = _getattr_for(spec.name)
        return m

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())

# Every torch.ops.sgl_kernel.X that sglang/srt references, minus capability probes (SGLang 0.5.23).
_IMPORT_TIME_OPS = """
    apply_multidimensional_rope_cpu apply_rotary_pos_emb_cpu biased_grouped_topk_cpu bmm_cpu 
    causal_conv1d_weight_pack conv3d_embed_cpu conv3d_embed_weight_pack convert_weight_packed_scale_zp 
    decode_attention_cpu extend_attention_cpu flash_attn_varlen_func fp8_per_tensor_scaled_mm_cpu 
    fp8_scaled_mm_cpu fused_add_rmsnorm_cpu fused_dual_residual_rmsnorm_cpu fused_experts_cpu 
    fused_gdn_gating_cpu fused_input_proj_cpu fused_linear_sigmoid_mul fused_moe_router_cpu 
    fused_qk_gemma_rmsnorm_cpu fused_qk_gemma_rmsnorm_with_gate_cpu fused_qk_rmsnorm_apply_from_stats_cpu 
    fused_qk_rmsnorm_cpu fused_qk_rmsnorm_sumsq_cpu fused_qkvzba_split_reshape_cat_contiguous_cpu 
    fused_qkvzba_split_reshape_cat_cpu fused_sigmoid_gating_delta_rule_update_cpu fused_sigmoid_mul_cpu 
    gelu_and_mul_cpu gelu_tanh_and_mul_cpu gemma3_rmsnorm_cpu gemma4_rmsnorm_cpu gemma_fused_add_rmsnorm_cpu 
    gemma_rmsnorm_cpu grouped_topk_cpu image_preprocess_cpu int4_scaled_mm_cpu int8_scaled_mm_with_quant 
    l2norm_cpu layernorm_cpu multimodal_rotary_embedding_cpu qkv_proj_with_rope_fused_weight query_device 
    rmsnorm_cpu rotary_embedding rotary_embedding_cpu shared_expert_cpu shm_allgather shm_allreduce 
    silu_and_mul_cpu store_cache_cpu topk_sigmoid_cpu topk_softmax_cpu weight_packed_linear 
"""


def _define_stub_ops():
    import torch

    global _LIB
    _LIB = torch.library.Library("sgl_kernel", "FRAGMENT")
    for op in _IMPORT_TIME_OPS.split():
        try:
            _LIB.define(f"{op}(Tensor[] args) -> ()")

            def _impl(args, _op=op):
                raise NotImplementedError(f"sgl_kernel shim: torch.ops.sgl_kernel.{_op}")

            _LIB.impl(op, _impl, "CompositeExplicitAutograd")
        except Exception:  # already defined by a real build
            pass


_define_stub_ops()
