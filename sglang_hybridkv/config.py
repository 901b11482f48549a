"""HybridKVConfig: every knob of the method, validated, with CLI / environment / per-request mappings.

One dataclass is the single source of truth: the SGLang plugin builds its ``--hybridkv-*`` flags from
``FIELDS``, carries a config to scheduler processes as JSON in ``ENV_VAR``, and a request may override the
subset in ``REQUEST_FIELDS``. Every validation error names the knob, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

POLICIES = ("none", "full", "snapkv", "hybridkv", "all_static", "all_dynamic")
CLASSIFIERS = ("mass", "entropy", "topk_mass")
PRIORS = ("layer", "late")
BUDGET_UNITS = ("device", "media")
ENV_VAR = "SGLANG_HYBRIDKV_CONFIG"
# Knobs a single request may change; the rest shape server-wide memory and stay fixed.
REQUEST_FIELDS = ("policy", "budget", "budget_tokens", "theta", "static_ratio", "top_k_chunks", "retrieval_interval")
# The two ways to say how much device KV a request keeps; a user gives one of them, never both.
BUDGET_FIELDS = ("budget", "budget_tokens")


class ConfigError(ValueError):
    """A knob has a value outside what is allowed. The message names knob, value and allowed range."""


@dataclass(frozen=True)
class HybridKVConfig:
    """Knobs of HybridKV compression (see DESIGN.md §2 for the method).

    Attributes:
        policy: which compression policy runs after prefill ("none" disables the plugin).
        budget: device KV a compressed request keeps, as a fraction of its full KV, in (0, 1] (see
            ``budget_unit``).
        budget_unit: "device": everything resident on the device is charged — kept tokens, text and window,
            chunk summaries, retrieval buffers (``core/budget.py``), so budget 0.1 means 10x less device KV
            at the end of prefill; "media": the paper's reading, media tokens per head as a fraction of the
            media tokens, text and summaries not charged.
        budget_tokens: the same budget as a token count instead of a fraction: a compressed request keeps about
            ``budget_tokens`` pool slots (device rows per KV head and layer), whatever its prompt length, which
            is how an operator sizes a pool. When set it replaces ``budget``: :meth:`for_prompt` turns it into
            the fraction ``min(1, budget_tokens / prompt_tokens)`` once the prompt length is known. Device unit
            only.
        window: observation window, the last ``window`` prompt positions whose attention scores keys.
        theta: attention mass a head's kept media tokens must hold to count as concentrated.
        static_ratio: share of a layer's budget given to static heads; None splits by head count.
        need_weight: how static heads share their rows: 1 in proportion to their θ-mass token count, 0 equally,
            in between a mix (``core/budget.py``).
        chunk_size: tokens per retrieval chunk (= page) for dynamic heads.
        top_k_chunks: chunks a dynamic head retrieves per step; None derives it from its budget share.
        retrieval_interval: decode steps between two chunk selections of a dynamic head.
        chunk_score_scale: weight of the min/max box half-width in chunk scores (1.0 = Quest's upper bound;
            see ``core/chunks.py`` for the measurement behind the default).
        sink: first prompt tokens always kept on the device.
        recent: last prompt tokens always kept on the device (besides the observation window's text).
        pool_kernel: width of the 1-D average pooling of text-prior scores (odd; 1 disables pooling).
        pool_forward: forward reach of text-prior scores: a token scores at least the best of the
            ``pool_forward`` tokens before it, so what follows a cue the question names is kept with it
            (0 disables; see ``core/select.py``). The reach used is at most a quarter of the media rows one head
            may keep (``core.policies.base.forward_reach``): at tight budgets on short prompts wide spans crowd
            out the answer.
        prior: what static heads rank media tokens by. "layer": each layer's own window attention (SnapKV's
            rule, per head); "late": one score per token for every static head of every layer, the max over the
            upper half of the layers of their window attention (each head's pooled scores normalised to sum 1), so the
            early layers keep what the later ones find (``core/compress.py``). SnapKV always uses "layer".
        classifier: how heads are classified: "mass" (θ-mass token count vs. budget share, the reference),
            "entropy" or "topk_mass" (alternatives kept for the agreement study).
        head_profile: optional path of a JSON per-model head profile that replaces per-request
            classification: ``{"static": [[bool per KV head] per layer]}``.
    """

    # Defaults chosen by the knob study (benchmarks/fidelity.py --sweep --quick, benchmarks/results/fidelity-sweep.json
    # of 2026-12-01: hybridkv on 10 captioned-video tasks of 48 frames, SmolLM2, accuracy at budgets 0.05 / 0.1 /
    # 0.2, the other knobs at their defaults); 0.1 decides, 10 tasks resolve 0.1, so values within 0.1 of each
    # other are ties and the simpler one stays. "earlier": the sweep before the cross-layer prior (per-layer rule).
    policy: str = "hybridkv"
    budget: float = 0.1
    budget_unit: str = "device"
    budget_tokens: int | None = None
    # 8: 0.1/1.0/1.0, 16: 0.0/1.0/1.0, 32: 0.1/0.5/1.0 (its 10 caption tokens dilute the question); earlier 8:
    # 0.2/0.5/1.0, 16: 0.0/0.7/0.9, 32: 0.1/0.4/0.8
    window: int = 16
    theta: float = 0.9  # 0.5 / 0.7 / 0.9 tie (0.0/1.0/1.0; earlier 0.7 at 0.1 each)
    static_ratio: float | None = None
    # 0.0 and 0.5: 0.0/1.0/1.0; 1.0 (shares by need alone): 0.0/0.2/0.4 — it starves the cue heads; security_log@0.05,
    # every head static: 0.5 scored 0.67, equal shares (snapkv) 1.00 (fidelity-security_log.json of 2026-11-30).
    need_weight: float = 0.0
    # The dynamic-head knobs tie on these prompts (0.0/1.0/1.0 for every value: at 0.1 every head is static, at 0.2
    # a quarter are dynamic and every value answers all): chunk_size 16/32/64, static_ratio None/0.75,
    # chunk_score_scale 0/0.25/1, retrieval_interval 1/4. The simplest stay.
    chunk_size: int = 16
    top_k_chunks: int | None = None
    retrieval_interval: int = 1
    chunk_score_scale: float = 0.25  # chunk-mass recovery study in core/chunks.py
    sink: int = 4
    recent: int = 0
    pool_kernel: int = 7  # 1: 0.1/0.9/1.0, 7 and 15: 0.0/1.0/1.0 (earlier 1/3/7/15 tied: 0.7/0.9 at 0.1/0.2)
    # 0: 0.3/1.0/1.0, 4/8/16: 0.0/1.0/1.0. On 20 captioned tasks (fidelity-sweep-pool_forward-captioned_video.json)
    # 0: 0.25/0.95/1.00, 4: 0.05/1.00/1.00, 8: 0.05/1.00/1.00, 16: 0.00/0.95/1.00; security log, 20 tasks: 1.00
    # everywhere but 16 at 0.05 (0.80). 0.1 decides: 8 stays, capped at a quarter of a head's media rows, which
    # keeps both (captioned@0.05: ~9 rows, reach 2: 5/20 like reach 0; reach 1/2/3: 0.25/0.25/0.15 at 0.05, 0.95
    # at 0.1, fidelity-sweep-reach-captioned_video.json). Earlier 0: 0.4/0.7, 8: 0.7/0.9 at 0.1/0.2.
    pool_forward: int = 8
    # late (max over the upper half's layers) vs layer (own layer, SnapKV's rule), hybridkv, 16 captioned-video
    # tasks (2 per cell, SmolLM2) at 0.05 / 0.1 / 0.2: 0.38 / 1.00 / 1.00 vs 0.12 / 0.75 / 0.88 (the mean over those
    # layers: 0.31 / 0.94 / 1.00); 20 tasks (4 per cell, 48 frames): max 0.05 / 1.00 / 1.00, mean 0.05 / 0.95 / 1.00;
    # security log, 20 tasks: 1.00 everywhere with either. "mix" (own + prior) 0.25 / 0.88 / 1.00. Quickstart's
    # 8 questions at 0.1 on the server: max 7/8, mean 5/8, layer 3/8 (full 5/8). README "Fidelity" has the tables.
    prior: str = "late"
    classifier: str = "mass"  # mass / entropy / topk_mass tie (0.0/1.0/1.0; earlier 0.7 at 0.1 each)
    head_profile: str | None = None

    def __post_init__(self) -> None:
        _choice("policy", self.policy, POLICIES)
        _choice("classifier", self.classifier, CLASSIFIERS)
        _choice("prior", self.prior, PRIORS)
        _choice("budget_unit", self.budget_unit, BUDGET_UNITS)
        _number("budget", self.budget, float, lo=0.0, hi=1.0, lo_open=True)
        if self.budget_tokens is not None:
            _number("budget_tokens", self.budget_tokens, int, lo=1, hi=1 << 24)
            if self.budget_unit != "device":
                raise ConfigError(f"budget_tokens={self.budget_tokens} is not allowed with budget_unit="
                                  f"{self.budget_unit!r}: a token budget counts device rows (budget_unit='device')")
        _number("theta", self.theta, float, lo=0.0, hi=1.0, lo_open=True)
        if self.static_ratio is not None:
            _number("static_ratio", self.static_ratio, float, lo=0.0, hi=1.0)
        _number("need_weight", self.need_weight, float, lo=0.0, hi=1.0)
        _number("window", self.window, int, lo=1, hi=4096)
        _number("chunk_size", self.chunk_size, int, lo=1, hi=1024)
        if self.top_k_chunks is not None:
            _number("top_k_chunks", self.top_k_chunks, int, lo=1, hi=1 << 20)
        _number("retrieval_interval", self.retrieval_interval, int, lo=1, hi=1 << 20)
        _number("chunk_score_scale", self.chunk_score_scale, float, lo=0.0, hi=1.0)
        _number("sink", self.sink, int, lo=0, hi=1 << 20)
        _number("recent", self.recent, int, lo=0, hi=1 << 20)
        _number("pool_kernel", self.pool_kernel, int, lo=1, hi=255)
        _number("pool_forward", self.pool_forward, int, lo=0, hi=1024)
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel={self.pool_kernel} is not allowed: it must be odd (1, 3, 5, ...)")
        if self.head_profile is not None and not isinstance(self.head_profile, str):
            raise ConfigError(f"head_profile={self.head_profile!r} is not allowed: it must be a file path")

    @property
    def enabled(self) -> bool:
        """False for policy "none": the plugin then changes nothing."""
        return self.policy != "none"

    def replace(self, **changes: Any) -> "HybridKVConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def for_prompt(self, prompt_tokens: int) -> "HybridKVConfig":
        """The config one prompt is compressed with: a token budget becomes the fraction the method uses.

        ``budget_tokens`` is kept, so that stats can say what was asked; ``budget`` is then the fraction that
        ran. A prompt no longer than the token budget gets budget 1.0.
        """
        if self.budget_tokens is None:
            return self
        return self.replace(budget=min(1.0, self.budget_tokens / max(1, prompt_tokens)))

    # ---- mappings -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HybridKVConfig":
        """Build from a plain dict (JSON); unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"hybridkv config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown hybridkv knob(s) {unknown}; allowed: {sorted(FIELDS)}")
        return cls(**dict(data))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HybridKVConfig | None":
        """The config a parent process put in ``ENV_VAR``; None when it is unset."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV_VAR} is not valid JSON ({e.msg} at char {e.pos})") from None
        return cls.from_dict(data)

    def with_request(self, params: Mapping[str, Any] | None) -> "HybridKVConfig":
        """Apply one request's overrides (e.g. ``{"policy": "snapkv", "budget": 0.2}``).

        Only ``REQUEST_FIELDS`` may change per request; anything else is an error naming the field.
        """
        if not params:
            return self
        if not isinstance(params, Mapping):
            raise ConfigError(f"hybridkv request parameters must be an object, got {type(params).__name__}")
        bad = sorted(set(params) - set(REQUEST_FIELDS))
        if bad:
            raise ConfigError(f"hybridkv field(s) {bad} cannot be set per request; allowed: {list(REQUEST_FIELDS)}")
        changes = dict(params)
        _one_budget(changes)
        if "budget" in changes:  # a fraction replaces the server's token budget
            changes.setdefault("budget_tokens", None)
        return self.replace(**changes)

    # ---- CLI ------------------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add ``--kv-compression`` and ``--hybridkv-<knob>`` flags (values validated later, in one place)."""
        group = parser.add_argument_group("HybridKV KV-cache compression (sglang-hybridkv)")
        group.add_argument("--kv-compression", dest="kv_compression", default=None, choices=POLICIES,
                           help="KV-cache compression policy applied after prefill (default: none)")
        for f in dataclasses.fields(HybridKVConfig):
            if f.name == "policy":
                continue
            group.add_argument(f"--hybridkv-{f.name.replace('_', '-')}", dest=f"hybridkv_{f.name}",
                               type=_CLI_TYPES[f.name], default=None,
                               help=f"HybridKV {f.name} (default {f.default!r})")

    @classmethod
    def from_cli(cls, args: argparse.Namespace | Mapping[str, Any]) -> "HybridKVConfig":
        """Build from parsed CLI args (attributes ``kv_compression`` and ``hybridkv_<knob>``)."""
        get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
        values: dict[str, Any] = {"policy": get("kv_compression") or "none"}
        for f in dataclasses.fields(cls):
            v = get(f"hybridkv_{f.name}")
            if f.name != "policy" and v is not None:
                values[f.name] = v
        _one_budget(values)
        return cls(**values)


FIELDS = tuple(f.name for f in dataclasses.fields(HybridKVConfig))


def _optional_int(s: str) -> int | None:
    return None if s.lower() in ("none", "auto") else int(s)


def _optional_float(s: str) -> float | None:
    return None if s.lower() in ("none", "auto") else float(s)


_CLI_TYPES = {
    "budget": float, "budget_tokens": int, "budget_unit": str, "window": int, "theta": float, "static_ratio": _optional_float, "need_weight": float, "chunk_size": int,
    "top_k_chunks": _optional_int, "retrieval_interval": int, "chunk_score_scale": float, "sink": int, "recent": int,
    "pool_kernel": int, "pool_forward": int, "prior": str, "classifier": str, "head_profile": str,
}


def _one_budget(given: Mapping[str, Any]) -> None:
    """A user states the budget one way: as a fraction or as tokens."""
    if all(given.get(k) is not None for k in BUDGET_FIELDS):
        raise ConfigError(f"budget={given['budget']!r} and budget_tokens={given['budget_tokens']!r} were both "
                          "given: set exactly one of budget (a fraction of the full KV) or budget_tokens")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed: choose one of {list(allowed)}")


def _number(name: str, value: Any, kind: type, lo: float, hi: float, lo_open: bool = False) -> None:
    ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{name}={value!r} is not allowed: it must be {'a number' if kind is float else 'an integer'}")
    if value != value or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ConfigError(f"{name}={value!r} is out of range: allowed {left}{lo}, {hi}]")
