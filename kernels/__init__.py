"""Kernels of the decode path, each beside a plain torch reference (installed as ``sglang_hybridkv.kernels``).

Layout shared by every kernel: SGLang's MHA pool buffers ``(slots, H, D)`` viewed as rows ``(slots * H, D)``
(row ``slot * H + h`` is head ``h`` of token ``slot``), read in place; one flattened sequence per (request, KV
head) with the GQA group as its queries ``(N, group, D)``:

- ``row_decode``: attention of each sequence over its rows, given as work items of at most ``S`` columns
  (``(I, S)`` rows and valid, ``(I,)`` sequence), merged per sequence;
- ``chunk_select``: chunk scores of dynamic heads from their summary rows, and a fixed-width top-k;
- ``row_copy``: the copy of selected host-tier rows into retrieval-buffer rows.

Triton kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests); the torch references run anywhere
and are the CPU path.
"""

from .backend import triton_available

__all__ = ["triton_available"]
