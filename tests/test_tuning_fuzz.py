"""Generated hostile tuning commands (hil_tests/tuning_fuzz.py): 0 crashes, 0 applied changes. The
bench runs 10,000 (`python -m hil_tests.tuning_fuzz`); the default suite a few hundred."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.strict_json import JsonLimits, JsonRefused, decode_json, nesting_depth
from hil_tests.tuning_fuzz import KINDS, generate, run_payloads

LIMITS = JsonLimits(max_bytes=16_384)


async def test_generated_hostile_commands_crash_nothing_and_change_nothing(tmp_path: Path) -> None:
    items = generate(440, seed_value=3)
    assert len(items) == 440
    counts = await run_payloads(items, tmp_path)
    assert counts.crashes == 0
    assert counts.accepted == 0
    assert counts.refused == 440
    assert not counts.file_written
    assert len({kind.split("-")[0] for kind in counts.kinds}) >= len(KINDS) - 1  # every family drawn


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_are_refused_never_raise_otherwise(raw: bytes) -> None:
    try:
        decode_json(raw, LIMITS)
    except JsonRefused as err:
        assert err.errors  # noqa: PT017 - the refusal names its rule


finite = st.floats(allow_nan=False, allow_infinity=False)
acceptable_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(acceptable_json)
def test_json_within_the_bounds_is_decoded_exactly(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    depth_ok = text.count(b"[") + text.count(b"{") <= LIMITS.max_depth  # a loose bound: strings may hold brackets
    try:
        decoded = decode_json(text, LIMITS)
    except JsonRefused as err:
        # Lone surrogates are not UTF-8; deep values are refused; nothing else.
        assert any("not UTF-8" in e or "levels deep" in e for e in err.errors), err.errors  # noqa: PT017
        assert not depth_ok or "not UTF-8" in err.errors[0]  # noqa: PT017
        return
    assert decoded == value


deep_json = st.recursive(
    st.integers(-(10**6), 10**6) | st.text(alphabet='[]{}"\\,: ab', max_size=8),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), inner,
                                                                max_size=2),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(deep_json)
def test_the_scan_counts_exactly_the_depth_json_has(value: Any) -> None:
    """Against the slow reference (walking the decoded value): strings full of brackets, quotes and
    backslashes are text to both."""
    text = json.dumps(value).encode()
    depth = nesting_depth(value, 10**6)
    assert decode_json(text, JsonLimits(max_bytes=10**6, max_depth=depth)) == value
    if depth > 0:
        with pytest.raises(JsonRefused, match=f"nested {depth} levels deep"):
            decode_json(text, JsonLimits(max_bytes=10**6, max_depth=depth - 1))
