"""GPU decode path through FlashInfer's paged decode, and the per-shape choice between it and Triton.

Each flattened (request, KV head) sequence is one FlashInfer "request" with ``num_kv_heads=1`` and the GQA group
as ``num_qo_heads``; pages are ours (``(num_pages, page_size, head_dim)`` viewed as NHD with one head). One plan
per decode step serves every layer whose page lists are the same (static-only batches); layers with dynamic
heads re-plan after retrieval.

FlashInfer's CUDA-core decode supports group sizes 1, 2, 3, 4 and 8 only (flashinfer issue 996) and its
tensor-core path was reported degenerate in bf16 at group 7 (issue 2896): :func:`choose_decode_path` therefore
checks both candidates against an fp32 torch reference on the real shape and keeps the faster one that passes.
This module needs CUDA and ``flashinfer-python`` (the ``gpu`` extra); it is never imported on CPU paths.
"""

from __future__ import annotations

import time

import torch

from .paged_decode import PagedDecodePlan, paged_decode, paged_decode_reference

CUDA_CORE_GROUPS = (1, 2, 3, 4, 8)


class FlashInferPagedDecode:
    """``plan`` once per step, ``run`` per layer (FlashInfer's split)."""

    def __init__(self, device: torch.device | str = "cuda", workspace_mb: int = 128) -> None:
        try:
            import flashinfer
        except ImportError as e:  # pragma: no cover - GPU only
            raise RuntimeError("the FlashInfer decode path needs `pip install sglang-hybridkv[gpu]`") from e
        self._workspace = torch.empty(workspace_mb << 20, dtype=torch.uint8, device=device)
        self._flashinfer = flashinfer
        self._wrapper = None

    def plan(self, plan: PagedDecodePlan, indices: torch.Tensor, dtype: torch.dtype, scale: float) -> None:
        use_tc = plan.group not in CUDA_CORE_GROUPS
        self._wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                            use_tensor_cores=use_tc)
        self._wrapper.plan(plan.indptr, indices, plan.last_page_len, plan.group, 1, plan.head_dim, plan.page_size,
                           q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        """``q (N, group, D)``, pages ``(num_pages, page, D)`` -> ``(N, group, D)``."""
        if self._wrapper is None:
            raise RuntimeError("FlashInferPagedDecode.run before plan")
        return self._wrapper.run(q, (k_pages[:, :, None, :], v_pages[:, :, None, :]))


def choose_decode_path(plan: PagedDecodePlan, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                       indices: torch.Tensor, scale: float, repeat: int = 20, atol: float = 2e-2) -> dict:
    """Check FlashInfer and Triton on this shape against the fp32 reference; return timings and the choice.

    Returns ``{"choice": "flashinfer"|"triton", "flashinfer_ms": float|None, "triton_ms": float,
    "flashinfer_error": float|None, "triton_error": float}``.
    """
    ref = paged_decode_reference(plan, q.float(), k_pages.float(), v_pages.float(), indices, scale)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / repeat

    tri = lambda: paged_decode(plan, q, k_pages, v_pages, indices, scale, use_triton=True)
    result = {"triton_error": float((tri().float() - ref).abs().max()), "triton_ms": timed(tri),
              "flashinfer_ms": None, "flashinfer_error": None}
    try:
        fi = FlashInferPagedDecode(q.device)
        fi.plan(plan, indices, q.dtype, scale)
        run = lambda: fi.run(q, k_pages, v_pages)
        result["flashinfer_error"] = float((run().float() - ref).abs().max())
        result["flashinfer_ms"] = timed(run)
    except Exception as e:  # an unsupported group size or a missing package: Triton serves the shape
        result["flashinfer_failure"] = f"{type(e).__name__}: {e}"
    ok_fi = result["flashinfer_error"] is not None and result["flashinfer_error"] <= atol
    faster = ok_fi and result["flashinfer_ms"] < result["triton_ms"]
    result["choice"] = "flashinfer" if faster else "triton"
    return result
