import argparse
import json
import re

import pytest

from sglang_hybridkv.config import ENV_VAR, ConfigError, HybridKVConfig


@pytest.mark.parametrize("knob,value,words", [
    ("budget", 0.0, ["budget=0.0", "(0.0, 1.0]"]),
    ("budget", 1.5, ["budget=1.5", "out of range"]),
    ("budget", "0.1", ["budget='0.1'", "number"]),
    ("theta", -0.1, ["theta=-0.1"]),
    ("window", 0, ["window=0", "[1, 4096]"]),
    ("chunk_size", 2.5, ["chunk_size=2.5", "integer"]),
    ("pool_kernel", 4, ["pool_kernel=4", "odd"]),
    ("policy", "h2o", ["policy='h2o'", "hybridkv", "snapkv"]),
    ("classifier", "x", ["classifier='x'", "entropy"]),
    ("retrieval_interval", 0, ["retrieval_interval=0"]),
    ("top_k_chunks", True, ["top_k_chunks=True", "integer"]),
    ("static_ratio", float("nan"), ["static_ratio=nan"]),
    ("budget_unit", "tokens", ["budget_unit='tokens'", "device", "media"]),
    ("pool_forward", -1, ["pool_forward=-1", "[0, 1024]"]),
    ("need_weight", 1.5, ["need_weight=1.5", "[0.0, 1.0]"]),
])
def test_bad_values_name_knob_value_and_range(knob, value, words):
    with pytest.raises(ConfigError) as e:
        HybridKVConfig(**{knob: value})
    for w in words:
        assert w in str(e.value)


def test_cli_round_trip_and_defaults():
    parser = argparse.ArgumentParser()
    HybridKVConfig.add_cli_args(parser)
    args = parser.parse_args(["--kv-compression", "snapkv", "--hybridkv-budget", "0.2",
                              "--hybridkv-top-k-chunks", "auto", "--hybridkv-static-ratio", "0.3"])
    cfg = HybridKVConfig.from_cli(args)
    assert (cfg.policy, cfg.budget, cfg.top_k_chunks, cfg.static_ratio) == ("snapkv", 0.2, None, 0.3)
    assert cfg.window == HybridKVConfig().window
    assert not HybridKVConfig.from_cli(parser.parse_args([])).enabled
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-compression", "bogus"])
    with pytest.raises(ConfigError, match="budget=2.0"):
        HybridKVConfig.from_cli(parser.parse_args(["--kv-compression", "hybridkv", "--hybridkv-budget", "2"]))


def test_env_round_trip_and_errors():
    cfg = HybridKVConfig(policy="all_dynamic", budget=0.05, chunk_size=32)
    assert HybridKVConfig.from_env({ENV_VAR: cfg.to_json()}) == cfg
    assert HybridKVConfig.from_env({}) is None
    with pytest.raises(ConfigError, match="not valid JSON"):
        HybridKVConfig.from_env({ENV_VAR: "{budget"})
    with pytest.raises(ConfigError, match="unknown hybridkv knob"):
        HybridKVConfig.from_dict({**json.loads(cfg.to_json()), "bugdet": 0.1})


def test_per_request_overrides():
    base = HybridKVConfig(budget=0.1)
    assert base.with_request(None) is base
    cfg = base.with_request({"policy": "snapkv", "budget": 0.25})
    assert (cfg.policy, cfg.budget, cfg.chunk_size) == ("snapkv", 0.25, base.chunk_size)
    with pytest.raises(ConfigError, match=r"\['chunk_size'\] cannot be set per request"):
        base.with_request({"chunk_size": 8})
    with pytest.raises(ConfigError, match="budget=-1"):
        base.with_request({"budget": -1})
    with pytest.raises(ConfigError, match="must be an object"):
        base.with_request([("budget", 0.2)])


def test_budget_tokens_is_the_other_way_to_give_the_budget():
    # Server-wide: a token budget, validated like every knob; never together with a fraction.
    parser = argparse.ArgumentParser()
    HybridKVConfig.add_cli_args(parser)
    cfg = HybridKVConfig.from_cli(parser.parse_args(["--kv-compression", "hybridkv", "--hybridkv-budget-tokens", "128"]))
    assert cfg.budget_tokens == 128
    with pytest.raises(ConfigError, match="set exactly one of budget"):
        HybridKVConfig.from_cli(parser.parse_args(["--kv-compression", "hybridkv", "--hybridkv-budget", "0.1",
                                                   "--hybridkv-budget-tokens", "128"]))
    for bad, words in ((0, "budget_tokens=0"), (1.5, "integer"), ("64", "integer")):
        with pytest.raises(ConfigError, match=words):
            HybridKVConfig(budget_tokens=bad)
    with pytest.raises(ConfigError, match="budget_unit='media'"):
        HybridKVConfig(budget_tokens=64, budget_unit="media")
    # It survives the trip to scheduler processes.
    assert HybridKVConfig.from_env({ENV_VAR: cfg.to_json()}) == cfg
    # Per prompt it becomes the fraction the method runs with, and says what was asked.
    resolved = cfg.for_prompt(1024)
    assert (resolved.budget, resolved.budget_tokens) == (0.125, 128)
    assert cfg.for_prompt(100).budget == 1.0
    assert HybridKVConfig(budget=0.3).for_prompt(1024).budget == 0.3
    # Per request: either one replaces the server's budget, both at once is an error naming them.
    assert cfg.with_request({"budget": 0.2}).for_prompt(1000).budget == 0.2
    assert HybridKVConfig(budget=0.2).with_request({"budget_tokens": 50}).for_prompt(1000).budget == 0.05
    with pytest.raises(ConfigError, match="budget=0.2 and budget_tokens=50"):
        cfg.with_request({"budget": 0.2, "budget_tokens": 50})
    with pytest.raises(ConfigError, match="budget_tokens=-3"):
        cfg.with_request({"budget_tokens": -3})


def test_every_knob_is_one_declaration_that_drives_validation_cli_and_requests():
    import dataclasses

    from sglang_hybridkv.config import REQUEST_FIELDS, spec

    parser = argparse.ArgumentParser()
    HybridKVConfig.add_cli_args(parser)
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(HybridKVConfig):
        k = spec(f)  # every field declares its Knob
        assert (f"hybridkv_{f.name}" in dests) == k.flag
        assert (f.name in REQUEST_FIELDS) == k.per_request
    assert REQUEST_FIELDS == ("policy", "budget", "budget_tokens", "theta", "static_ratio", "top_k_chunks",
                              "retrieval_interval")
    # The flag's help names the range from the same declaration that validates it.
    help_text = parser.format_help()
    assert "(0.0, 1.0]" in help_text and "a request may override it" in help_text


def test_host_tier_limit_is_a_validated_knob():
    parser = argparse.ArgumentParser()
    HybridKVConfig.add_cli_args(parser)
    args = ["--kv-compression", "hybridkv", "--hybridkv-host-tier-gb"]
    assert HybridKVConfig.from_cli(parser.parse_args(args + ["2.5"])).host_tier_gb == 2.5
    assert HybridKVConfig.from_cli(parser.parse_args(args + ["auto"])).host_tier_gb is None
    with pytest.raises(SystemExit):  # argparse: "'lots' is not allowed: (0.0, 1048576.0] or none"
        parser.parse_args(args + ["lots"])
    for bad, words in ((0, "host_tier_gb=0 is out of range"), (-1.0, "(0.0, "), ("8", "a number")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            HybridKVConfig(host_tier_gb=bad)


@pytest.mark.parametrize("switch,allowed,refused", [
    ("all", [{"policy": "full"}, {"budget": 1.0}, {"theta": 0.5}], []),
    ("budget", [{"budget": 0.3}, {"budget_tokens": 64}], [{"policy": "full"}, {"theta": 0.5}]),
    ("none", [], [{"budget": 0.3}, {"policy": "none"}]),
    ("policy,theta", [{"policy": "snapkv", "theta": 0.5}], [{"budget": 1.0}, {"policy": "full", "budget": 1.0}]),
])
def test_operator_switch_for_per_request_overrides(switch, allowed, refused):
    server = HybridKVConfig(request_overrides=switch)
    for params in allowed:
        cfg = server.with_request(params)
        assert all(getattr(cfg, k) == v for k, v in params.items())
    for params in refused:
        with pytest.raises(ConfigError) as e:
            server.with_request(params)
        assert f"--hybridkv-request-overrides {switch}" in str(e.value) and "may not be set per request" in str(e.value)
    # A knob no request may set is refused as before, whatever the switch.
    with pytest.raises(ConfigError, match="cannot be set per request"):
        server.with_request({"chunk_size": 8})
    # The switch survives the trip to scheduler processes.
    assert HybridKVConfig.from_env({ENV_VAR: server.to_json()}) == server


def test_operator_switch_values_are_validated():
    assert HybridKVConfig().request_overrides == "all"  # default: as before the switch
    for bad in ("some", "policy,chunk_size", ""):
        with pytest.raises(ConfigError) as e:
            HybridKVConfig(request_overrides=bad)
        assert f"request_overrides={bad!r}" in str(e.value) and "'budget'" in str(e.value)
