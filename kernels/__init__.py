"""Kernels of the decode path, each beside a plain torch reference (installed as ``sglang_hybridkv.kernels``).

Layout shared by every kernel (FlashInfer-style, one KV head per flattened sequence):
    ``k_pages, v_pages``: ``(num_pages, page_size, head_dim)`` — a page holds one KV head's tokens.
    A batch of ``N`` flattened (request, KV head) sequences is CSR: ``indptr (N+1,)`` into ``indices`` (page ids)
    and ``last_page_len (N,)``; queries are ``(N, group, head_dim)``.
Triton kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests); the torch references run anywhere
and are the CPU path.
"""

from .backend import triton_available

__all__ = ["triton_available"]
