"""The crash campaign: RUNS runs that each start a pull, an eviction, a mirror sync, an rm,
a gc or an import as a real `shoal` process, SIGKILL it (at a named moment of the store's
moves, or after a random delay), then check the cache as a restarted agent finds it and
complete the next pull (``agent.testing.crashlab``). Prints the kill points covered and
every violation with its seed; exits 1 if there was one.

    .venv/bin/python benchmarks/crash.py --runs 200 [--seed 0] [--variant all]

Variants: ``plain``; ``disk-full`` (the cache on a small tmpfs that a pull fills: root);
``index-removed`` and ``index-damaged`` (after the kill the SQLite index is deleted, or
overwritten with garbage: the store must rebuild it from the files it can verify).
A run is replayed with ``--seed N --runs 1 --variant V``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.testing.crashlab import Lab, small_filesystem, unmount  # noqa: E402

VARIANTS = ("plain", "disk-full", "index-removed", "index-damaged")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the first run's seed (runs take seed, seed+1, ...)")
    parser.add_argument("--variant", choices=VARIANTS + ("all",), default="all",
                        help="all: runs split between the variants (plain gets the most)")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    args = parser.parse_args()
    # Stopped (SIGTERM), it still unmounts its small file system and removes its folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="shoal-crash-"))
    plan = []
    for n in range(args.runs):
        seed = args.seed + n
        if args.variant != "all":
            plan.append((seed, args.variant))
        else:  # 70 % plain, 10 % each other variant
            plan.append((seed, "plain" if n % 10 < 7 else VARIANTS[1 + n % 10 - 7]))
    outcomes = []
    started = time.monotonic()
    disk = root / "small-disk"
    lab = Lab(root / "lab")
    mounted = None
    try:
        for seed, variant in plan:
            if variant == "disk-full":
                if mounted is None:
                    mounted = small_filesystem(disk, 6)  # room for one model and a half
                if not mounted:
                    print("disk-full: cannot mount a tmpfs (needs root); skipped", file=sys.stderr)
                    continue
                outcome = lab.run(seed, variant=variant, caches=disk)
            else:
                outcome = lab.run(seed, variant="" if variant == "plain" else variant)
            outcome.variant = variant
            outcomes.append(outcome)
            mark = "VIOLATION" if outcome.violations else "ok"
            print(f"[{len(outcomes):3d}/{len(plan)}] seed {seed:4d} {variant:13s} {outcome.op:6s} "
                  f"{outcome.kill:28s} reached {outcome.reached:22s} {'killed' if outcome.killed else 'ran out'}"
                  f"  {mark}", flush=True)
            for violation in outcome.violations:
                print(f"      {violation}", flush=True)
    finally:
        lab.close()
        if mounted:
            unmount(disk)
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    covered = collections.Counter(o.reached for o in outcomes if o.killed)
    by_op = collections.Counter((o.op, o.killed) for o in outcomes)
    bad = [o for o in outcomes if o.violations]
    print(f"\n{len(outcomes)} runs in {elapsed:.0f} s; killed mid-way: {sum(o.killed for o in outcomes)}; "
          f"violations: {len(bad)}")
    print("\n| operation | killed | ran to the end |\n| --- | --- | --- |")
    for op in sorted({o.op for o in outcomes}):
        print(f"| {op} | {by_op[(op, True)]} | {by_op[(op, False)]} |")
    print("\n| kill point (last one the killed process passed) | kills |\n| --- | --- |")
    for point, count in sorted(covered.items()):
        print(f"| {point} | {count} |")
    for o in bad:
        print(f"VIOLATION seed {o.seed} ({o.variant}, {o.op} {o.target}, {o.kill}): {o.violations}")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    print(f"\nreproduce: .venv/bin/python benchmarks/crash.py --runs {args.runs} --seed {args.seed} "
          f"--variant {args.variant}")
    return 1 if bad else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root: the disk-full variant is skipped", file=sys.stderr)
    sys.exit(main())
