"""A compressed region leaves room for SGLang's next prompt chunk.

SGLang allocates the next chunk of a chunked prompt without checking the pool (it counted those tokens when it
admitted the request). A region committed in between (radix on, or a budget near 1.0) takes new slots; had it
taken those, the chunk's allocation failed and the scheduler died ("Out of memory ... Try to allocate 128
tokens", seen once under test_load_faults.py's load). The commit now refuses such a region (the request stays
uncompressed and says so); this checks the rule on SGLang's own allocator.
"""

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_hybridkv.runtime.compaction import _alloc


def test_a_region_leaves_room_for_the_next_prompt_chunk():
    pool = TokenToKVPoolAllocator(100, torch.float16, "cpu", None, need_sort=False)
    pool.alloc(50)
    assert pool.available_size() == 50
    assert _alloc(pool, None, 40, keep=20) is None and pool.available_size() == 50  # refused: nothing taken
    got = _alloc(pool, None, 30, keep=20)
    assert got.numel() == 30 and pool.available_size() == 20
    assert _alloc(pool, None, 1, keep=20) is None
    assert _alloc(pool, None, 20).numel() == 20  # no chunk in flight: the pool's last slots too
    assert _alloc(pool, None, 0, keep=5).numel() == 0
