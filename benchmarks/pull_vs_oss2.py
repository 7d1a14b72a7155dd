#!/usr/bin/env python3
"""Benchmark: `shoal pull` from the local OSS-compatible server vs oss2.resumable_download.

Same server process, same files, same parallelism, same run. Both clients run as their
own processes (so each one's peak RSS is its own) and write real files to disk.
Also measures BLAKE3 throughput of the verify path (``agent.store.blake3_hash`` on
chunk-sized buffers). Prints a table and the command that reproduces it.

    python benchmarks/pull_vs_oss2.py [--size-mb 1024] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.manifest import default_chunk_size  # noqa: E402

MODEL = "bench/model-1g"
BUCKET = "bench"

BASELINE = r"""
import os, sys, time, oss2
endpoint, bucket_name, out, threads, part = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
keys = sys.argv[6:]
bucket = oss2.Bucket(oss2.Auth("bench", "bench"), endpoint, bucket_name, session=oss2.Session(pool_size=threads + 4))
for key in keys:
    dest = os.path.join(out, key.split("/files/", 1)[1])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    oss2.resumable_download(bucket, key, dest, store=oss2.ResumableDownloadStore(root=out + "/.ckpt"),
                            multiget_threshold=part, part_size=part, num_threads=threads)
"""


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall time and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({code}):\n{out}\n{err}")
    return elapsed, usage.ru_maxrss * 1024, subprocess.CompletedProcess(cmd, code, out, err)


def blake3_throughput(chunk: int, total: int = 1 << 30) -> float:
    from agent.hashing import blake3_hash
    # Distinct chunks of a buffer larger than the CPU caches, as a real pull sees them.
    data = memoryview(os.urandom(256 << 20))
    count = len(data) // chunk
    started = time.perf_counter()
    for i in range(total // chunk):
        j = i % count
        blake3_hash(data[j * chunk:(j + 1) * chunk])
    return total / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mb * 1024 * 1024
    chunk = default_chunk_size(size)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env["PYTHONPATH"] = str(REPO)
    server = None
    try:
        from agent.testing.models import make_model
        print(f"generating a {args.size_mb} MiB model ...", file=sys.stderr)
        origin = make_model(work / "origin", weights_bytes=size, shards=2, seed="bench")
        server = subprocess.Popen([sys.executable, "-m", "agent.testing.oss_server", "--bucket", BUCKET],
                                  env=env, stdout=subprocess.PIPE, text=True)
        url = json.loads(server.stdout.readline())["url"]
        shoal_env = {**env, "OSS_ENDPOINT": url, "SHOAL_OSS_BUCKET": BUCKET, "OSS_ACCESS_KEY_ID": "bench",
                     "OSS_ACCESS_KEY_SECRET": "bench", "SHOAL_USE_MODELSCOPE": "0",
                     "SHOAL_CONCURRENCY": str(args.concurrency), "SHOAL_CONFIG": str(work / "none.toml")}
        print("mirroring it into the local OSS server ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "agent.cli", "--cache-dir", str(work / "push-cache"),
                        "mirror", "push", MODEL, "--from-dir", str(origin)], env=shoal_env, check=True,
                       capture_output=True)
        from agent.sources.oss import file_key
        from agent.manifest import ModelRef
        keys = [file_key("", ModelRef(MODEL), p.relative_to(origin).as_posix())
                for p in sorted(origin.rglob("*")) if p.is_file()]
        rows = []
        for round_ in range(args.rounds):
            for name in ("oss2.resumable_download", "shoal pull"):
                out = work / f"out-{round_}-{name.split()[0].split('.')[0]}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                if name == "shoal pull":
                    cmd = [sys.executable, "-m", "agent.cli", "--cache-dir", str(out / "cache"), "pull", MODEL,
                           "--to", str(out / "model"), "--json"]
                    elapsed, rss, _ = run_measured(cmd, shoal_env)
                    got = out / "model"
                else:
                    cmd = [sys.executable, "-c", BASELINE, url, BUCKET, str(out), str(args.concurrency),
                           str(chunk), *keys]
                    elapsed, rss, _ = run_measured(cmd, env)
                    got = out
                n = sum(p.stat().st_size for p in got.rglob("*") if p.is_file() and ".ckpt" not in p.parts
                        and "cache" not in p.relative_to(out).parts[:1])
                rows.append((round_ + 1, name, n / elapsed / 1e6, elapsed, rss / 1e6))
                shutil.rmtree(out, ignore_errors=True)
        hash_rate = blake3_throughput(chunk)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    best = {}
    for _, name, mbps, _, _ in rows:
        best[name] = max(best.get(name, 0), mbps)
    peak = max(r[4] for r in rows if r[1] == "shoal pull")
    print(f"\nPull of a {args.size_mb} MiB model from the local OSS-compatible server "
          f"(concurrency {args.concurrency}, chunk/part {chunk >> 20} MiB)\n")
    print("| round | client | MB/s | seconds | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for round_, name, mbps, elapsed, rss in rows:
        print(f"| {round_} | {name} | {mbps:.1f} | {elapsed:.2f} | {rss:.0f} |")
    print(f"\nratio shoal / oss2 (best of {args.rounds}): {best['shoal pull'] / best['oss2.resumable_download']:.2f}"
          f"   (target >= 1.0)")
    print(f"shoal peak RSS: {peak:.0f} MB   (target <= 200 MB)")
    print(f"BLAKE3 verify path ({chunk >> 20} MiB chunks): {hash_rate / 1e9:.2f} GB/s   (target >= 1 GB/s)")
    print(f"\nreproduce: python benchmarks/pull_vs_oss2.py --size-mb {args.size_mb} "
          f"--concurrency {args.concurrency} --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
