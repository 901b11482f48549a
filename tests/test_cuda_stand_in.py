"""The CUDA ``sgl_kernel`` stand-in that the GPU bundle runs SGLang with: SGLang's server launch path imports on a
simulated CUDA machine (a symbol SGLang needs and the stand-in lacks fails here, in CI, not on the lent GPU), the
layers outside attention dispatch to torch, and the stand-in's torch ops compute what the kernels compute."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sglang_hybridkv.testing

CUDA_COMPAT = os.path.join(os.path.dirname(sglang_hybridkv.testing.__file__), "cuda_compat")


def _stand_in():
    """The stand-in package under a private name, so that this process's ``sgl_kernel`` stays untouched."""
    package = os.path.join(CUDA_COMPAT, "sgl_kernel")
    spec = importlib.util.spec_from_file_location("cuda_sgl_kernel", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sk = _stand_in()


def test_sglang_launch_path_imports_with_cuda_simulated():
    pytest.importorskip("sglang")
    # A clean child: no CPU stand-in, no CPU engine, no Triton interpreter, as on the GPU machine.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, os.path.join(CUDA_COMPAT, "launch_imports.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-6000:]}"
    assert "imported 18 launch-path modules with CUDA simulated" in r.stdout
    assert "MLP: plain GEMMs (no CuTe DSL dual GEMM)" in r.stdout  # on the H200 it first failed: no cutlass
    assert "forward ops: RMSNorm:torch RMSNorm:torch SiluAndMul:torch RotaryEmbedding:torch MRotaryEmbedding:torch" \
        in r.stdout


def test_norms_match_the_formula_in_place_as_the_kernels():
    g = torch.Generator().manual_seed(0)
    x, res, w = (torch.randn(5, 64, generator=g) for _ in range(3))
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(sk.rmsnorm(x, w), want)
    torch.testing.assert_close(sk.gemma_rmsnorm(x, w), want / w * (1 + w))
    out = torch.empty_like(x)
    assert sk.rmsnorm(x, w, out=out) is out
    xi, ri = x.clone(), res.clone()
    assert sk.fused_add_rmsnorm(xi, ri, w) is None
    torch.testing.assert_close(ri, x + res)
    torch.testing.assert_close(xi, sk.rmsnorm(x + res, w))
    xi, ri = x.clone(), res.clone()
    sk.gemma_fused_add_rmsnorm(xi, ri, w)
    torch.testing.assert_close(xi, sk.gemma_rmsnorm(x + res, w))
    half = sk.rmsnorm(x.bfloat16(), w.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, rtol=2e-2, atol=2e-2)


def test_gated_activations():
    x = torch.randn(4, 2 * 48)
    a, b = x[:, :48], x[:, 48:]
    torch.testing.assert_close(sk.silu_and_mul(x), F.silu(a) * b)
    torch.testing.assert_close(sk.gelu_and_mul(x), F.gelu(a) * b)
    torch.testing.assert_close(sk.gelu_tanh_and_mul(x), F.gelu(a, approximate="tanh") * b)
    out = torch.empty(4, 48)
    assert sk.silu_and_mul(x, out) is out and torch.equal(out, F.silu(a) * b)


def test_top_k_and_top_p_renormalise_each_row():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]])
    torch.testing.assert_close(sk.top_k_renorm_prob(probs, torch.tensor([2, 1])),
                               torch.tensor([[0, 4 / 7, 0, 3 / 7], [0, 0, 1.0, 0]]))
    torch.testing.assert_close(sk.top_k_renorm_prob(probs, 4), probs)
    # Row 0: 0.4 < 0.5, 0.4 + 0.3 reaches it -> {0.4, 0.3}; row 1 at p=0.3: 0.4 alone.
    torch.testing.assert_close(sk.top_p_renorm_prob(probs, torch.tensor([0.5, 0.3])),
                               torch.tensor([[0, 4 / 7, 0, 3 / 7], [0, 0, 1.0, 0]]))
    torch.testing.assert_close(sk.top_p_renorm_prob(probs, 1.0), probs)


def test_weak_ref_tensor_aliases_memory_without_owning_it():
    base = torch.arange(24.0).view(4, 6)
    view = base[1:, ::2]  # offset and strides
    weak = sk.weak_ref_tensor(view)
    assert weak.shape == view.shape and weak.stride() == view.stride() and weak.data_ptr() == view.data_ptr()
    assert torch.equal(weak, view)
    weak.fill_(-1)  # writes land in the original
    assert torch.equal(view, torch.full_like(view, -1))
    assert weak.untyped_storage().data_ptr() == view.data_ptr()
    assert sk.weak_ref_tensor(torch.empty(0)).numel() == 0


def test_pdl_off_and_unserved_ops_fail_by_name():
    from cuda_sgl_kernel import kvcacheio, quantization, utils

    assert utils.is_arch_support_pdl() is False
    for op, name in ((sk.int8_scaled_mm, "sgl_kernel.int8_scaled_mm"),
                     (kvcacheio.transfer_kv_per_layer, "sgl_kernel.kvcacheio.transfer_kv_per_layer"),
                     (quantization.ggml_dequantize, "sgl_kernel.quantization.ggml_dequantize")):
        with pytest.raises(NotImplementedError, match=name.replace(".", r"\.")):
            op(torch.zeros(1))
