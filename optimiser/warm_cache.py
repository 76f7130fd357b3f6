"""Compile the planner's kernels into numba's on-disk cache (run at installation: scripts/bootstrap).

The controller must not spend seconds compiling at boot; with the cache, importing the kernels loads
machine code instead. Prints how long this took and where the cache lives.
"""

from __future__ import annotations

import os
import sys
import time

# Importing the kernels compiles them (explicit signatures) or loads them from the cache.
from optimiser import solve_scenario
from optimiser.school import school_scenario


def main() -> int:
    started = time.perf_counter()
    solve_scenario(school_scenario(24, 60))
    where = os.environ.get("NUMBA_CACHE_DIR") or "optimiser/__pycache__"
    sys.stdout.write(f"optimiser kernels cached ({where}); a plan takes {time.perf_counter() - started:.3f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
