"""Review (issue 17): the overrides file is missing between write_atomic's two renames.

Fixed; kept as a regression test. `write_atomic(..., keep_previous=True)` renames the file to `.prev` and
then the new one into place. A power cut between the two leaves only `.prev`. At the next start
`_load` falls back to `.prev` (the controller runs with those overrides, config/state shows their
version), but every writer's compare-and-swap reads the missing file as "no overrides, version 0": the
next change is written on top of nothing, the overrides in `.prev` are dropped without a trace, and
the version counts from 1 again (a client holding base_version N is told "stale, at version 0").
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.tuning import TuningStore
from tests.test_mqtt import school

# Found by review (2026-12-03); fixed twice: write_atomic keeps the file whole, and a writer patches .prev.


def test_review_a_cut_between_the_renames_loses_no_override(tmp_path: Path) -> None:
    site = school(tmp_path)
    store = TuningStore(site)
    assert store.apply({"grid": {"import_limit_kw": 150}}, by="cli:eng", via="cli").accepted
    assert store.apply({"battery": {"reserve_soc": 0.3}}, by="cli:eng", via="cli").accepted
    # The cut: the third write's first rename happened, the second did not.
    os.replace(store.path, store.path.with_name(store.path.name + ".prev"))

    restarted = TuningStore(site)
    assert restarted.site.import_limit_kw == 150.0  # runs on .prev
    assert restarted.version == 2
    result = restarted.apply({"battery": {"wear_cost_cny_per_kwh": 0.07}}, by="mqtt-user:wang", via="mqtt")
    assert result.accepted
    assert result.site is not None
    assert result.site.import_limit_kw == 150.0, "the overrides held in .prev were dropped by the next change"
    assert result.site.tuning.battery.reserve_soc == 0.3
    assert result.version == 3
