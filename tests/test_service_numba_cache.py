"""Why the unit sets NUMBA_CACHE_DIR: a service user who may read the code but not write next to it gets
"cannot cache function ...: no locator available" from numba's `cache=True` at import, and numba itself
honours NUMBA_CACHE_DIR (compiled once, loaded from there after). Checked as a real unprivileged user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534
IMPORT_TIMEOUT_S = 120.0  # numba's import plus one small compile on a loaded 2-core machine

KERNEL = """
from numba import njit

@njit("float64(float64)", cache=True)
def twice(x):
    return 2.0 * x
"""
PROBE = "import kernel; print(sum(kernel.twice.stats.cache_hits.values()), kernel.twice(2.0))"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs the probe as another user: needs root"
)


@pytest.fixture
def code_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="gs-numba-"))  # root's, 0700: the service user may not write here
    (folder / "kernel.py").write_text(KERNEL)
    yield folder
    shutil.rmtree(folder)


def _as_service_user(code: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The probe as uid nobody that may read everything (the venv may live under /root) but write nothing
    it does not own: how a service user stands to code installed by root."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
            sys.executable, "-c", PROBE]  # fmt: skip
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent", "PYTHONPATH": str(code), **env}
    return subprocess.run(argv, env=environment, cwd="/", capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S,
                          check=False)  # fmt: skip


def test_without_a_cache_dir_the_import_fails(code_dir: Path) -> None:
    result = _as_service_user(code_dir)
    assert result.returncode != 0
    assert "no locator available" in result.stderr


def test_numba_compiles_into_the_cache_dir_once(code_dir: Path) -> None:
    cache = Path(tempfile.mkdtemp(prefix="gs-numba-cache-"))
    try:
        os.chown(cache, NOBODY, NOBODY)
        first = _as_service_user(code_dir, NUMBA_CACHE_DIR=str(cache))
        assert first.returncode == 0, first.stderr
        assert first.stdout.split() == ["0", "4.0"]  # compiled
        assert list(cache.rglob("kernel.twice-*.nbi"))
        second = _as_service_user(code_dir, NUMBA_CACHE_DIR=str(cache))
        assert second.stdout.split() == ["1", "4.0"]  # loaded from the cache
        assert not (code_dir / "__pycache__").exists()  # nothing written next to the code
    finally:
        shutil.rmtree(cache)
