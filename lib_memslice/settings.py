"""Every user-facing option, its default, its range, and the clamping of raw values.

Values reach memslice from the settings page, from ``POST /sdapi/v1/options`` (any JSON type) and from a
hand-edited config.json, and they are read inside every attention call. So reading must never raise, must
be cheap, and must say once (not once per call) when a value was unusable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

log = logging.getLogger("memslice")

#: the highest slice cap the settings accept
MAX_SLICE_CAP = 65536
KERNELS: tuple[str, ...] = ("auto", "sdpa", "einsum")
LOG_LEVELS: tuple[str, ...] = ("off", "summary", "every call")
#: what memslice does to the VAE: ``attention`` slices its attention; ``auto`` too, and runs its decode and encode in
#: exact bands (:mod:`lib_memslice.bands`) when a pass would not fit; ``off`` leaves the webui's stock VAE
VAE_MODES: tuple[str, ...] = ("auto", "attention", "off")

#: The settings-page section (id, title) and the webui category the section appears under.
SECTION = ("memslice", "Memory slicing")
CATEGORY_ID = "sd"

MISSING: Any = object()


@dataclass(frozen=True)
class OptionSpec:
    """One option: its key in ``shared.opts``, its type and range, and the texts the settings page shows."""

    field: str
    kind: str  # "float" | "int" | "bool" | "choice"
    default: Any
    label: str
    info: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    step: float | None = None
    was_bool: tuple[str, str] | None = None  # a choice that was an on/off switch: the choices true and false read as

    @property
    def key(self) -> str:
        return f"memslice_{self.field}"


SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "safety_factor",
        "float",
        3.3,
        "Safety factor",
        "memslice's own strategies plan in free memory divided by this (the webui's Doggettx and InvokeAI rules in "
        "free memory x 3.3 / this, never more than free memory); raise it if you still see out-of-memory errors",
        lo=1.0,
        hi=10.0,
        step=0.1,
    ),
    OptionSpec(
        "slice_cap",
        "int",
        4096,
        "Slice cap",
        "most slices one attention call may be split into before memslice reports that it cannot fit",
        lo=1,
        hi=MAX_SLICE_CAP,
        step=1,
    ),
    OptionSpec(
        "budget_gb",
        "float",
        0.0,
        "Attention budget (GiB)",
        "0 = probe the device's free memory; any other value is the room every attention call plans in, fixed "
        "(use it on DirectML, where free memory cannot be read)",
        lo=0.0,
        hi=4096.0,
    ),
    OptionSpec(
        "kernel",
        "choice",
        "auto",
        "Kernel per slice",
        "auto = fused scaled_dot_product_attention where it runs, else einsum",
        choices=KERNELS,
    ),
    OptionSpec(
        "oom_retry",
        "bool",
        True,
        "Retry with more slices on out-of-memory",
        "double the slices and retry instead of failing the generation",
    ),
    OptionSpec(
        "vae",
        "choice",
        "auto",
        "VAE",
        "auto = memslice slices the VAE's attention and, when a decode or encode would not fit, runs it in the "
        "fewest exact bands of rows that fit (the same image, no seams); attention = the attention sliced only; "
        "off = the webui's stock VAE, its attention in one piece",
        choices=VAE_MODES,
        was_bool=("auto", "off"),
    ),
    OptionSpec(
        "log",
        "choice",
        "summary",
        "Console log",
        "summary = one line per generation; every call = one line per attention call",
        choices=LOG_LEVELS,
    ),
)

SPEC_BY_KEY: dict[str, OptionSpec] = {s.key: s for s in SPECS}


@dataclass(frozen=True)
class Settings:
    """The validated options. Construct from raw values with :func:`read_settings` or :func:`coerce_all`."""

    safety_factor: float = 3.3
    slice_cap: int = 4096
    budget_gb: float = 0.0
    kernel: str = "auto"
    oom_retry: bool = True
    vae: str = "auto"
    log: str = "summary"

    def as_options(self) -> dict[str, Any]:
        """The settings keyed as in ``shared.opts`` (what the API and config.json use)."""
        return {f"memslice_{f.name}": getattr(self, f.name) for f in fields(self)}


assert [s.field for s in SPECS] == [f.name for f in fields(Settings)], "SPECS and Settings disagree"
assert all(getattr(Settings(), s.field) == s.default for s in SPECS), "SPECS and Settings defaults disagree"

_TRUE = {"true", "1", "yes", "on", "enabled"}
_FALSE = {"false", "0", "no", "off", "disabled", ""}
_ALIASES = {"every": "every call", "every_call": "every call", "all": "every call", "none": "off"}


def _number(raw: Any) -> float | None:
    """A finite-or-infinite float from an int/float/numeric string, else None (bools are not numbers here)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        try:
            return float(raw)
        except OverflowError:  # an int too large for a float
            return math.inf if raw > 0 else -math.inf
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            return None
    return None


def coerce(spec: OptionSpec, raw: Any) -> tuple[Any, str | None]:
    """Return ``(value, problem)``: a valid value for ``spec`` and, if ``raw`` was not one, why."""
    if raw is MISSING:
        return spec.default, None
    if spec.kind in ("float", "int"):
        x = _number(raw)
        if x is None or math.isnan(x):
            return spec.default, f"not a number, using the default {spec.default}"
        lo, hi = spec.lo, spec.hi
        clamped = min(max(x, lo), hi) if lo is not None and hi is not None else x
        if spec.kind == "int":
            value = math.floor(clamped + 0.5)
            if clamped != x:
                return value, f"out of range [{int(lo)}, {int(hi)}], clamped to {value}"
            if value != x:
                return value, f"not a whole number, rounded to {value}"
            return value, None
        if clamped != x:
            return clamped, f"out of range [{lo}, {hi}], clamped to {clamped}"
        return x, None
    if spec.kind == "bool":
        flag = _as_bool(raw)
        if flag is not None:
            return flag, None
        return spec.default, f"not a true/false value, using the default {spec.default}"
    # choice
    if isinstance(raw, str):
        text = raw.strip().lower()
        text = _ALIASES.get(text, text)
        if text in spec.choices:
            return text, None
    if spec.was_bool is not None:  # what an earlier version stored: read as the choice it meant, without a warning
        flag = _as_bool(raw)
        if flag is not None:
            return spec.was_bool[0 if flag else 1], None
    return spec.default, f"not one of {', '.join(spec.choices)}; using {spec.default!r}"


def _as_bool(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    return None


_warned: set[tuple[str, str]] = set()
_WARN_MEMORY = 512


def warn_once(key: str, raw: Any, problem: str) -> None:
    """Log a bad value once per key and value (values are re-read on every attention call)."""
    shown = repr(raw)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    token = (key, shown)
    if token in _warned:
        return
    if len(_warned) >= _WARN_MEMORY:
        _warned.clear()
    _warned.add(token)
    log.warning("memslice: setting %s=%s is %s", key, shown, problem)


def coerce_all(raw: Mapping[str, Any]) -> Settings:
    """Validate a mapping of option keys (``memslice_*``) to raw values; unknown keys are ignored."""
    values = {}
    for spec in SPECS:
        value, problem = coerce(spec, raw.get(spec.key, MISSING))
        if problem is not None:
            warn_once(spec.key, raw.get(spec.key), problem)
        values[spec.field] = value
    return Settings(**values)


_cache: dict[tuple[Any, ...], Settings] = {}
_CACHE_SIZE = 64


def _cache_token(value: Any) -> Any:
    # type is part of the key: True == 1 == 1.0 hash alike but validate differently
    try:
        hash(value)
    except TypeError:
        return (type(value), repr(value))
    return (type(value), value)


_KEYS: tuple[str, ...] = tuple(s.key for s in SPECS)


def read_settings(get: Callable[[str, Any], Any]) -> Settings:
    """Read every option through ``get(key, default)`` (e.g. a bound ``getattr`` on ``shared.opts``)."""
    try:
        raw = tuple([get(key, MISSING) for key in _KEYS])
    except Exception:  # a broken options object must not cost a generation
        raw = tuple(_read_one(get, key) for key in _KEYS)
    return _settings_of(raw)


def read_options(opts: Any) -> Settings:
    """The settings of a webui ``Options`` object (``shared.opts``). Where its ``data`` dict holds every key (the
    webui's ``add_option`` puts each registered option there), one C-level pass over it and the cache's lookup,
    written out here. Why: this runs inside each attention forward, with the caches cold between two calls on a
    CPU, where each Python call cost 3-10 us and a call per key 10-20 us. Else key by key, a key ``data`` holds
    read from it (``getattr`` on the webui's Options fails the normal lookup first, an AttributeError raised and
    caught, before ``Options.__getattr__`` finds it there), any other through ``getattr``, which gives its
    registered default."""
    data = getattr(opts, "data", None)
    if type(data) is not dict:
        return read_settings(lambda key, default: getattr(opts, key, default))
    raw = tuple(map(data.get, _KEYS))
    if None not in raw:
        try:
            hit = _cache.get((raw, tuple(map(type, raw))))  # :func:`_settings_of`'s token
        except TypeError:
            hit = None
        return hit if hit is not None else _settings_of(raw)

    def get(key: str, default: Any) -> Any:
        value = data.get(key, MISSING)
        return getattr(opts, key, default) if value is MISSING else value

    return read_settings(get)


def _settings_of(raw: tuple[Any, ...]) -> Settings:
    """The settings of raw values, cached (both reads run on every attention call): the values and their types are
    the key (True == 1 hash alike but validate differently), a value that cannot be hashed is keyed by its repr."""
    token: Any = (raw, tuple(map(type, raw)))
    try:
        hit = _cache.get(token)
    except TypeError:  # an unhashable value (a list from a hand-edited config.json)
        token = tuple(_cache_token(value) for value in raw)
        hit = _cache.get(token)
    if hit is not None:
        return hit
    result = coerce_all(dict(zip(_KEYS, raw, strict=True)))
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[token] = result
    return result


def _read_one(get: Callable[[str, Any], Any], key: str) -> Any:
    try:
        return get(key, MISSING)
    except Exception:
        return MISSING
