"""Budget strings: human units parsed, nonsense refused with a message that shows the way out."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import metaopt as mo


@pytest.mark.parametrize("text, expected", [
    ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("100k", 100_000), ("2 GB", 2 * 10**9),
    ("4096", 4096), (1024, 1024), ("3MiB", 3 * 2**20), ("7b", 7),
])
def test_parse_bytes(text, expected):
    assert mo.parse_bytes(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("30s", 30.0), ("500ms", 0.5), ("2min", 120.0), ("1.5h", 5400.0), ("10", 10.0), (2.5, 2.5), ("1 day", 86400.0),
])
def test_parse_seconds(text, expected):
    assert mo.parse_seconds(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad, message", [
    ("12 parsecs", "cannot parse '12 parsecs'"),
    ("-5MB", "must be positive"),
    ("0", "must be positive"),
    ("MB", "cannot parse"),
    ("nan", "cannot parse"),
    (True, "expected a number"),
])
def test_bad_memory_strings(bad, message):
    with pytest.raises(ValueError, match=message):
        mo.Budget(memory=bad)


def test_bad_time_and_on_exceed():
    with pytest.raises(ValueError, match="time budget: cannot parse '3 fortnights'"):
        mo.Budget(time="3 fortnights")
    with pytest.raises(ValueError, match="on_exceed must be 'raise', 'truncate' or 'skip', got 'ignore'"):
        mo.Budget(on_exceed="ignore")


def test_budget_normalizes_units():
    budget = mo.Budget(memory="512MB", time="2min")
    assert (budget.memory, budget.time, budget.unlimited) == (512 * 10**6, 120.0, False)
    assert mo.Budget().unlimited


@given(value=st.floats(min_value=1e-3, max_value=1e6, allow_nan=False),
       unit=st.sampled_from([("KiB", 2**10), ("MB", 10**6), ("GiB", 2**30), ("", 1)]))
def test_parse_bytes_scales_any_number(value, unit):
    suffix, factor = unit
    if value * factor < 1:
        with pytest.raises(ValueError, match="less than one byte"):
            mo.parse_bytes(f"{value!r}{suffix}")
    else:
        assert mo.parse_bytes(f"{value!r}{suffix}") == int(value * factor)
