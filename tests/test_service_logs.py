"""Log lines for the journal: one line per record, no timestamp, the syslog priority up front; turned on
when stderr is the journal stream systemd names in $JOURNAL_STREAM."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from controller.logs import JsonFormatter, KeyValueFormatter, stderr_is_journal

ROOT = Path(__file__).parents[1]
RUN_TIMEOUT_S = 30.0  # a Python start on a loaded machine


def _record(level: int, message: str, *, error: bool = False, **fields: object) -> logging.LogRecord:
    exc_info = None
    if error:
        try:
            raise ValueError("bad reading")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("greensite.bus", level, __file__, 1, message, None, exc_info)
    record.__dict__.update(fields)
    return record


def test_key_value_lines_for_the_journal() -> None:
    line = KeyValueFormatter(journal=True).format(
        _record(logging.WARNING, "device lost\nafter 3 timeouts", error=True, device="grid_meter", port="/dev/ttyUSB0")
    )
    assert "\n" not in line
    assert line.startswith("<4>WARNING greensite.bus: device lost\\nafter 3 timeouts device='grid_meter'")
    assert "exc='Traceback" in line
    assert "ValueError: bad reading" in line
    plain = KeyValueFormatter().format(_record(logging.WARNING, "device lost", error=True))
    assert plain[:4].isdigit()  # a shell's line keeps its timestamp and multi-line traceback
    assert "\nTraceback" in plain


def test_json_lines_for_the_journal() -> None:
    line = JsonFormatter(journal=True).format(_record(logging.ERROR, "plan failed", error=True, step=3))
    assert line.startswith("<3>{")
    assert "\n" not in line
    body = json.loads(line[3:])
    assert "ts" not in body  # journald stamps the entry
    assert body["level"] == "ERROR"
    assert body["msg"] == "plan failed"
    assert body["step"] == 3
    assert "ValueError: bad reading" in body["exc"]
    assert "ts" in json.loads(JsonFormatter().format(_record(logging.ERROR, "x")))


def test_priorities_follow_levels() -> None:
    formatter = JsonFormatter(journal=True)
    prefixes = [formatter.format(_record(level, "x"))[:3] for level in (10, 20, 30, 40, 50)]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]


def test_the_journal_is_recognised_by_its_stream(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    with log.open("w") as stream:
        info = os.fstat(stream.fileno())
        named = f"{info.st_dev}:{info.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": named}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream.fileno())
        assert not stderr_is_journal({}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": named, "GREENSITE_LOG_JOURNAL": "0"}, stream.fileno())
        assert stderr_is_journal({"GREENSITE_LOG_JOURNAL": "1"}, stream.fileno())


def test_a_process_whose_stderr_is_the_journal_writes_journal_lines(tmp_path: Path) -> None:
    """End to end: the CLI's logging set-up, with stderr on the stream $JOURNAL_STREAM names (as systemd
    starts a service), writes one prefixed line per record."""
    code = (
        "import logging\nfrom controller.logs import configure_logging\n"
        "configure_logging('INFO', json_lines=True)\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('greensite.runtime').exception('tick failed', extra={'tick': 7})\n"
        "logging.getLogger('greensite.runtime').info('stopped')\n"
    )
    log = tmp_path / "stderr"
    with log.open("wb") as stream:
        info = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "PYTHONPATH": str(ROOT)}
        env.pop("GREENSITE_LOG_JOURNAL", None)
        subprocess.run([sys.executable, "-c", code], env=env, stderr=stream, check=True, timeout=RUN_TIMEOUT_S)
    lines = log.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<6>"]
    first = json.loads(lines[0][3:])
    assert (first["msg"], first["tick"]) == ("tick failed", 7)
    assert "ZeroDivisionError" in first["exc"]
