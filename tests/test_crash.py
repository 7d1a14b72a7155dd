"""The crash campaign, short: a real `shoal` process SIGKILLed at every named moment of
the store's moves (``agent.crashpoints``) in a pull, an eviction, an rm, an import and a
mirror sync; then the cache must satisfy every invariant as a restarted agent finds it
(``agent.testing.invariants``: chunks claimed hash right, no folder names missing bytes,
no unowned ``.partial``, the quota equals the disk) and the next pull must complete with
the origin's bytes. Also: the index removed or damaged after a kill, and a file system
that fills up. ``benchmarks/crash.py`` runs 200 random ones."""

from __future__ import annotations

import os

import pytest

from agent.testing.crashlab import POINTS, Lab, small_filesystem, unmount

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("crash-lab"), weights=1024 * 1024)
    yield lab
    lab.close()


CASES = [(op, point) for op in ("pull", "evict", "rm", "import", "sync") for point in POINTS[op]]


@pytest.mark.parametrize("op,point", CASES, ids=[f"{op}-{point}" for op, point in CASES])
def test_a_kill_at_any_moment_loses_nothing(lab, op, point):
    outcome = lab.run(CASES.index((op, point)), op=op, point=f"{point}:2" if point == "chunk:written" else point)
    assert outcome.violations == [], outcome
    assert outcome.killed, f"{op} never reached {point}: {outcome}"


@pytest.mark.parametrize("point", POINTS["gc"])
def test_a_kill_mid_gc_loses_nothing(lab, point):
    """`shoal gc` over a cache past its quota (seed 2: two models, one to evict), killed
    midway through the removal."""
    outcome = lab.run(2, op="gc", point=point)
    assert outcome.violations == [], outcome
    assert outcome.killed, f"gc never reached {point}: {outcome}"


@pytest.mark.parametrize("variant", ["index-removed", "index-damaged"])
@pytest.mark.parametrize("seed,point", [(100, "pull:recorded"), (306, "finish:renamed:1")])
def test_a_lost_index_after_a_kill_is_rebuilt_and_loses_nothing(lab, variant, seed, point):
    # Seed 306 pulls lab/other from the origin's listing: no manifest is kept until it is
    # complete, so the rebuild meets a folder it has no manifest for.
    outcome = lab.run(seed, op="pull", point=point, variant=variant)
    assert outcome.killed and outcome.violations == [], outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_disk_that_fills_up_mid_pull_loses_nothing(lab, tmp_path):
    disk = tmp_path / "small"
    if not small_filesystem(disk, 3):  # room for one model, not two
        pytest.skip("no tmpfs here")
    try:
        for seed in (200, 201, 202):
            outcome = lab.run(seed, op="pull", variant="disk-full", caches=disk)
            assert outcome.violations == [], outcome
    finally:
        unmount(disk)
