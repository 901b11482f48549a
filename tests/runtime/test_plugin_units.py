"""Plugin pieces that need no running server: flag handling, refusals, the hooked-symbol check."""

import types

import pytest

from sglang_hybridkv.config import ConfigError, HybridKVConfig
from sglang_hybridkv.runtime import plugin
from sglang_hybridkv.runtime.targets import TARGETS, check_targets


def test_every_hooked_symbol_exists_in_the_pinned_sglang():
    check_targets()
    assert any("TokenToKVPoolAllocator.free" in t for t in TARGETS)


def test_own_flags_are_parsed_and_validated():
    cfg = plugin._parse_own_flags(["--model-path", "x", "--kv-compression", "snapkv", "--hybridkv-budget", "0.3"])
    assert (cfg.policy, cfg.budget) == ("snapkv", 0.3)
    assert not plugin._parse_own_flags(["--model-path", "x"]).enabled
    with pytest.raises(ConfigError, match="window=0"):
        plugin._parse_own_flags(["--kv-compression", "hybridkv", "--hybridkv-window", "0"])


def test_backend_flags_are_taken_over_or_refused():
    cfg = HybridKVConfig()
    argv = ["--model-path", "m", "--attention-backend", "torch_native", "--decode-attention-backend=hybridkv"]
    assert plugin._strip_backend_flags(argv, cfg) == ["--model-path", "m"]
    with pytest.raises(plugin.StartupError, match="--attention-backend flashinfer is not supported"):
        plugin._strip_backend_flags(["--attention-backend", "flashinfer"], cfg)


def _args(**kw):
    base = dict(speculative_algorithm=None, disaggregation_mode="null", enable_hierarchical_cache=False,
                enable_lmcache=False, enable_hisparse=False, enable_dp_attention=False, tp_size=1, pp_size=1,
                dp_size=1, page_size=1, enable_mixed_chunk=False, device="cpu", model_path=None,
                enable_streaming_session=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kw,words", [
    ({"speculative_algorithm": "EAGLE"}, "speculative decoding"),
    ({"disaggregation_mode": "prefill"}, "PD disaggregation"),
    ({"enable_hierarchical_cache": True}, "HiCache"),
    ({"enable_dp_attention": True}, "DP attention"),
    ({"pp_size": 2}, "--pp-size 2"),
    ({"page_size": 16}, "--page-size 16"),
    ({"device": "npu"}, "--device npu"),
    ({"enable_streaming_session": True}, "--enable-streaming-session"),
])
def test_unsupported_combinations_are_named(kw, words):
    plugin._refuse_unsupported(_args(), HybridKVConfig())  # the supported baseline passes
    with pytest.raises(plugin.StartupError) as e:
        plugin._refuse_unsupported(_args(**kw), HybridKVConfig())
    assert words in str(e.value) and "does not work with" in str(e.value)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}')
    with pytest.raises(plugin.StartupError, match="DeepseekV3ForCausalLM"):
        plugin._refuse_unsupported(_args(model_path=str(tmp_path)), HybridKVConfig())


def test_tensor_parallelism_is_accepted_when_ranks_hold_whole_kv_heads(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2}')
    plugin._refuse_unsupported(_args(tp_size=2, model_path=str(tmp_path)), HybridKVConfig())
    with pytest.raises(plugin.StartupError, match="--tp-size 4 with 2 KV heads"):
        plugin._refuse_unsupported(_args(tp_size=4, model_path=str(tmp_path)), HybridKVConfig())


def _cuda_graphs(extra):
    """(decode, prefill) CUDA-graph backends as SGLang itself resolves them for a --device cuda launch."""
    from sglang.srt.arg_groups.cuda_graph_hook import parse_cuda_graph_config
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import prepare_server_args

    plugin._register_backend()

    def orig(argv):  # SGLang's own parser without our flags (the CLI hook adds them in a real launch)
        i = argv.index("--kv-compression")
        return prepare_server_args(argv[:i] + argv[i + 2:])

    sa = plugin._prepare_server_args(orig, ["--model-path", "m", "--device", "cuda", "--kv-compression", "hybridkv",
                                            *extra])
    parse_cuda_graph_config(sa)
    cfg = resolved_view(sa).cuda_graph_config
    return cfg.decode.backend, cfg.prefill.backend


@pytest.mark.parametrize("extra,decode", [
    ([], "breakable"),  # the default with compression (our attention runs eagerly between captured segments)
    (["--cuda-graph-backend-decode", "breakable"], "breakable"),  # the user's choice is kept
    (["--disable-cuda-graph"], "disabled"),  # the user's choice is kept
    (["--cuda-graph-backend-decode", "disabled"], "disabled"),
    (["--cuda-graph-config", '{"decode": {"backend": "breakable", "max_bs": 8}}'], "breakable"),
])
def test_cuda_decode_graphs_are_breakable_unless_chosen_and_no_prefill_graphs(extra, decode):
    assert _cuda_graphs(extra) == (decode, "disabled")


@pytest.mark.parametrize("extra,words", [
    (["--cuda-graph-backend-decode", "full"], "full decode CUDA graphs"),
    (["--cuda-graph-config", '{"decode": {"max_bs": 8}}'], "full decode CUDA graphs"),  # SGLang's default: full
    (["--cuda-graph-backend-prefill", "breakable"], "prefill CUDA graphs"),
])
def test_cuda_graph_settings_that_cannot_hold_the_decode_plan_are_refused(extra, words):
    with pytest.raises(plugin.StartupError, match=words):
        _cuda_graphs(extra)


def test_device_flag_is_read():
    assert plugin._device(["--model-path", "m", "--device", "cuda"]) == "cuda"
    assert plugin._device(["--device=cpu"]) == "cpu"


def test_beam_search_is_refused_per_request_unless_uncompressed(monkeypatch):
    monkeypatch.setenv("SGLANG_HYBRIDKV_CONFIG", HybridKVConfig().to_json())
    obj = types.SimpleNamespace(sampling_params={"beam_width": 2})
    with pytest.raises(ConfigError, match="beam search"):
        plugin._validate_request(None, obj)
    obj.sampling_params["custom_params"] = {"hybridkv": {"policy": "none"}}
    plugin._validate_request(None, obj)


def test_engine_takes_the_flags_as_keyword_arguments(monkeypatch):
    from sglang.srt.entrypoints.engine import Engine

    monkeypatch.delenv("SGLANG_HYBRIDKV_CONFIG", raising=False)
    plugin._let_engine_take_flags()  # what register() does when sgl.Engine loads the plugin
    sa = Engine.server_args_class(model_path="m", device="cpu", kv_compression="snapkv", hybridkv_budget_tokens=64)
    # Overlap scheduling stays as the caller set it (compaction commits between forwards): on by default.
    assert (sa.model_path, sa.attention_backend, sa.disable_overlap_schedule) == ("m", "hybridkv", False)
    cfg = HybridKVConfig.from_env()
    assert (cfg.policy, cfg.budget_tokens) == ("snapkv", 64)
    # On CUDA, as on the command line: breakable decode graphs unless the engine's caller chose otherwise.
    sa = Engine.server_args_class(model_path="m", device="cuda", kv_compression="hybridkv")
    assert (sa.cuda_graph_backend_decode, sa.disable_prefill_cuda_graph) == ("breakable", True)
    sa = Engine.server_args_class(model_path="m", device="cuda", kv_compression="hybridkv",
                                  cuda_graph_backend_decode="disabled")
    assert sa.cuda_graph_backend_decode == "disabled"
    sa = Engine.server_args_class(model_path="m", device="cuda", kv_compression="hybridkv", disable_cuda_graph=True)
    assert sa.cuda_graph_backend_decode is None and sa.disable_cuda_graph
    with pytest.raises(ConfigError, match="full decode CUDA graphs"):
        Engine.server_args_class(model_path="m", device="cuda", kv_compression="hybridkv",
                                 cuda_graph_backend_decode="full")
    # A later engine without the flag in the same process runs uncompressed.
    sa = Engine.server_args_class(model_path="m", device="cpu")
    assert sa.attention_backend is None and HybridKVConfig.from_env() is None
    for kw, words in (({"hybridkv_budget": 3.0}, "budget=3.0"), ({"hybridkv_bugdet": 0.1}, "hybridkv_bugdet"),
                      ({"attention_backend": "flashinfer"}, "flashinfer is not supported"),
                      ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"),
                      ({"hybridkv_budget": 0.1, "hybridkv_budget_tokens": 8}, "exactly one")):
        with pytest.raises(ConfigError, match=words):
            Engine.server_args_class(model_path="m", device="cpu", kv_compression="hybridkv", **kw)


def test_a_host_tier_limit_above_the_machine_memory_stops_the_launch():
    from sglang_hybridkv.runtime.host_tier import machine_memory_bytes

    too_much = str(int(machine_memory_bytes() / 1e9) + 1)
    with pytest.raises(plugin.StartupError) as e:
        plugin._prepare_server_args(lambda argv: pytest.fail("SGLang must not be reached"),
                                    ["--model-path", "m", "--kv-compression", "hybridkv", "--hybridkv-host-tier-gb",
                                     too_much])
    assert f"host_tier_gb={float(too_much)!r}" in str(e.value) and "machine's memory" in str(e.value)
    with pytest.raises(ConfigError, match="host_tier_gb"):
        plugin.engine_server_args(model_path="m", device="cpu", kv_compression="hybridkv",
                                  hybridkv_host_tier_gb=float(too_much))


def test_requests_are_refused_overrides_the_operator_switch_forbids(monkeypatch):
    def validate(switch, custom):
        monkeypatch.setenv("SGLANG_HYBRIDKV_CONFIG", HybridKVConfig(request_overrides=switch).to_json())
        plugin._validate_request(None, types.SimpleNamespace(sampling_params={"custom_params": custom}))

    validate("all", {"hybridkv": {"policy": "full", "budget": 1.0}})  # the default takes every override
    validate("budget", {"hybridkv": {"budget": 0.5}})
    validate("none", {"other": 1})  # requests without hybridkv overrides are untouched
    with pytest.raises(ConfigError, match="--hybridkv-request-overrides budget allows"):
        validate("budget", {"hybridkv": {"policy": "full"}})
    with pytest.raises(ConfigError, match="--hybridkv-request-overrides none"):
        validate("none", {"hybridkv": {"budget": 1.0}})
