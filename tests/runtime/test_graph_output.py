"""SGLang 0.5.23's breakable decode CUDA graphs copy every captured forward's output into one shared buffer and
hand back slices of it at replay. A language model's decode output is a ``LogitsProcessorOutput``, which SGLang's
buffer helpers reject (on the lent H200, 2026-12-04: "Unsupported BCG output type"). These tests run SGLang's own
helpers, with the plugin's hooks applied by SGLang's ``HookRegistry``, on CPU tensors: the same calls capture makes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.model_executor.runner_backend import breakable_cuda_graph_backend as bcg  # noqa: E402

from sglang_hybridkv.runtime import graph_output  # noqa: E402

from .plugin_hooks import scheduler_hooks_applied  # noqa: E402

Backend = bcg.BreakableCudaGraphBackend


@pytest.fixture
def backend():
    """A breakable backend (its buffer helpers use no state) with the hooks the plugin's scheduler install adds."""
    originals = {name: Backend.__dict__[name] for name in ("_alloc_full_buffer", "_slice_output",
                                                           "_copy_output_to_buffer")}
    try:
        with scheduler_hooks_applied(graph_output.TARGETS) as hooks:
            assert sorted(t for t, _, _ in hooks) == sorted(graph_output.TARGETS)
            yield object.__new__(Backend)
    finally:
        for name, fn in originals.items():
            setattr(Backend, name, fn)


def _capture_like(backend, outputs: list[LogitsProcessorOutput], capacity: int) -> list[LogitsProcessorOutput]:
    """What ``capture_one`` does per graph size: one buffer sized by the first output, each output copied in and
    the stored output a slice of the buffer."""
    buffer = backend._alloc_full_buffer(outputs[0], capacity)
    stored = []
    for out in outputs:
        rows = out.next_token_logits.shape[0]
        backend._copy_output_to_buffer(out, buffer, rows)
        stored.append(backend._slice_output(buffer, rows))
    return stored


def test_sglang_alone_rejects_a_language_models_output():
    out = LogitsProcessorOutput(next_token_logits=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="Unsupported BCG output type"):
        object.__new__(Backend)._alloc_full_buffer(out, 4)


def test_logits_survive_the_shared_buffer(backend):
    torch.manual_seed(0)
    big = LogitsProcessorOutput(next_token_logits=torch.randn(8, 11), hidden_states=torch.randn(8, 3))
    (stored,) = _capture_like(backend, [big], capacity=8)
    assert isinstance(stored, LogitsProcessorOutput)
    assert torch.equal(stored.next_token_logits, big.next_token_logits)
    assert torch.equal(stored.hidden_states, big.hidden_states)
    assert stored.next_token_logprobs is None and stored.customized_info is None
    assert stored.next_token_logits.data_ptr() != big.next_token_logits.data_ptr(), "kept in the buffer, not aliased"


def test_smaller_graph_sizes_share_the_buffer_and_see_their_own_rows(backend):
    torch.manual_seed(1)
    first = LogitsProcessorOutput(next_token_logits=torch.randn(8, 11))
    second = LogitsProcessorOutput(next_token_logits=torch.randn(3, 11))
    stored_first, stored_second = _capture_like(backend, [first, second], capacity=8)
    assert stored_second.next_token_logits.shape == (3, 11)
    assert torch.equal(stored_second.next_token_logits, second.next_token_logits)
    # one buffer: what replay of the 3-row graph writes is what the 8-row slice's first rows read
    assert stored_second.next_token_logits.data_ptr() == stored_first.next_token_logits.data_ptr()


def test_plain_tensor_outputs_still_go_through_sglang(backend):
    x = torch.randn(4, 2)
    buffer = backend._alloc_full_buffer((x, None), 6)
    backend._copy_output_to_buffer((x, None), buffer, 4)
    out, none = backend._slice_output(buffer, 4)
    assert none is None and torch.equal(out, x)


def test_fields_a_buffer_cannot_hold_and_changed_structure_fail_clearly(backend):
    with pytest.raises(TypeError, match="customized_info"):
        backend._alloc_full_buffer(
            LogitsProcessorOutput(next_token_logits=torch.zeros(2, 3), customized_info={"k": [1]}), 4)
    buffer = backend._alloc_full_buffer(LogitsProcessorOutput(next_token_logits=torch.zeros(2, 3)), 4)
    with pytest.raises(ValueError, match="changed structure"):
        backend._copy_output_to_buffer(
            LogitsProcessorOutput(next_token_logits=torch.zeros(2, 3), hidden_states=torch.zeros(2, 1)), buffer, 2)
