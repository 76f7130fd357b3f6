"""Hostile tuning commands, generated: JSON of any depth, numbers of any length, every wrong type for
every tuning field, other encodings, duplicate keys, broken UTF-8, truncations, and acceptable
patches in an envelope that must refuse them (stale base version, retained, remote tuning off).

Every payload here must be refused: an acceptable patch only ever appears in a hostile envelope.

    python -m hil_tests.tuning_fuzz --payloads 10000     # counts: payloads, refused, crashes, applied

The default suite runs a few hundred (tests/test_tuning_fuzz.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from config import SiteConfig, load_site
from controller.logs import configure_logging

__all__ = ["FuzzCounts", "Hostile", "generate", "hostile", "run_payloads", "school_site"]

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"
START = datetime(2026, 7, 6, 11, 0, tzinfo=ZoneInfo("Asia/Shanghai"))

# Patches the school accepts on their own: the envelope around them is what must refuse them.
ACCEPTABLE: tuple[dict[str, Any], ...] = (
    {"grid": {"import_limit_kw": 300}},
    {"battery": {"reserve_soc": 0.3}},
    {"battery": {"wear_cost_cny_per_kwh": 0.1}, "replan_period_s": 600},
    {"grid": {"import_relief_order": ["ev", "battery"]}},
)
NUMBER_FIELDS: tuple[tuple[str, ...], ...] = (
    ("grid", "import_limit_kw"), ("grid", "export_limit_kw"), ("battery", "soc_min"), ("battery", "soc_max"),
    ("battery", "reserve_soc"), ("battery", "max_charge_kw"), ("battery", "max_discharge_kw"),
    ("battery", "wear_cost_cny_per_kwh"), ("replan_period_s",),
)  # fmt: skip
LIST_FIELDS: tuple[tuple[str, ...], ...] = (("grid", "import_relief_order"), ("grid", "export_relief_order"))
SECTIONS = ("grid", "battery")
TUNING_KEYS = frozenset({"grid", "battery", "replan_period_s"})


@dataclass(frozen=True, slots=True)
class Hostile:
    kind: str
    payload: bytes
    retained: bool = False
    sender: str | None = None
    remote_tuning: bool = True


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body: Any = value
    for key in reversed(path):
        body = {key: body}
    result: dict[str, Any] = body
    return result


def _command(patch: Any, **envelope: Any) -> dict[str, Any]:
    return {"correlation_id": "fuzz", "requested_by": "fuzz", "patch": patch, **envelope}


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
# Everything that is not a JSON number, for a number field (null is a reset, so it is not here).
not_numbers = (
    st.booleans()
    | st.sampled_from(["350", " 0.25 ", "1_0", "0x10", "1e3", "", "NaN", "inf", "٣"])
    | st.text(max_size=10)
    | st.lists(st.integers(), min_size=0, max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)
# Numbers no tuning field takes: every one is >= 0 and <= 100,000.
out_of_range = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False) | st.floats(
    min_value=1e5 + 1, allow_nan=False, allow_infinity=False
) | st.integers(max_value=-1) | st.integers(min_value=100_001)


@st.composite
def deep_nesting(draw: st.DrawFn) -> Hostile:
    depth = draw(st.integers(9, 5000))
    opener = draw(st.sampled_from([b"[", b'{"a":', b'{"grid":', b"[{", b'{"patch":']))
    inner = opener * depth + draw(st.sampled_from([b"1", b"", b"[]", b"{}"]))
    closers = draw(st.booleans())
    tail = (b"]" if opener.startswith(b"[") else b"}") * (depth if closers else draw(st.integers(0, 3)))
    in_command = draw(st.booleans())
    payload = b'{"correlation_id": "d", "patch": ' + inner + tail + b"}" if in_command else inner + tail
    return Hostile("deep", payload)


@st.composite
def long_numbers(draw: st.DrawFn) -> Hostile:
    digits = draw(st.integers(41, 6000))
    sign = draw(st.sampled_from([b"", b"-"]))
    shape = draw(st.sampled_from(["int", "frac", "exp"]))
    literal = sign + b"9" * digits
    if shape == "frac":
        literal = sign + b"0." + b"1" * digits
    elif shape == "exp":
        literal = sign + b"1e" + b"9" * digits
    path = draw(st.sampled_from(NUMBER_FIELDS))
    text = _dumps(_command(_nest(path, 1234567)))
    return Hostile("long-number", text.replace(b"1234567", literal))


@st.composite
def special_numbers(draw: st.DrawFn) -> Hostile:
    literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1E+309"]))
    path = draw(st.sampled_from(NUMBER_FIELDS))
    return Hostile("special-number", _dumps(_command(_nest(path, 1234567))).replace(b"1234567", literal))


@st.composite
def wrong_types(draw: st.DrawFn) -> Hostile:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        patch = _nest(draw(st.sampled_from(NUMBER_FIELDS)), draw(not_numbers))
    elif choice == 1:
        value = draw(
            st.text(max_size=8) | st.integers() | st.booleans()
            | st.lists(st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=6)), min_size=1, max_size=3)
        )  # fmt: skip
        if isinstance(value, list) and all(v in ("battery", "ev", "pv") for v in value):
            value = [*value, 7]  # keep it a list no schema takes
        patch = _nest(draw(st.sampled_from(LIST_FIELDS)), value)
    elif choice == 2:
        patch = {draw(st.sampled_from(SECTIONS)): draw(st.integers() | st.text(max_size=5) | st.booleans()
                                                       | st.lists(st.integers(), max_size=2))}  # fmt: skip
    else:
        patch = _nest(draw(st.sampled_from(NUMBER_FIELDS)), draw(out_of_range))
    return Hostile("wrong-type" if choice < 3 else "out-of-range", _dumps(_command(patch)))


@st.composite
def random_json(draw: st.DrawFn) -> Hostile:
    """Arbitrary JSON as the payload, or as a patch of keys no tuning has."""
    if draw(st.booleans()):
        value = draw(json_values)
        if isinstance(value, dict) and "patch" in value:
            value["patch"] = [value["patch"]]  # a patch is an object: an array is refused
        return Hostile("random-json", _dumps(value))
    keys = st.text(max_size=12).filter(lambda k: k not in TUNING_KEYS)
    patch = draw(st.dictionaries(keys, json_values, max_size=4))
    return Hostile("random-patch", _dumps(_command(patch)))


# Varies the small kinds (encodings, duplicates, envelopes) beyond their handful of shapes.
ids = st.text(max_size=30) | st.integers(min_value=-(10**9), max_value=10**9)


@st.composite
def encodings(draw: st.DrawFn) -> Hostile:
    body = _command(draw(st.sampled_from(ACCEPTABLE)), correlation_id=draw(ids))
    codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"]))
    return Hostile(f"encoding-{codec}", json.dumps(body).encode(codec))


@st.composite
def broken_utf8(draw: st.DrawFn) -> Hostile:
    text = _dumps(_command(draw(st.sampled_from(ACCEPTABLE))))
    at = draw(st.integers(0, len(text)))
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"]))
    return Hostile("broken-utf8", text[:at] + bad + text[at:])


@st.composite
def duplicate_keys(draw: st.DrawFn) -> Hostile:
    patch = draw(st.sampled_from(ACCEPTABLE))
    text = _dumps(_command(patch, correlation_id=draw(ids))).decode()
    where = draw(st.sampled_from(["top", "patch", "section"]))
    if where == "top":
        text = text[:-1] + ', "correlation_id": "again"}'
    elif where == "patch":
        first = next(iter(patch))
        text = text.replace('"patch": {', f'"patch": {{"{first}": {json.dumps(patch[first])}, ', 1)
    else:
        section = next(iter(patch))
        inner = patch[section]
        if not isinstance(inner, dict):
            text = text[:-1] + ', "patch": {}}'
        else:
            key = next(iter(inner))
            text = text.replace(f'"{section}": {{', f'"{section}": {{"{key}": {json.dumps(inner[key])}, ', 1)
    return Hostile(f"duplicate-{where}", text.encode())


@st.composite
def truncated(draw: st.DrawFn) -> Hostile:
    text = _dumps(_command(draw(st.sampled_from(ACCEPTABLE))))
    return Hostile("truncated", text[: draw(st.integers(1, len(text) - 1))])


@st.composite
def refusing_envelopes(draw: st.DrawFn) -> Hostile:
    """An acceptable patch in an envelope that must refuse it."""
    patch = draw(st.sampled_from(ACCEPTABLE))
    how = draw(st.sampled_from(["stale", "retained", "off", "unknown-key", "bad-id", "bad-by", "no-patch"]))
    if how == "stale":  # nothing is ever accepted here, so the file stays at version 0
        return Hostile(how, _dumps(_command(patch, base_version=draw(st.integers(1, 10**6)))))
    if how == "retained":
        sender = draw(st.none() | st.text(min_size=1, max_size=20))
        return Hostile(how, _dumps(_command(patch, correlation_id=draw(ids))), retained=True, sender=sender)
    if how == "off":
        return Hostile(how, _dumps(_command(patch, correlation_id=draw(ids))), remote_tuning=False)
    if how == "unknown-key":
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in {"correlation_id", "requested_by",
                                                                             "patch", "base_version"}))  # fmt: skip
        return Hostile(how, _dumps(_command(patch, **{key: draw(json_values)})))
    if how == "bad-id":
        bad_id = draw(st.booleans() | st.floats(allow_nan=False) | st.lists(st.integers(), max_size=2)
                      | st.text(min_size=201, max_size=300))  # fmt: skip
        return Hostile(how, _dumps(_command(patch, correlation_id=bad_id)))
    if how == "bad-by":
        by = draw(st.just("") | st.integers() | st.booleans() | st.text(min_size=101, max_size=150))
        return Hostile(how, _dumps(_command(patch, requested_by=by)))
    return Hostile(how, _dumps({"correlation_id": draw(ids), "tuning": patch}))


@st.composite
def raw_bytes(draw: st.DrawFn) -> Hostile:
    data = draw(st.binary(min_size=1, max_size=400))
    return Hostile("bytes", data)


KINDS: tuple[st.SearchStrategy[Hostile], ...] = (
    deep_nesting(), long_numbers(), special_numbers(), wrong_types(), random_json(), encodings(),
    broken_utf8(), duplicate_keys(), truncated(), refusing_envelopes(), raw_bytes(),
)  # fmt: skip


def hostile() -> st.SearchStrategy[Hostile]:
    return st.one_of(*KINDS)


def _draw(strategy: st.SearchStrategy[Hostile], count: int, seed_value: int) -> list[Hostile]:
    drawn: list[Hostile] = []

    @seed(seed_value)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(item: Hostile) -> None:
        drawn.append(item)

    collect()
    return drawn


def generate(count: int, seed_value: int = 17) -> list[Hostile]:
    """`count` payloads drawn by hypothesis (generation only: nothing to shrink), an equal share per
    kind (one_of alone favours its first branches); a kind whose space is small (encodings) may stop
    short, and the mix makes up the rest."""
    drawn: list[Hostile] = []
    for index, kind in enumerate(KINDS):
        drawn += _draw(kind, count // len(KINDS), seed_value + index)
    while len(drawn) < count:
        drawn += _draw(hostile(), count - len(drawn), seed_value + len(drawn))
    return drawn[:count]


@dataclass
class FuzzCounts:
    payloads: int = 0
    refused: int = 0
    accepted: int = 0  # applied changes: must stay 0
    crashes: int = 0  # exceptions out of handle_command, or answered as internal errors: must stay 0
    file_written: bool = False
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)


def school_site(folder: Path, **mqtt: Any) -> SiteConfig:
    data = load_site(SCHOOL, environment=False).model_dump()
    data["mqtt"].update(mqtt)
    data["storage"] = {"path": str(folder / "series.sqlite3")}
    return SiteConfig.model_validate(data)


async def run_payloads(items: list[Hostile], folder: Path) -> FuzzCounts:
    """Feed every payload to the real command handler of a controller on the simulated school."""
    from controller.clock import SimClock
    from controller.mqtt import MqttService
    from controller.runtime import Runtime
    from controller.simulation import simulated_site
    from controller.tuning import TuningStore
    counts = FuzzCounts()
    started = time.perf_counter()
    for remote in (True, False):
        site = school_site(folder / str(remote), remote_tuning=remote)
        async with simulated_site(site, START, 1) as (plant, links, _sims):
            runtime = Runtime(site, clock=SimClock(START, None), links=links, line_timing=False,
                              before_tick=plant.advance)  # fmt: skip
            store = TuningStore(site)
            service = MqttService(site, runtime, store, host="127.0.0.1", port=1)
            for item in (i for i in items if i.remote_tuning is remote):
                counts.payloads += 1
                counts.kinds[item.kind] += 1
                try:
                    reply = await service.handle_command(item.payload, retained=item.retained, sender=item.sender)
                except Exception:  # a crash: what the controller must never do
                    counts.crashes += 1
                    continue
                if reply.get("accepted"):
                    counts.accepted += 1
                else:
                    counts.refused += 1
            counts.crashes += service.commands.failed
            counts.file_written |= store.path.exists()
    counts.seconds = time.perf_counter() - started
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests.tuning_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    configure_logging("ERROR")  # each change is logged at WARNING: thousands of lines
    generation = time.perf_counter()
    items = generate(args.payloads, args.seed)
    generation = time.perf_counter() - generation
    with tempfile.TemporaryDirectory() as folder:
        counts = asyncio.run(run_payloads(items, Path(folder)))
    out = sys.stdout
    distinct, largest = len({i.payload for i in items}), max(len(i.payload) for i in items)
    out.write(f"generated {len(items)} hostile payloads in {generation:.1f} s "
              f"({distinct} distinct, largest {largest} bytes)\n")  # fmt: skip
    out.write("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.kinds.items())) + "\n")
    out.write(f"handled {counts.payloads} in {counts.seconds:.1f} s: refused {counts.refused}, "
              f"applied {counts.accepted}, crashes {counts.crashes}, "
              f"overrides file written: {counts.file_written}\n")  # fmt: skip
    ok = counts.accepted == 0 and counts.crashes == 0 and not counts.file_written and counts.refused == len(items)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
