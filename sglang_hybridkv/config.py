"""HybridKVConfig: every knob of the method, validated, with CLI / environment / per-request mappings.

One dataclass is the single source of truth, and each knob is declared once: its field carries, in
``dataclasses.field(metadata=...)``, a :class:`Knob` with its type, range or choices, whether it has a
``--hybridkv-<knob>`` flag and whether a request may override it. From those declarations the SGLang plugin
builds its flags, the config validates itself, travels to scheduler processes as JSON in ``ENV_VAR``, and a
request overrides the subset in ``REQUEST_FIELDS`` that the operator allows (``request_overrides``). Every
validation error names the knob, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

POLICIES = ("none", "full", "snapkv", "hybridkv", "all_static", "all_dynamic")
CLASSIFIERS = ("mass", "entropy", "topk_mass")
PRIORS = ("layer", "late")
BUDGET_UNITS = ("device", "media")
ENV_VAR = "SGLANG_HYBRIDKV_CONFIG"
# The two ways to say how much device KV a request keeps; a user gives one of them, never both.
BUDGET_FIELDS = ("budget", "budget_tokens")
# Named sets of per-request overrides an operator may allow (``request_overrides``); a list of fields also works.
OVERRIDE_SETS = {"all": None, "budget": BUDGET_FIELDS, "none": ()}  # None: every field in REQUEST_FIELDS


class ConfigError(ValueError):
    """A knob has a value outside what is allowed. The message names knob, value and allowed range."""


@dataclass(frozen=True)
class Knob:
    """How one knob of :class:`HybridKVConfig` is typed, bounded and exposed (the field's ``metadata["knob"]``).

    Attributes:
        kind: ``int``, ``float`` or ``str``.
        lo, hi: allowed range of a number, closed unless ``lo_open``.
        choices: allowed values of a string.
        optional: None is allowed (``none`` or ``auto`` on the command line).
        per_request: a request may override it (``custom_params["hybridkv"]``), if the operator allows.
        flag: it has a ``--hybridkv-<knob>`` flag (``policy`` has ``--kv-compression`` instead).
        rule: a further check of the value alone; returns what is wrong, or None.
        what: what the value must be, in errors about its type (default: a number / an integer / a string).
    """

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    per_request: bool = False
    flag: bool = True
    rule: Callable[[Any], str | None] | None = None
    what: str | None = None

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``name``, ``value`` and what is allowed."""
        if value is None and self.optional:
            return
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{name}={value!r} is not allowed: choose one of {list(self.choices)}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{name}={value!r} is not allowed: it must be {self.what or 'a string'}")
        else:
            ok = isinstance(value, (int, float)) if self.kind is float else isinstance(value, int)
            if isinstance(value, bool) or not ok:
                what = self.what or ("a number" if self.kind is float else "an integer")
                raise ConfigError(f"{name}={value!r} is not allowed: it must be {what}")
            if value != value or value < self.lo or value > self.hi or (self.lo_open and value == self.lo):
                raise ConfigError(f"{name}={value!r} is out of range: allowed {self.allowed}")
        problem = None if self.rule is None else self.rule(value)
        if problem:
            raise ConfigError(f"{name}={value!r} is not allowed: {problem}")

    @property
    def allowed(self) -> str:
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        elif self.kind is str:
            text = self.what or "a string"
        else:
            text = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"
        return text + (" or none" if self.optional else "")

    def parse(self, text: str) -> Any:
        """The value of a command-line string (its range is checked later, with the whole config)."""
        if self.optional and text.lower() in ("none", "auto"):
            return None
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {self.allowed}") from None


def knob(default: Any, kind: type, **spec: Any) -> Any:
    """Declare a knob: its default and its :class:`Knob` (see there for ``spec``)."""
    return dataclasses.field(default=default, metadata={"knob": Knob(kind, **spec)})


def _odd(value: int) -> str | None:
    return None if value % 2 else "it must be odd (1, 3, 5, ...)"


def _override_fields(value: str) -> tuple[str, ...] | None:
    """The fields ``request_overrides`` lets a request set; None when ``value`` names none known."""
    if value in OVERRIDE_SETS:
        named = OVERRIDE_SETS[value]
        return REQUEST_FIELDS if named is None else named
    fields = tuple(f.strip() for f in value.split(",") if f.strip())
    return fields if fields and set(fields) <= set(REQUEST_FIELDS) else None


def _overrides_rule(value: str) -> str | None:
    if _override_fields(value) is not None:
        return None
    return (f"choose one of {list(OVERRIDE_SETS)} or a comma-separated list of per-request fields "
            f"{list(REQUEST_FIELDS)}")


@dataclass(frozen=True)
class HybridKVConfig:
    """Knobs of HybridKV compression (the method: README "How it works" and ``core/``, in the order it runs).

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
        host_tier_gb: most host memory, in GB (1e9 bytes), that dynamic heads' media KV may take in the host tier
            of one scheduler process; None: a quarter of the machine's memory (``runtime/host_tier.py``). A request
            that would need more is compressed with every head static, and its stats say so.
        request_overrides: which knobs a request may override (``custom_params["hybridkv"]``): "all" (every
            per-request knob), "budget" (``budget`` and ``budget_tokens``), "none", or a comma-separated list
            of per-request knobs. A refused override is an error naming this switch.
    """

    # Defaults chosen by the knob study (benchmarks/fidelity.py --sweep --quick, benchmarks/results/fidelity-sweep.json
    # of 2026-12-01: hybridkv on 10 captioned-video tasks of 48 frames, SmolLM2, accuracy at budgets 0.05 / 0.1 /
    # 0.2, the other knobs at their defaults); 0.1 decides, 10 tasks resolve 0.1, so values within 0.1 of each
    # other are ties and the simpler one stays. "earlier": the sweep before the cross-layer prior (per-layer rule).
    policy: str = knob("hybridkv", str, choices=POLICIES, per_request=True, flag=False)
    budget: float = knob(0.1, float, lo=0.0, hi=1.0, lo_open=True, per_request=True)
    budget_unit: str = knob("device", str, choices=BUDGET_UNITS)
    budget_tokens: int | None = knob(None, int, lo=1, hi=1 << 24, optional=True, per_request=True)
    # 8: 0.1/1.0/1.0, 16: 0.0/1.0/1.0, 32: 0.1/0.5/1.0 (its 10 caption tokens dilute the question); earlier 8:
    # 0.2/0.5/1.0, 16: 0.0/0.7/0.9, 32: 0.1/0.4/0.8
    window: int = knob(16, int, lo=1, hi=4096)
    theta: float = knob(0.9, float, lo=0.0, hi=1.0, lo_open=True, per_request=True)  # 0.5 / 0.7 / 0.9 tie (0.0/1.0/1.0; earlier 0.7 at 0.1 each)
    static_ratio: float | None = knob(None, float, lo=0.0, hi=1.0, optional=True, per_request=True)
    # 0.0 and 0.5: 0.0/1.0/1.0; 1.0 (shares by need alone): 0.0/0.2/0.4 — it starves the cue heads; security_log@0.05,
    # every head static: 0.5 scored 0.67, equal shares (snapkv) 1.00 (fidelity-security_log.json of 2026-11-30).
    need_weight: float = knob(0.0, float, lo=0.0, hi=1.0)
    # The dynamic-head knobs tie on these prompts (0.0/1.0/1.0 for every value: at 0.1 every head is static, at 0.2
    # a quarter are dynamic and every value answers all): chunk_size 16/32/64, static_ratio None/0.75,
    # chunk_score_scale 0/0.25/1, retrieval_interval 1/4. The simplest stay.
    chunk_size: int = knob(16, int, lo=1, hi=1024)
    top_k_chunks: int | None = knob(None, int, lo=1, hi=1 << 20, optional=True, per_request=True)
    retrieval_interval: int = knob(1, int, lo=1, hi=1 << 20, per_request=True)
    chunk_score_scale: float = knob(0.25, float, lo=0.0, hi=1.0)  # chunk-mass recovery study in core/chunks.py
    sink: int = knob(4, int, lo=0, hi=1 << 20)
    recent: int = knob(0, int, lo=0, hi=1 << 20)
    pool_kernel: int = knob(7, int, lo=1, hi=255, rule=_odd)  # 1: 0.1/0.9/1.0, 7 and 15: 0.0/1.0/1.0 (earlier 1/3/7/15 tied: 0.7/0.9 at 0.1/0.2)
    # 0: 0.3/1.0/1.0, 4/8/16: 0.0/1.0/1.0. On 20 captioned tasks (fidelity-sweep-pool_forward-captioned_video.json)
    # 0: 0.25/0.95/1.00, 4: 0.05/1.00/1.00, 8: 0.05/1.00/1.00, 16: 0.00/0.95/1.00; security log, 20 tasks: 1.00
    # everywhere but 16 at 0.05 (0.80). 0.1 decides: 8 stays, capped at a quarter of a head's media rows, which
    # keeps both (captioned@0.05: ~9 rows, reach 2: 5/20 like reach 0; reach 1/2/3: 0.25/0.25/0.15 at 0.05, 0.95
    # at 0.1, fidelity-sweep-reach-captioned_video.json). Earlier 0: 0.4/0.7, 8: 0.7/0.9 at 0.1/0.2.
    pool_forward: int = knob(8, int, lo=0, hi=1024)
    # late (max over the upper half's layers) vs layer (own layer, SnapKV's rule), hybridkv, 16 captioned-video
    # tasks (2 per cell, SmolLM2) at 0.05 / 0.1 / 0.2: 0.38 / 1.00 / 1.00 vs 0.12 / 0.75 / 0.88 (the mean over those
    # layers: 0.31 / 0.94 / 1.00); 20 tasks (4 per cell, 48 frames): max 0.05 / 1.00 / 1.00, mean 0.05 / 0.95 / 1.00;
    # security log, 20 tasks: 1.00 everywhere with either. "mix" (own + prior) 0.25 / 0.88 / 1.00. Quickstart's
    # 8 questions at 0.1 on the server: max 7/8, mean 5/8, layer 3/8 (full 5/8). README "Fidelity" has the tables.
    prior: str = knob("late", str, choices=PRIORS)
    classifier: str = knob("mass", str, choices=CLASSIFIERS)  # mass / entropy / topk_mass tie (0.0/1.0/1.0; earlier 0.7 at 0.1 each)
    head_profile: str | None = knob(None, str, optional=True, what="a file path")
    # Server-wide operation: how much host memory the tier may take, and what clients may change.
    host_tier_gb: float | None = knob(None, float, lo=0.0, hi=float(1 << 20), lo_open=True, optional=True)
    request_overrides: str = knob("all", str, rule=_overrides_rule,
                                  what="'all', 'budget', 'none' or a comma-separated list of per-request knobs")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec(f).check(f.name, getattr(self, f.name))
        if self.budget_tokens is not None and self.budget_unit != "device":
            raise ConfigError(f"budget_tokens={self.budget_tokens} is not allowed with budget_unit="
                              f"{self.budget_unit!r}: a token budget counts device rows (budget_unit='device')")

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

    @property
    def overridable(self) -> tuple[str, ...]:
        """The knobs a request may override on this server (``request_overrides``)."""
        return _override_fields(self.request_overrides)

    def with_request(self, params: Mapping[str, Any] | None) -> "HybridKVConfig":
        """Apply one request's overrides (e.g. ``{"policy": "snapkv", "budget": 0.2}``).

        Only ``REQUEST_FIELDS`` may change per request, and of those only the ones ``request_overrides``
        allows; anything else is an error naming the field (and the switch, when the switch refuses it).
        """
        if not params:
            return self
        if not isinstance(params, Mapping):
            raise ConfigError(f"hybridkv request parameters must be an object, got {type(params).__name__}")
        bad = sorted(set(params) - set(REQUEST_FIELDS))
        if bad:
            raise ConfigError(f"hybridkv field(s) {bad} cannot be set per request; allowed: {list(REQUEST_FIELDS)}")
        refused = sorted(set(params) - set(self.overridable))
        if refused:
            raise ConfigError(f"hybridkv field(s) {refused} may not be set per request on this server: "
                              f"--hybridkv-request-overrides {self.request_overrides} allows "
                              f"{list(self.overridable)}")
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
            k = spec(f)
            if k.flag:
                group.add_argument(f"--hybridkv-{f.name.replace('_', '-')}", dest=f"hybridkv_{f.name}", type=k.parse,
                                   default=None, help=f"HybridKV {f.name}: {k.allowed} (default {f.default!r}"
                                                      f"{'; a request may override it' if k.per_request else ''})")

    @classmethod
    def from_cli(cls, args: argparse.Namespace | Mapping[str, Any]) -> "HybridKVConfig":
        """Build from parsed CLI args (attributes ``kv_compression`` and ``hybridkv_<knob>``)."""
        get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
        values: dict[str, Any] = {"policy": get("kv_compression") or "none"}
        for f in dataclasses.fields(cls):
            v = get(f"hybridkv_{f.name}")
            if spec(f).flag and v is not None:
                values[f.name] = v
        _one_budget(values)
        return cls(**values)


def spec(f: dataclasses.Field) -> Knob:
    """The :class:`Knob` declared with a field of :class:`HybridKVConfig`."""
    return f.metadata["knob"]


FIELDS = tuple(f.name for f in dataclasses.fields(HybridKVConfig))
# Knobs a single request may change; the rest shape server-wide memory and stay fixed.
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(HybridKVConfig) if spec(f).per_request)


def _one_budget(given: Mapping[str, Any]) -> None:
    """A user states the budget one way: as a fraction or as tokens."""
    if all(given.get(k) is not None for k in BUDGET_FIELDS):
        raise ConfigError(f"budget={given['budget']!r} and budget_tokens={given['budget_tokens']!r} were both "
                          "given: set exactly one of budget (a fraction of the full KV) or budget_tokens")
