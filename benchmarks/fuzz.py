"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser a peer, a hub, a person or a
local tool feeds bytes to (``agent.testing.fuzzing``): manifests, hub listings, the swarm's
hello/offer messages, the HAVE stream, the data port's hello and requests, join codes,
control-API frames, the gateway's request target and Range header.

Each target runs in a process of its own for SECONDS; an input that raises anything but
the target's documented errors (or crashes, or runs past 5 s) is saved under
``benchmarks/out/fuzz/TARGET/`` and named in the table. Copy it to
``tests/fuzz_corpus/TARGET/`` with the fix: ``tests/test_fuzz.py`` replays them all.

    pip install atheris && .venv/bin/python benchmarks/fuzz.py [--seconds 60] [--target NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "out" / "fuzz"

CHILD = r"""
import sys, atheris
with atheris.instrument_imports():
    from agent.testing import fuzzing
name = sys.argv[1]
atheris.Setup([sys.argv[0], *sys.argv[2:]], lambda data: fuzzing.run(name, data))
atheris.Fuzz()
"""


def main() -> int:
    from agent.testing.fuzzing import TARGETS, seeds
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    args = parser.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    rows = []
    for name in args.target or list(TARGETS):
        folder = OUT / name
        corpus, crashes = folder / "corpus", folder / "crashes"
        corpus.mkdir(parents=True, exist_ok=True)
        crashes.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
        known = REPO / "tests" / "fuzz_corpus" / name
        dirs = [str(corpus)] + ([str(known)] if known.is_dir() else [])
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", CHILD, name, f"-max_total_time={args.seconds}", "-timeout=5",
                               "-rss_limit_mb=2048", f"-artifact_prefix={crashes}/", *dirs],
                              capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        log = proc.stdout + proc.stderr
        (folder / "log.txt").write_text(log)
        runs = re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE)\s+cov: (\d+)", log)
        execs, cov = (int(runs[-1][0]), int(runs[-1][1])) if runs else (0, 0)
        found = sorted(p.name for p in crashes.iterdir())
        rows.append((name, time.monotonic() - started, execs, cov, found))
    print("\n| target | seconds | inputs run | coverage (edges) | crashing inputs |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds, execs, cov, found in rows:
        print(f"| {name} | {seconds:.0f} | {execs} | {cov} | {', '.join(found) or 'none'} |")
    print(f"\nreproduce: .venv/bin/python benchmarks/fuzz.py --seconds {args.seconds}")
    return 1 if any(found for *_, found in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
