"""Under decode CUDA graphs SGLang hands the attention backend two batches that do not come from
``ForwardBatch.init_new``: the batch it captures with, and at every replay a view over the padded graph buffers
(``build_replay_fb_view``). The decode plan needs the batch's ``req_to_token`` rows on the host from both. On the
lent H200 (2026-12-04) the capture batch stopped the server at start-up ("a decode batch reached the backend
without req_pool_indices_cpu"), and SGLang 0.5.23's replay view has no such field at all.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.model_executor.runner import decode_cuda_graph_runner as runner  # noqa: E402

from sglang_hybridkv.runtime.backend import _host_rows  # noqa: E402

from .plugin_hooks import scheduler_hooks_applied  # noqa: E402

TARGET = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view"


def _decode_batch(rows: list[int]) -> types.SimpleNamespace:
    """What SGLang's replay reads of the eager decode batch (the fields build_replay_fb_view copies)."""
    n = len(rows)
    return types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE, req_pool_indices_cpu=torch.tensor(rows), seq_lens_sum=10 * n,
        seq_lens_cpu=torch.full((n,), 10), max_seq_len_host=10, out_cache_loc=torch.arange(n),
        out_cache_loc_virtual=None, kv_loc_plan=None, kv_loc_cols=None, max_seq_len_override=None, spec_info=None,
        lora_ids=None, can_run_decode_cuda_graph=True)


def _graph_buffers(bs: int) -> types.SimpleNamespace:
    z = torch.zeros(bs, dtype=torch.int64)
    return types.SimpleNamespace(input_ids=z, positions=z, req_pool_indices=z, seq_lens=z + 1,
                                 seq_lens_cpu=z + 1, encoder_lens=None, mamba_track_indices=None)


def _view(rows: list[int], bs: int):
    return runner.build_replay_fb_view(
        forward_batch=_decode_batch(rows), buffers=_graph_buffers(bs), bs=bs, raw_bs=len(rows), num_tokens=bs,
        global_num_tokens_cpu=None, seq_len_fill_value=1, capture_forward_mode=ForwardMode.DECODE,
        is_encoder_decoder=False)


@pytest.fixture
def hooked_view_builder():
    """SGLang's own build_replay_fb_view with the hook the plugin installs on it, applied by SGLang's registry."""
    original = runner.build_replay_fb_view
    try:
        with scheduler_hooks_applied({TARGET}) as hooks:
            assert len(hooks) == 1, "the plugin installs one hook on build_replay_fb_view"
            yield
    finally:
        runner.build_replay_fb_view = original


def test_the_replay_view_alone_has_no_host_rows():
    with pytest.raises(RuntimeError, match="req_pool_indices_cpu"):
        _host_rows(_view([5, 2, 7], bs=4))


def test_the_replay_view_carries_the_batch_rows_and_pads_with_row_zero(hooked_view_builder):
    view = _view([5, 2, 7], bs=4)
    assert _host_rows(view) == [5, 2, 7, 0]
    assert view.seq_lens_cpu.shape[0] == 4 and view.out_cache_loc.shape[0] == 3  # padded lengths, real slots


def test_the_capture_batch_names_row_zero_and_only_capture_may_lack_rows():
    capture = types.SimpleNamespace(req_pool_indices_cpu=None, seq_lens_cpu=torch.ones(8, dtype=torch.int64))
    assert _host_rows(capture, in_capture=True) == [0] * 8
    with pytest.raises(RuntimeError, match="req_pool_indices_cpu"):
        _host_rows(capture)
