"""Untrusted JSON (tuning commands, `config set` patches, the overrides file) decoded within bounds.

Python's `json` recurses once per nesting level, turns integer literals of more than 4,300 digits
into a ValueError, takes UTF-16/32 bytes, NaN and Infinity, and keeps the last of duplicate keys.
So before `json.loads` sees a byte, a linear scan (regex substitutions, then a C-level walk over the
brackets; no recursion) checks the size, the nesting depth and the length of every number literal;
the bytes must be UTF-8 with no byte order mark; duplicate keys, NaN/Infinity and numbers beyond a
float are refused.

The scan lexes strings exactly as `json` does, so on any prefix `json` accepts, the depth it reaches
is the depth the scan counted; on text that is not JSON (an unterminated string, whose brackets the
scan counts) it may count more, never less. A 16 kB payload scans in under 1 ms.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonLimits", "JsonRefused", "decode_json", "json_type_name", "nesting_depth"]

# Every tuning document is a few levels deep (command → patch → section → list); eight leaves room.
DEFAULT_MAX_DEPTH = 8
# The longest float repr is 24 characters ("-2.2250738585072014e-308"); 40 is generous, 5,000 is hostile.
DEFAULT_MAX_NUMBER_CHARS = 40

# A string as json lexes it: up to the first unescaped quote, or (unterminated) to the end in one match.
# Requiring the closing quote made every later quote a new start that scanned to the end: quadratic,
# 0.7 s for 16 kB of escaped quotes on the event loop (json.loads refuses such a document anyway).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
# +1 for an opening bracket, -1 for a closing one, by byte value: map() and accumulate() then walk
# the brackets in C, so a megabyte of them costs milliseconds, not a Python loop per byte.
_DELTA = tuple(1 if byte in b"[{" else -1 if byte in b"]}" else 0 for byte in range(256))
_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\xfe\xff", "a UTF-32 byte order mark"),
    (b"\xff\xfe\x00\x00", "a UTF-32 byte order mark"),
    (b"\xef\xbb\xbf", "a UTF-8 byte order mark"),
    (b"\xfe\xff", "a UTF-16 byte order mark"),
    (b"\xff\xfe", "a UTF-16 byte order mark"),
)


class JsonRefused(ValueError):
    """The bytes are not acceptable JSON; `errors` says why, each line naming where."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True, slots=True)
class JsonLimits:
    max_bytes: int
    max_depth: int = DEFAULT_MAX_DEPTH
    max_number_chars: int = DEFAULT_MAX_NUMBER_CHARS


def _scan(raw: bytes, limits: JsonLimits, what: str) -> None:
    """Depth and number-literal length, with strings taken out first (brackets and digits in them are
    text). Regex substitutions and map/accumulate: linear, no recursion, no Python loop per byte."""
    structure = _STRING.sub(b'""', raw)
    brackets = _NOT_BRACKET.sub(b"", structure)
    depth = max(itertools.accumulate(map(_DELTA.__getitem__, brackets)), default=0)
    if depth > limits.max_depth:
        raise JsonRefused([f"{what}: nested {depth} levels deep; at most {limits.max_depth}"])
    long_number = _long_number(limits.max_number_chars).search(structure)
    if long_number is not None:
        length, most = long_number.end() - long_number.start(), limits.max_number_chars
        raise JsonRefused([f"{what}: a number literal of {length} characters; at most {most}"])


@functools.cache
def _long_number(max_chars: int) -> re.Pattern[bytes]:
    """A run of number characters longer than `max_chars`; leftmost and greedy, so all of the run."""
    return re.compile(rb"[-+0-9.eE]{%d,}" % (max_chars + 1))


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, value in pairs:
        if key in body:
            raise _Duplicate(key)
        body[key] = value
    return body


def _no_constants(name: str) -> Any:
    # NaN compares false with everything and would slip past every bound.
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text} is beyond a 64-bit float", text, 0)
    return value


def decode_json(raw: bytes, limits: JsonLimits, *, what: str = "payload") -> Any:
    """The JSON value of `raw`, or JsonRefused naming the byte offset and the rule broken."""
    if len(raw) > limits.max_bytes:
        raise JsonRefused([f"{what}: {len(raw)} bytes, more than the cap of {limits.max_bytes}"])
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise JsonRefused([f"{what}: starts with {name}; only UTF-8 without a BOM is accepted"])
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise JsonRefused([f"{what}: NUL byte at byte offset {nul} (UTF-16/32?); only UTF-8 is accepted"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonRefused([f"{what}: not UTF-8 at byte offset {err.start}"]) from None
    _scan(raw, limits, what)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite)
    except _Duplicate as err:
        raise JsonRefused([f"{what}: duplicate key {str(err)[:80]!r}; each key once"]) from None
    except json.JSONDecodeError as err:
        offset = len(text[: err.pos].encode("utf-8", "surrogatepass"))
        raise JsonRefused([f"{what}: not JSON at byte offset {offset}: {err.msg}"]) from None
    except (ValueError, RecursionError) as err:  # the scan makes both impossible; refused, never raised
        raise JsonRefused([f"{what}: not acceptable JSON: {type(err).__name__}"]) from None


def nesting_depth(value: Any, limit: int) -> int:
    """Depth of nested objects/arrays in a decoded value, without recursion; stops counting past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def json_type_name(value: Any) -> str:
    """What a decoded value was in the JSON text, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
