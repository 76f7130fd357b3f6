"""`greensite run --simulate` with the realistic plant's options: weather, skies, day-to-day variation and
a replayed recording, as a site engineer rehearses a site before it is built; bad options are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import load_site
from controller.cli import main

SCHOOL = Path(__file__).parents[1] / "config" / "sites" / "zhongshan_school.toml"


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    argv = ["run", str(SCHOOL), "--simulate", "--speed", "max", "--duration", "10m", "--no-mqtt", "--no-web",
            "--store", str(tmp_path / f"s{len(list(tmp_path.iterdir()))}.sqlite3"), *options]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _kwh(summary: str, what: str) -> float:
    found = re.search(rf"{what} ([0-9.]+) kWh", summary)
    assert found is not None, summary
    return float(found.group(1))


def test_a_rainy_day_makes_less_pv_than_a_sunny_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noon = ["--start", "2026-07-06T12:00"]
    code, sunny, _ = _run(tmp_path, capsys, *noon, "--weather", "sunny")
    assert code == 0
    code, rain, _ = _run(tmp_path, capsys, *noon, "--weather", "mixed", "--skies", "rain", "--variation")
    assert code == 0
    assert _kwh(sunny, "PV used") > 20.0  # 300 kWp at noon in July: most of it for ten minutes
    assert _kwh(rain, "PV used") < 0.3 * _kwh(sunny, "PV used")


def test_a_replayed_recording_drives_the_plant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """300 kW of recorded load and no PV at noon (the model would have 45+155 kW and a sunny roof): the grid
    carries what the battery cannot, so the recording, not the model, is what ran."""
    recording = tmp_path / "meter.csv"
    rows = [f"2026-07-06T12:{minute:02d}:00+08:00,300.0,0.0" for minute in range(0, 60, 15)]
    recording.write_text("# a meter export\ntime,load_kw,pv_kw\n" + "\n".join(rows) + "\n")
    code, out, err = _run(tmp_path, capsys, "--replay", str(recording))
    assert code == 0, err
    assert _kwh(out, "PV used") == 0.0
    battery_kw = load_site(SCHOOL, environment=False).battery.max_discharge_kw  # type: ignore[union-attr]
    assert _kwh(out, "import") >= (300.0 - battery_kw) * 10 / 60 - 0.5  # the run started where the recording does


def test_bad_plant_options_are_refused_naming_what(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,load_kw\n2026-07-06T12:00:00+08:00,52.1\n2026-07-06T12:15:00+08:00,x\n")
    code, _, err = _run(tmp_path, capsys, "--replay", str(bad))
    assert code == 2
    assert f"--replay {bad}: line 3, column 2" in err
    code, _, err = _run(tmp_path, capsys, "--replay", str(bad), "--replay-only", "pv")
    assert code == 2
    assert "line 3" in err
    good = tmp_path / "load.csv"
    good.write_text("time,load_kw\n2026-07-06T12:00:00+08:00,52.1\n2026-07-06T12:15:00+08:00,50.0\n")
    code, _, err = _run(tmp_path, capsys, "--replay", str(good), "--replay-only", "pv")
    assert code == 2
    assert "no pv_kw column" in err
    code, _, err = _run(tmp_path, capsys, "--skies", "rain")
    assert code == 2
    assert "--weather mixed" in err
    with pytest.raises(SystemExit):
        _run(tmp_path, capsys, "--weather", "mixed", "--skies", "rain,snow")
    assert "sky 2 'snow'" in capsys.readouterr().err
    assert main(["run", str(SCHOOL), "--weather", "sunny"]) == 2
    assert "add --simulate" in capsys.readouterr().err
