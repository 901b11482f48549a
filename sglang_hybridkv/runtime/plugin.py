"""SGLang plugin entry point (group ``sglang.srt.plugins``): ``--kv-compression`` for ``sglang.launch_server``,
``sglang serve`` and ``sgl.Engine(kv_compression=...)``.

``register()`` runs in every SGLang process. Everywhere it adds the CLI flags and the attention backend name
(harmless without ``--kv-compression``). In the launcher, the ``prepare_server_args`` hook validates the flags,
refuses combinations that do not work yet, exports the config as JSON in ``SGLANG_HYBRIDKV_CONFIG`` and implies
``--attention-backend hybridkv``; ``sgl.Engine(**kwargs)``, which has no command line, does the same through
:func:`engine_server_args`. Scheduler processes inherit the variable and install the runtime hooks; with no
``--kv-compression`` (or ``none``) nothing else is hooked and SGLang runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from ..config import ENV_VAR, FIELDS, ConfigError, HybridKVConfig
from .host_tier import limit_bytes
from .requests import active_config, request_config
from .targets import IncompatibleSGLang, check_targets, check_version
from .video_items import split_videos

logger = logging.getLogger("sglang_hybridkv")

BACKEND = "hybridkv"
# Architectures whose attention goes through RadixAttention with standard MHA/GQA KV (what the pool holds).
SUPPORTED_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                   "Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration", "LlavaQwenForCausalLM"}
# Flags implied by --kv-compression. The overlap scheduler stays as the user sets it (on by default): compaction
# commits its pool slots on the scheduler side between forwards, before the next batch is formed
# (scheduler_hooks). The radix cache stays as the user sets it too.
IMPLIED = {"attention_backend": BACKEND}
# On CUDA: SGLang's breakable decode graphs by default. The plan's shapes follow each batch's regions, so a
# whole-forward "full" graph cannot hold our decode attention; breakable graphs capture the projections, norms and
# MLPs around it and run it eagerly. SGLang 0.5.23's capture cannot store a language model's output on its own
# (runtime/graph_output.py fills that in). On the H200 (2026-12-04, benchmarks/results/gpu-h200-2026-12-04/) they
# gave the eager tokens with a decode step 3.3x shorter (21 vs 71 ms at 25 running, 8B-shaped model). Prefill
# graphs are off: a compressed prefill's scoring does host work between layers.
IMPLIED_CUDA = {"disable_prefill_cuda_graph": True}
IMPLIED_CUDA_DECODE_GRAPH = {"cuda_graph_backend_decode": "breakable"}
# Settings by which a user chooses decode graphs (SGLang's precedence: JSON config, then the per-phase backend,
# then the off-switches).
DECODE_GRAPH_FIELDS = ("cuda_graph_config", "cuda_graph_backend_decode", "disable_decode_cuda_graph",
                       "disable_cuda_graph")
BACKEND_FIELDS = ("attention_backend", "decode_attention_backend", "prefill_attention_backend")
# Engine keyword arguments that are ours (the CLI flags' dests).
ENGINE_KWARGS = ("kv_compression", *(f"hybridkv_{f}" for f in FIELDS if f != "policy"))


class StartupError(SystemExit):
    """Stops the launcher with a one-line message instead of a traceback."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"sglang-hybridkv: {msg}")


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _register_backend()
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _prepare_server_args, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
                          _validate_request, HookType.BEFORE)
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager._wait_one_response",
                          _one_stats_dict, HookType.AROUND)
    # The multimodal processor runs where the tokenizer manager does (the launcher, before flags are parsed):
    # registered always, active only with --kv-compression (video_items.split_videos checks).
    HookRegistry.register("sglang.srt.managers.mm_utils.get_new_expanded_mm_items", split_videos, HookType.AROUND)
    _let_engine_take_flags()
    config = HybridKVConfig.from_env()
    if config is not None and config.enabled:
        check_version()  # every target was checked where the flags were parsed, before this process started
        from . import scheduler_hooks

        scheduler_hooks.install(HookRegistry, HookType)


def _register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    if BACKEND in ATTENTION_BACKENDS:
        return

    @register_attention_backend(BACKEND)
    def _factory(model_runner):
        from .backend import make_backend

        config = active_config()
        if config is None:
            raise RuntimeError(f"attention backend '{BACKEND}' needs --kv-compression (none was given)")
        return make_backend(model_runner, config)

    add_attention_backend_choices([BACKEND])


def _add_cli_args(orig, parser: argparse.ArgumentParser, *args, **kwargs):
    result = orig(parser, *args, **kwargs)
    if not any(a.dest == "kv_compression" for a in parser._actions):
        HybridKVConfig.add_cli_args(parser)
    return result


def _parse_own_flags(argv: list[str]) -> HybridKVConfig:
    parser = argparse.ArgumentParser(add_help=False)
    HybridKVConfig.add_cli_args(parser)
    known, _ = parser.parse_known_args(argv)
    return HybridKVConfig.from_cli(known)


def _prepare_server_args(orig, argv, *args, **kwargs):
    argv = list(argv)
    try:
        config = _parse_own_flags(argv)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    if not config.enabled:
        os.environ.pop(ENV_VAR, None)
        return orig(argv, *args, **kwargs)
    try:
        check_targets()
        tier = limit_bytes(config)
    except (IncompatibleSGLang, ConfigError) as e:
        raise StartupError(str(e)) from None
    argv = _strip_backend_flags(argv, config)
    chosen = {f for f in DECODE_GRAPH_FIELDS if _flag_given(argv, f)}
    server_args = orig(argv + _as_flags(_implied(_device(argv), chosen)), *args, **kwargs)
    _refuse_unsupported(server_args, config)
    os.environ[ENV_VAR] = config.to_json()
    logger.info("hybridkv: --kv-compression %s, config %s", config.policy, config.to_json())
    radix = "off" if server_args.disable_radix_cache else "on (uncompressed prefixes shared, copy-on-compress)"
    overlap = ("overlap scheduling off (--disable-overlap-schedule)" if server_args.disable_overlap_schedule else
               "overlap scheduling on (a prefill's compactions are committed before the next batch is formed)")
    graphs = ""
    if server_args.device == "cuda":
        decode = _graph_backend(server_args, "decode") or "full"
        note = {"breakable": " (hybridkv attention runs eagerly between captured segments)",
                "disabled": " (hybridkv's default on CUDA is breakable: a decode step ~3x shorter)"}
        graphs = f"; decode CUDA graphs {decode}{note.get(decode, '')}; prefill CUDA graphs off"
    print(f"[sglang-hybridkv] KV compression on: {config.policy}, budget {config.budget}; radix cache {radix}; "
          f"{overlap}{graphs}; host tier at most {tier / 1e9:.2f} GB; per-request overrides: "
          f"{', '.join(config.overridable) or 'none'}", file=sys.stderr)
    return server_args


def _implied(device: str | None, chosen: set[str] = frozenset()) -> dict:
    """Settings implied by compression; ``chosen``: the decode-graph settings the user gave (kept as given)."""
    if device != "cuda":
        return dict(IMPLIED)
    return {**IMPLIED, **IMPLIED_CUDA, **({} if chosen else IMPLIED_CUDA_DECODE_GRAPH)}


def _flag_given(argv: list[str], field: str) -> bool:
    flag = f"--{field.replace('_', '-')}"
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _graph_backend(sa, phase: str) -> str | None:
    """The CUDA-graph backend SGLang will use for ``phase`` ("full", "breakable", "disabled"), by its precedence;
    None when nothing was set (SGLang's default: decode "full"; prefill "breakable" on CUDA)."""
    raw = getattr(sa, "cuda_graph_config", None)
    raw = raw.to_dict() if hasattr(raw, "to_dict") else (raw or {})
    if (raw.get(phase) or {}).get("backend"):
        return raw[phase]["backend"]
    if getattr(sa, f"cuda_graph_backend_{phase}", None):
        return getattr(sa, f"cuda_graph_backend_{phase}")
    if getattr(sa, "disable_cuda_graph", False) or getattr(sa, f"disable_{phase}_cuda_graph", False):
        return "disabled"
    return None


def _as_flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


def _backend_refusal(config: HybridKVConfig, name: str, value) -> str | None:
    """We run our own backend; the user may name it or the stock one it extends, nothing else."""
    if value in (None, "torch_native", BACKEND):
        return None
    return (f"--kv-compression {config.policy} runs its own attention backend (CPU: torch_native extend + "
            f"hybridkv decode); {name} {value} is not supported")


def _strip_backend_flags(argv: list[str], config: HybridKVConfig) -> list[str]:
    """Drop ``--attention-backend torch_native|hybridkv`` (we set it); any other backend is an error."""
    flags = tuple(f"--{f.replace('_', '-')}" for f in BACKEND_FIELDS)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in flags:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            refusal = _backend_refusal(config, name, value)
            if refusal:
                raise StartupError(refusal)
        else:
            out.append(a)
        i += 1
    return out


def _refuse_unsupported(sa, config: HybridKVConfig) -> None:
    problems = _unsupported(sa, config)
    if problems:
        raise StartupError(problems)


def _unsupported(sa, config: HybridKVConfig) -> str | None:
    """What in the server args does not work with compression yet, as one line; None if all works."""
    def val(name, default=None):
        return getattr(sa, name, default)

    problems = []
    if val("speculative_algorithm") not in (None, "", "NONE"):
        problems.append(f"speculative decoding (--speculative-algorithm {val('speculative_algorithm')})")
    if str(val("disaggregation_mode", "null")) not in ("null", "None", ""):
        problems.append(f"PD disaggregation (--disaggregation-mode {val('disaggregation_mode')})")
    if val("enable_hierarchical_cache"):
        problems.append("HiCache (--enable-hierarchical-cache)")
    if val("enable_lmcache"):
        problems.append("LMCache (--enable-lmcache)")
    if val("enable_hisparse"):
        problems.append("HiSparse (--enable-hisparse)")
    if val("enable_dp_attention"):
        problems.append("DP attention (--enable-dp-attention)")
    for name in ("pp_size", "dp_size"):
        if (val(name) or 1) > 1:
            problems.append(f"--{name.replace('_', '-')} {val(name)} (per-rank budgets are not tested yet)")
    kv_heads = _kv_heads(val("model_path"))
    tp = val("tp_size") or 1
    if tp > 1 and kv_heads is not None and kv_heads % tp:
        problems.append(f"--tp-size {tp} with {kv_heads} KV heads (each rank must hold its own KV heads: "
                        f"the KV head count must be a multiple of --tp-size)")
    if (val("page_size") or 1) != 1:
        problems.append(f"--page-size {val('page_size')} (the staging pool must be token-granular)")
    if val("enable_mixed_chunk"):
        problems.append("--enable-mixed-chunk")
    if val("device") not in ("cpu", "cuda"):
        problems.append(f"--device {val('device')} (supported: cpu, cuda)")
    if val("device") == "cuda":
        decode, prefill = _graph_backend(sa, "decode"), _graph_backend(sa, "prefill")
        if decode in (None, "full"):
            problems.append("full decode CUDA graphs (the decode plan follows each batch's compressed regions; use "
                            "--cuda-graph-backend-decode disabled, the default with compression, or breakable)")
        if prefill != "disabled":
            problems.append(f"prefill CUDA graphs ({prefill or 'breakable'}; compaction runs inside prefill: "
                            "use --disable-prefill-cuda-graph, the default with compression)")
    if val("enable_streaming_session"):
        problems.append("--enable-streaming-session (a session's requests share KV rows that compaction rewrites)")
    arch = _architecture(val("model_path"))
    if arch is not None and arch not in SUPPORTED_ARCHS:
        problems.append(f"model architecture {arch} (supported: {sorted(SUPPORTED_ARCHS)})")
    return f"--kv-compression {config.policy} does not work with " + "; ".join(problems) if problems else None


# ---- sgl.Engine (in-process; no command line) -------------------------------------------------------
def _let_engine_take_flags() -> None:
    """Make ``sgl.Engine(..., kv_compression=..., hybridkv_<knob>=...)`` work.

    ``Engine.__init__`` loads the plugins and then builds its ``ServerArgs`` with ``self.server_args_class(**kwargs)``,
    which refuses unknown keywords and never passes through ``prepare_server_args``; so that class attribute is
    swapped for :func:`engine_server_args`. Directly, not through the HookRegistry: a hook on it would be a class
    REPLACE, which the registry propagates to every module's ``ServerArgs`` binding. Only where the engine
    module is loaded (the Engine's and the launcher's process), so schedulers do not import it.
    """
    engine = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine is not None and engine.Engine.__dict__.get("server_args_class") is not _ENGINE_ARGS:
        engine.Engine.server_args_class = _ENGINE_ARGS


def engine_server_args(**kwargs):
    """SGLang's ``ServerArgs`` for ``sgl.Engine(**kwargs)``, taking ``kv_compression`` and ``hybridkv_*``.

    Validates the knobs (``ConfigError``, a ValueError naming knob and range), refuses what does not work yet,
    implies the attention backend as the CLI does, and exports the config for the
    scheduler processes the engine spawns next. Without ``kv_compression`` (or with ``none``) the engine runs
    unchanged, also after a compressed engine in the same process.
    """
    from sglang.srt.server_args import ServerArgs

    ours = {k: kwargs.pop(k) for k in list(kwargs) if k == "kv_compression" or k.startswith("hybridkv_")}
    unknown = sorted(set(ours) - set(ENGINE_KWARGS))
    if unknown:
        raise ConfigError(f"unknown sgl.Engine argument(s) {unknown}; sglang-hybridkv takes {list(ENGINE_KWARGS)}")
    config = HybridKVConfig.from_cli(ours)
    if not config.enabled:
        os.environ.pop(ENV_VAR, None)
        return ServerArgs(**kwargs)
    check_targets()
    limit_bytes(config)  # a ConfigError when the host tier's limit is more than the machine has
    for name in BACKEND_FIELDS:
        refusal = _backend_refusal(config, name, kwargs.pop(name, None))
        if refusal:
            raise ConfigError(refusal)
    chosen = {f for f in DECODE_GRAPH_FIELDS if kwargs.get(f) not in (None, False)}
    server_args = ServerArgs(**{**kwargs, **_implied(kwargs.get("device"), chosen)})
    problems = _unsupported(server_args, config)
    if problems:
        raise ConfigError(problems)
    os.environ[ENV_VAR] = config.to_json()
    logger.info("hybridkv: sgl.Engine with kv_compression=%s, config %s", config.policy, config.to_json())
    return server_args


_ENGINE_ARGS = staticmethod(engine_server_args)


def _device(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name == "--device":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _kv_heads(model_path: str | None) -> int | None:
    """The model's KV head count from its ``config.json`` (``text_config`` for VLMs); None when unknown."""
    path = os.path.join(model_path or "", "config.json")
    if not model_path or not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config") or cfg
    n = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    return int(n) if n else None


def _architecture(model_path: str | None) -> str | None:
    if not model_path:
        return None
    path = os.path.join(model_path, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        archs = json.load(f).get("architectures") or [None]
    return archs[0]


# ---- tokenizer-manager side (launcher process) ------------------------------------------------------
def _validate_request(self, obj, *args, **kwargs):
    sps = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]
    for sp in sps:
        get = sp.get if isinstance(sp, dict) else (lambda k, sp=sp: getattr(sp, k, None))
        cfg = request_config(get("custom_params"))  # raises ConfigError (a ValueError: SGLang answers 400)
        if cfg is not None and cfg.enabled and (get("beam_width") or 1) > 1:
            way = ("send custom_params={'hybridkv': {'policy': 'none'}} to run it uncompressed"
                   if "policy" in cfg.overridable else "this server does not let a request turn compression off "
                   f"(--hybridkv-request-overrides {cfg.request_overrides})")
            raise ConfigError(f"beam search (beam_width={get('beam_width')}) does not work with KV compression: "
                              f"beam members copy rows that compaction rewrote; {way}")
    return None


def _one_stats_dict(orig, self, *args, **kwargs):
    """Every response (streamed chunks included): ``meta_info["hybridkv"]`` is one dict, or absent when the
    request compressed nothing. SGLang accumulates per-request customized info as a list per request."""
    responses = orig(self, *args, **kwargs)

    async def normalized():
        async for out in responses:
            meta = out.get("meta_info") if isinstance(out, dict) else None
            if meta is not None and isinstance(meta.get("hybridkv"), list):
                reported = [x for x in meta["hybridkv"] if x]
                if reported:
                    meta["hybridkv"] = dict(reported[-1])
                else:
                    del meta["hybridkv"]
            yield out

    return normalized()


__all__ = ["register"]
