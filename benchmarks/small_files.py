"""Benchmark: a pull of many small files against the same bytes in one file, same run.

Datasets and tokenizer-heavy repositories are thousands of small files; each used to cost
a sync of the file and one of its folder (4,003 fsyncs for 2,000 files). Both models are
served by the local hub (the modelscope SDK's endpoints, files proven by SHA-256) and
pulled by `shoal pull` into fresh caches, alternately, ROUNDS times; medians and the ratio.
With ``--strace`` (needs strace) the sync calls of one pull of each are counted too.

Two things make it measure shoal rather than the harness:
- the hub keeps connections alive (HTTP/1.1, as a real hub's front end does);
  ``--close-connections`` serves it with werkzeug's server instead, which closes every
  connection after one answer (a new TCP connection and a new server thread per file);
- the caches are removed at the end, not between pulls: ext4 allocating inodes right after
  2,000 files were deleted scans the recently deleted ones (``recently_deleted`` in the
  kernel's ``find_inode_bit``, perf), a cost of the benchmark's clean-up, not of a pull.

    .venv/bin/python benchmarks/small_files.py [--files 2000] [--big-mb 200] [--rounds 3] [--strace]
        [--close-connections]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.hub_server import HubServer  # noqa: E402
from agent.testing.models import write_pseudo_random_file  # noqa: E402


def make_many(root: Path, files: int, big_mb: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        size = rng.randint(1024, 50 * 1024)
        path = root / f"part-{i // 100:02d}" / f"file-{i:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pseudo_random_file(path, f"small/{i}", size)
        total += size
    write_pseudo_random_file(root / "weights.bin", "big", big_mb << 20)
    return total + (big_mb << 20)


def pull(root: Path, hub_url: str, model: str, strace: Path | None = None) -> float:
    cache = root / f"cache-{model.replace('/', '-')}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(SHOAL_CONFIG=str(root / "none.toml"), SHOAL_CACHE_DIR=str(cache), MODELSCOPE_ENDPOINT=hub_url,
               MODELSCOPE_CACHE=str(root / "ms"), MODELSCOPE_HOME=str(root / "ms-home"), MODELSCOPE_LOG_LEVEL="40",
               MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "agent.cli", "pull", model]
    if strace is not None:
        cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,syncfs,sync", "-o", str(strace), *cmd]
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started  # the cache stays until the end (see the docstring)


def syncs(path: Path) -> int:
    total = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync", "syncfs", "sync") and parts[3].isdigit():
            total += int(parts[3])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--close-connections", action="store_true",
                        help="serve with a server that closes every connection (werkzeug's)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-small-"))
    try:
        many = root / "origin" / "many"
        total = make_many(many, args.files, args.big_mb)
        one = root / "origin" / "one"
        one.mkdir(parents=True)
        write_pseudo_random_file(one / "weights.bin", "one", total)
        times = {"many": [], "one": []}
        with HubServer(keep_alive=not args.close_connections) as hub:
            hub.add_model("bench/many", many)
            hub.add_model("bench/one", one)
            pull(root, hub.url, "bench/one")  # warm: the hub hashes its files once, the page cache fills
            pull(root, hub.url, "bench/many")
            for _ in range(args.rounds):
                times["many"].append(pull(root, hub.url, "bench/many"))
                times["one"].append(pull(root, hub.url, "bench/one"))
            counted = {}
            if args.strace and shutil.which("strace"):
                for name in ("many", "one"):
                    pull(root, hub.url, f"bench/{name}", strace=root / f"strace-{name}.txt")
                    counted[name] = syncs(root / f"strace-{name}.txt")
        many_s, one_s = statistics.median(times["many"]), statistics.median(times["one"])
        server = "closes every connection" if args.close_connections else "keeps connections alive"
        print(f"\n{args.files} files of 1-50 KiB + one {args.big_mb} MiB file ({total / 1e6:.1f} MB) against the "
              f"same bytes in one file; {args.rounds} rounds, medians; the hub {server}\n")
        print("| model | seconds (median) | min | max | sync calls |")
        print("| --- | --- | --- | --- | --- |")
        for name in ("many", "one"):
            t = times[name]
            print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {counted.get(name, '-')} |")
        print(f"| ratio many / one | {many_s / one_s:.2f} | | | target <= 2 |")
        print(f"\nreproduce: .venv/bin/python benchmarks/small_files.py --files {args.files} --big-mb {args.big_mb} "
              f"--rounds {args.rounds}{' --strace' if args.strace else ''}"
              f"{' --close-connections' if args.close_connections else ''}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
