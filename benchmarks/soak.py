"""The soak run: one agent in a room of ROOM agents on loopback, DURATION of pulls, cancels,
removals, evictions (a quota), and peers leaving and coming back. Every 10 s the measured
agent's resident memory, open fds, threads and event-loop lag (``shoal status``) are
sampled; at the end their slope per hour over the samples after warm-up, and every pull's
correctness. Targets: RSS growth < 5 MB/h, fds and threads flat.

Two slopes: least squares, and Theil-Sen (the median of the slopes between every two samples),
which the target is read on. Why: a sample taken mid-pull counts that pull's chunk buffers in
flight (up to ~10 MB, gone a second later); one such sample near the end of a 20-minute run
moves the least-squares slope by several MB/h although nothing grew, while a real growth
moves most pairs' slopes and so the median.

    .venv/bin/python benchmarks/soak.py [--minutes 20] [--room 6] [--seed 1]

Loopback only (127.0.0.1); the hub is the local ModelScope-compatible server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.hub_server import HubServer  # noqa: E402
from agent.testing.models import make_model  # noqa: E402

SAMPLE_EVERY = 10.0
WARMUP = 60.0  # samples before this are left out of the slopes (imports, first pulls, caches filling)


def digest(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


class Member:
    def __init__(self, root: Path, name: str, base_env: dict, **extra):
        self.name, self.cache = name, root / name
        self.env = {**base_env, "SHOAL_CACHE_DIR": str(self.cache), **extra}
        self.proc = None

    def start(self) -> "Member":
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.cache / "agent.json").unlink(missing_ok=True)
        log = open(self.cache.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent"], env=self.env, stdout=log,
                                     stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while not (self.cache / "agent.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def shoal(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def sample(member: Member) -> dict | None:
    pid = member.proc.pid
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    proc = member.shoal("status", "--json", timeout=30)
    lag = json.loads(proc.stdout)["loop_lag_ms"] if proc.returncode == 0 else None
    return {"t": time.monotonic(), "rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "fds": fds,
            "threads": int(fields["Threads"]), "lag_ms": lag}


def _points(samples: list[dict], key: str) -> list[tuple[float, float]]:
    points = [(s["t"], s[key]) for s in samples if s[key] is not None]
    t0 = points[0][0] if points else 0.0
    return [((t - t0) / 3600, v) for t, v in points]


def slope_per_hour(samples: list[dict], key: str) -> float:
    """Least squares."""
    points = _points(samples, key)
    if len(points) < 3:
        return 0.0
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def robust_slope_per_hour(samples: list[dict], key: str) -> float:
    """Theil-Sen: the median of the slopes between every two samples (a few hundred samples,
    so every pair)."""
    points = _points(samples, key)
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 > x1]
    return statistics.median(slopes) if slopes else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--room", type=int, default=6)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--model-mb", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tracemalloc", metavar="FILE",
                        help="trace the measured agent's Python allocations; its growth report goes to FILE "
                             "(slower, and its RSS then includes the tracing)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="shoal-soak-"))
    members: list[Member] = []
    failures: list[str] = []
    counts = {"pulls": 0, "correct": 0, "cancels": 0, "removals": 0, "evictions": 0, "restarts": 0}
    try:
        origins = {f"soak/m{i}": make_model(root / "origin" / f"m{i}", weights_bytes=args.model_mb << 20,
                                             seed=f"soak-{i}") for i in range(args.models)}
        with HubServer() as hub:
            for name, directory in origins.items():
                hub.add_model(name, directory)
            base = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
            base.update(SHOAL_CONFIG=str(root / "none.toml"), MODELSCOPE_ENDPOINT=hub.url,
                        MODELSCOPE_CACHE=str(root / "ms"), MODELSCOPE_HOME=str(root / "ms-home"),
                        MODELSCOPE_LOG_LEVEL="40", MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false", SHOAL_SWARM="1",
                        SHOAL_SWARM_HOST="127.0.0.1", SHOAL_SWARM_SECRET="soak", SHOAL_MDNS="0", SHOAL_DHT="0",
                        SHOAL_GATEWAY_PORT="0", PYTHONPATH=str(REPO))
            size = sum(p.stat().st_size for p in origins["soak/m0"].rglob("*") if p.is_file())
            traced = {"SHOAL_TRACEMALLOC": str(Path(args.tracemalloc).resolve()),
                      "PYTHONTRACEMALLOC": "6"} if args.tracemalloc else {}
            measured = Member(root, "measured", base, SHOAL_QUOTA=str(int(size * 3.2)), **traced).start()
            members.append(measured)
            address = json.loads(measured.shoal("status", "--json").stdout)["swarm"]["addrs"][0]
            for i in range(1, args.room):
                members.append(Member(root, f"peer-{i}", base, SHOAL_SWARM_PEERS=address).start())
            samples: list[dict] = []
            started = time.monotonic()
            stop = threading.Event()

            def sampler():
                while not stop.wait(SAMPLE_EVERY):
                    got = sample(measured)
                    if got is not None:
                        got["at"] = got["t"] - started
                        samples.append(got)
                        print(f"  {got['at']:6.0f} s  rss {got['rss_mb']:6.1f} MB  fds {got['fds']:3d}  "
                              f"threads {got['threads']:3d}  lag {got['lag_ms']} ms", flush=True)
            thread = threading.Thread(target=sampler, daemon=True)
            thread.start()
            deadline = started + args.minutes * 60
            while time.monotonic() < deadline:
                action = rng.choices(["pull", "cancel", "rm", "restart"], weights=[6, 2, 2, 1])[0]
                member = rng.choice(members) if action != "restart" else rng.choice(members[1:])
                model = rng.choice(list(origins))
                if action == "pull":
                    proc = member.shoal("pull", model, "--json")
                    counts["pulls"] += 1
                    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
                    counts["evictions"] += sum(1 for x in lines if x.get("event") == "evicted")
                    folder = member.cache / "models" / model / "master"
                    if proc.returncode == 0 and digest(folder) == digest(origins[model]):
                        counts["correct"] += 1
                    elif proc.returncode == 0:
                        failures.append(f"{member.name} pull {model}: files differ from the origin's")
                    elif proc.returncode != 8:  # 8: the same model's pull already runs there: fine
                        failures.append(f"{member.name} pull {model} exited {proc.returncode}: {proc.stderr[-300:]}")
                elif action == "cancel":  # a client that goes away mid-pull: the pull stops
                    child = subprocess.Popen([sys.executable, "-m", "agent.cli", "pull", model], env=member.env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(rng.uniform(0.5, 2.0))
                    child.send_signal(signal.SIGINT)
                    child.wait(timeout=60)
                    counts["cancels"] += 1
                elif action == "rm":
                    if member.shoal("rm", model).returncode == 0:
                        counts["removals"] += 1
                else:
                    member.stop()
                    time.sleep(rng.uniform(1, 5))
                    member.start()
                    counts["restarts"] += 1
                time.sleep(rng.uniform(0.2, 2.0))
            stop.set()
            thread.join()
            alive = measured.proc.poll() is None
    finally:
        for member in members:
            member.stop()
        shutil.rmtree(root, ignore_errors=True)
    steady = [s for s in samples if s["at"] >= WARMUP]
    print(f"\nsoak: {args.minutes:.0f} min, a room of {args.room} on loopback, {args.models} models of "
          f"{args.model_mb} MiB; the measured agent ran throughout: {alive}")
    print(f"actions: {counts}")
    print("\n| measure (measured agent) | first | last | max | slope per hour, Theil-Sen | least squares | target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, target in (("rss_mb", "< 5 MB/h"), ("fds", "flat"), ("threads", "flat"), ("lag_ms", "-")):
        values = [s[key] for s in steady if s[key] is not None]
        if values:
            print(f"| {key} | {values[0]:.1f} | {values[-1]:.1f} | {max(values):.1f} "
                  f"| {robust_slope_per_hour(steady, key):+.2f} | {slope_per_hour(steady, key):+.2f} | {target} |")
    print(f"\npulls correct: {counts['correct']} of {counts['pulls']}; failures: {len(failures)}")
    for failure in failures:
        print(f"  {failure}")
    if args.tracemalloc and Path(args.tracemalloc).exists():
        print(f"\nthe measured agent's Python allocations ({args.tracemalloc}):\n{Path(args.tracemalloc).read_text()}")
    print(f"\nreproduce: .venv/bin/python benchmarks/soak.py --minutes {args.minutes:g} --room {args.room} "
          f"--seed {args.seed}{f' --tracemalloc {args.tracemalloc}' if args.tracemalloc else ''}")
    return 1 if failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
