"""Settings arrive as any JSON value (API, config.json): every key x every type is clamped or defaulted, once-warned."""

from __future__ import annotations

import logging
import math

import pytest

from lib_memslice import settings as s

JSON_VALUES = [
    None, True, False, "", "garbage", "3.5", " 7 ", [1, 2], {"a": 1}, [], {},
    float("nan"), float("inf"), -float("inf"), -5, 0, 1, 2.5, 1e308, -1e308, 10**400, "nan", "every", "EINSUM",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_warnings():
    s._warned.clear()
    s._cache.clear()
    yield


def valid(spec, value):
    if spec.kind == "float":
        return isinstance(value, float) and spec.lo <= value <= spec.hi and math.isfinite(value)
    if spec.kind == "int":
        return type(value) is int and spec.lo <= value <= spec.hi
    if spec.kind == "bool":
        return type(value) is bool
    return value in spec.choices


@pytest.mark.parametrize("spec", s.SPECS, ids=lambda spec: spec.key)
@pytest.mark.parametrize("raw", JSON_VALUES, ids=repr)
def test_every_key_and_json_type_gives_a_valid_value(spec, raw, caplog):
    with caplog.at_level(logging.WARNING, logger="memslice"):
        result = s.coerce_all({spec.key: raw})
        again = s.coerce_all({spec.key: raw})
    value = getattr(result, spec.field)
    assert valid(spec, value), (raw, value)
    assert again == result
    warnings = [r for r in caplog.records if spec.key in r.getMessage()]
    value_is_fine = s.coerce(spec, raw)[1] is None
    assert len(warnings) == (0 if value_is_fine else 1)  # one warning per key and value, not one per call
    if warnings:
        assert "memslice" in warnings[0].getMessage()


def test_clamps_and_defaults_are_the_sensible_ones():
    assert s.coerce(s.SPEC_BY_KEY["memslice_safety_factor"], 0.2)[0] == 1.0
    assert s.coerce(s.SPEC_BY_KEY["memslice_safety_factor"], float("inf"))[0] == 10.0
    assert s.coerce(s.SPEC_BY_KEY["memslice_safety_factor"], float("nan"))[0] == 3.3
    assert s.coerce(s.SPEC_BY_KEY["memslice_safety_factor"], "5")[0] == 5.0
    assert s.coerce(s.SPEC_BY_KEY["memslice_slice_cap"], 1e308)[0] == 65536
    assert s.coerce(s.SPEC_BY_KEY["memslice_slice_cap"], -3)[0] == 1
    assert s.coerce(s.SPEC_BY_KEY["memslice_slice_cap"], 64.0) == (64, None)  # gradio sends floats
    assert s.coerce(s.SPEC_BY_KEY["memslice_slice_cap"], 10.6)[0] == 11
    assert s.coerce(s.SPEC_BY_KEY["memslice_budget_gb"], -1)[0] == 0.0
    assert s.coerce(s.SPEC_BY_KEY["memslice_oom_retry"], "false") == (False, None)
    assert s.coerce(s.SPEC_BY_KEY["memslice_oom_retry"], 2)[0] is True  # default, with a warning
    assert s.coerce(s.SPEC_BY_KEY["memslice_log"], "Every Call") == ("every call", None)
    assert s.coerce(s.SPEC_BY_KEY["memslice_kernel"], "EINSUM") == ("einsum", None)


def test_read_settings_uses_defaults_for_missing_options_and_survives_a_broken_getter():
    assert s.read_settings(lambda key, default: default) == s.Settings()

    def broken(key, default):
        raise RuntimeError("options not ready")

    assert s.read_settings(broken) == s.Settings()


def test_read_settings_is_cached_but_type_sensitive():
    values = {"memslice_oom_retry": 1}
    first = s.read_settings(lambda k, d: values.get(k, d))
    values["memslice_oom_retry"] = True
    assert s.read_settings(lambda k, d: values.get(k, d)) == first  # 1 and True both mean on
    values["memslice_slice_cap"] = [64]
    assert s.read_settings(lambda k, d: values.get(k, d)).slice_cap == 4096  # unhashable: still works


def test_as_options_round_trips():
    custom = s.Settings(safety_factor=2.0, slice_cap=128, budget_gb=6.0, kernel="einsum", oom_retry=False,
                        vae="off", log="off")  # fmt: skip
    assert s.coerce_all(custom.as_options()) == custom


def test_specs_match_the_issue():
    keys = {spec.key: spec for spec in s.SPECS}
    assert set(keys) == {
        "memslice_safety_factor", "memslice_slice_cap", "memslice_budget_gb", "memslice_kernel",
        "memslice_oom_retry", "memslice_vae", "memslice_log",
    }  # fmt: skip
    assert (keys["memslice_safety_factor"].lo, keys["memslice_safety_factor"].hi) == (1.0, 10.0)
    assert keys["memslice_safety_factor"].default == 3.3 and keys["memslice_slice_cap"].default == 4096
    assert (keys["memslice_slice_cap"].lo, keys["memslice_slice_cap"].hi) == (1, 65536)
    assert keys["memslice_log"].choices == ("off", "summary", "every call")


LEGACY_VAE = [(True, "auto"), (False, "off"), ("true", "auto"), ("False", "off"), (1, "auto"), (0, "off"),
              ("attention", "attention"), ("OFF", "off")]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), LEGACY_VAE)
def test_the_vae_choice_reads_what_the_old_switch_stored_without_a_warning(raw, expected, caplog):
    """memslice_vae was a checkbox before 0.4.0: config.json files hold true/false, read as auto/off silently."""
    spec = s.SPEC_BY_KEY["memslice_vae"]
    with caplog.at_level("WARNING", logger="memslice"):
        assert s.coerce(spec, raw) == (expected, None)
        assert s.coerce_all({"memslice_vae": raw}).vae == expected
    assert not caplog.records
    assert s.coerce(spec, "sometimes")[0] == "auto" and s.coerce(spec, [True])[1] is not None
