"""Benchmark: bytes paid once. What a pull fetches and keeps when the cache already holds
the files under another revision or repository, in one agent and in a room, and what
`shoal import` of a downloaded snapshot costs against re-hashing it with `sha256sum`.

Baseline, measured in the same run: the previous release (the cache keyed by name),
checked out from git at ``--baseline`` (default: the commit before content addressing)
and run against the same servers. Without git history the baseline column is left out.

    .venv/bin/python benchmarks/dedup.py [--shard-mb 64] [--students 7] [--import-mb 1024]

Cases (the issue's):
1. revision update: v1 (config, two shards) then v2 changing only config.json: bytes
   fetched for v2 and disk used after both;
2. a second repository with byte-identical shards: shard bytes fetched, disk used;
3. a room of 1 teacher + STUDENTS agents on loopback that hold v1: the teacher pulls and
   publishes v2, the students pull it: bytes over the origin and over the LAN for v2;
4. `shoal import` of a snapshot folder (IMPORT_MB in two shards): its time against
   `sha256sum` of the same files, and bytes fetched.
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

from agent.testing.hub_server import HubServer  # noqa: E402
from agent.testing.models import make_model  # noqa: E402

BASELINE = "b684a6d"  # the last commit of the cache keyed by name


def du_bytes(path: Path) -> int:
    """Bytes on disk under ``path``, each inode once (as `du` counts hard links)."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Shoal:
    """Runs one release's `shoal` (this checkout, or the baseline's) against the servers."""

    def __init__(self, code: Path, root: Path, hub_url: str):
        self.code, self.root, self.hub_url = code, root, hub_url

    def env(self, cache: Path, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
        env.update(SHOAL_CONFIG=str(self.root / "none.toml"), SHOAL_CACHE_DIR=str(cache),
                   MODELSCOPE_ENDPOINT=self.hub_url, MODELSCOPE_CACHE=str(self.root / "ms"),
                   MODELSCOPE_HOME=str(self.root / "ms-home"), MODELSCOPE_LOG_LEVEL="40",
                   MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false", SHOAL_MDNS="0", PYTHONPATH=str(self.code), **extra)
        return env

    def run(self, args: list[str], env: dict, timeout: float = 600) -> dict:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *args, "--json"], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.code)
        if proc.returncode != 0:
            raise SystemExit(f"shoal {' '.join(args)} ({self.code}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def baseline_checkout(root: Path, commit: str) -> Path | None:
    target = root / "baseline"
    proc = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(target), commit],
                          capture_output=True, text=True)
    return target if proc.returncode == 0 else None


def case_revision_and_copy(shoals: dict, hub: HubServer, v1: Path, v2: Path, copy: Path) -> list[tuple]:
    rows = []
    for name, shoal in shoals.items():
        cache = shoal.root / f"cache-rev-{name}"
        env = shoal.env(cache)
        shoal.run(["pull", "bench/model@v1"], env)
        hub.faults.clear_log()
        shoal.run(["pull", "bench/model@v2"], env)
        v2_bytes = hub.faults.data_bytes()
        disk_v2 = du_bytes(cache) / tree_size(v1)  # everything of the cache: blobs, folders, index, manifests
        hub.faults.clear_log()
        shoal.run(["pull", "bench/copy"], env)
        copy_bytes = hub.faults.data_bytes()
        rows.append((name, v2_bytes, disk_v2, copy_bytes, du_bytes(cache) / tree_size(v1)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--students", type=int, default=7)
    parser.add_argument("--import-mb", type=int, default=1024)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--skip-room", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-dedup-"))
    worktree = None
    try:
        origin = root / "origin"
        v1 = make_model(origin / "v1", weights_bytes=2 * args.shard_mb << 20, shards=2, seed="dedup")
        v2 = origin / "v2"
        shutil.copytree(v1, v2)
        (v2 / "config.json").write_text('{"model_type": "qwen2", "revision": 2}')
        copy = origin / "copy"
        shutil.copytree(v1, copy)
        (copy / "config.json").write_text('{"fine_tuned_from": "bench/model"}')
        with HubServer() as hub:
            hub.add_model("bench/model", v1, revision="v1")
            hub.add_model("bench/model", v2, revision="v2")
            hub.add_model("bench/copy", copy)
            shoals = {"shoal": Shoal(REPO, root, hub.url)}
            worktree = baseline_checkout(root, args.baseline)
            if worktree is not None:
                shoals["baseline"] = Shoal(worktree, root, hub.url)
            rows = case_revision_and_copy(shoals, hub, v1, v2, copy)
            room = None if args.skip_room else case_room(root, hub, v1, v2, args.students)
            imported = case_import(root, hub, args.import_mb)
        config = (v2 / "config.json").stat().st_size
        print(f"\nmodel: 3 files, two {args.shard_mb} MiB shards ({tree_size(v1) / 1e6:.1f} MB); v2 changes "
              f"config.json ({config} B); bench/copy has the same shards\n")
        print("| case | release | fetched from the origin | target | cache on disk / one copy | target |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, v2_bytes, disk_v2, copy_bytes, disk_all in rows:
            print(f"| revision update (v2 after v1) | {name} | {v2_bytes} B | <= {config} B | {disk_v2:.3f} "
                  "(v1 and v2) | <= 1.01 |")
            print(f"| second repository, same shards | {name} | {copy_bytes} B | 0 shard bytes | {disk_all:.3f} "
                  "(v1, v2 and the copy) | one copy |")
        if room is not None:
            print(f"\n| room: teacher + {args.students} students hold v1, teacher publishes v2 | bytes | target |")
            print("| --- | --- | --- |")
            print(f"| over the origin (ModelScope) for v2 | {room['origin']} | <= {config} (the changed file) |")
            print(f"| over the LAN for v2 | {room['lan']} | <= {config * args.students} (changed x students) |")
            print(f"| students' v2 folders equal the origin | {room['correct']}/{args.students} | all |")
        print(f"\n| import of a {args.import_mb} MiB snapshot | seconds | bytes fetched |")
        print("| --- | --- | --- |")
        print(f"| shoal import (hash, check, link) | {imported['import_s']:.2f} | {imported['fetched']} |")
        print(f"| sha256sum of the same files | {imported['sha256sum_s']:.2f} | - |")
        print(f"| ratio import / sha256sum | {imported['import_s'] / imported['sha256sum_s']:.2f} | |")
        print(f"\nreproduce: .venv/bin/python benchmarks/dedup.py --shard-mb {args.shard_mb} "
              f"--students {args.students} --import-mb {args.import_mb}")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


class Agent:
    """A `shoal agent` process of the room (output to a file, never a pipe)."""

    def __init__(self, env: dict, cache: Path):
        self.env, self.cache = env, cache
        cache.mkdir(parents=True, exist_ok=True)
        self.log = open(cache.parent / f"{cache.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent"], env=env, stdout=self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (cache / "agent.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"an agent did not start: see {self.log.name}")
            time.sleep(0.1)

    def status(self) -> dict:
        return json.loads(subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json"], env=self.env,
                                         capture_output=True, text=True, check=True).stdout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def case_room(root: Path, hub: HubServer, v1: Path, v2: Path, students: int) -> dict:
    """Teacher and students on loopback, told the teacher's address and key; every student
    pulls v1 first (from the teacher), then v2 once the teacher has pulled and published it."""
    shoal = Shoal(REPO, root, hub.url)
    swarm = dict(SHOAL_SWARM="1", SHOAL_SWARM_HOST="127.0.0.1", SHOAL_SWARM_SECRET="bench-room",
                 SHOAL_GATEWAY_PORT="0", SHOAL_DHT="0")
    agents: list[Agent] = []
    try:
        t_env = shoal.env(root / "room" / "teacher", **swarm)
        shoal.run(["pull", "bench/model@v1"], t_env)
        subprocess.run([sys.executable, "-m", "agent.cli", "publish", "bench/model@v1"], env=t_env, check=True,
                       capture_output=True)
        key = subprocess.run([sys.executable, "-m", "agent.cli", "id"], env=t_env, check=True, capture_output=True,
                             text=True).stdout.strip()
        teacher = Agent(t_env, root / "room" / "teacher")
        agents.append(teacher)
        address = teacher.status()["swarm"]["addrs"][0]
        pupils = []
        for i in range(students):
            env = shoal.env(root / "room" / f"student-{i}", SHOAL_SWARM_PEERS=address, SHOAL_TRUSTED_PUBLISHERS=key,
                            **swarm)
            pupils.append(Agent(env, root / "room" / f"student-{i}"))
        agents += pupils
        for pupil in pupils:  # they hold v1 (from the teacher) before the lesson's update
            _wait_connected(pupil)
            shoal.run(["pull", "bench/model@v1"], pupil.env)
        hub.faults.clear_log()
        shoal.run(["pull", "bench/model@v2"], t_env)  # the teacher takes the update from the origin
        subprocess.run([sys.executable, "-m", "agent.cli", "publish", "bench/model@v2"], env=t_env, check=True,
                       capture_output=True)
        lan = 0
        for pupil in pupils:
            done = shoal.run(["pull", "bench/model@v2"], pupil.env)
            lan += done["fetched_by_source"].get("lan", 0)
        correct = sum(1 for p in pupils if _digest(p.cache / "models/bench/model/v2") == _digest(v2))
        return {"origin": hub.faults.data_bytes(), "lan": lan, "correct": correct}
    finally:
        for agent in agents:
            agent.stop()


def _wait_connected(agent: Agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = agent.status()["peers"]
        if peers and all(p["connected"] for p in peers):
            return
        time.sleep(0.3)
    raise SystemExit("a student never connected to the teacher")


def _digest(path: Path) -> dict:
    import hashlib
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def case_import(root: Path, hub: HubServer, size_mb: int) -> dict:
    snapshot = make_model(root / "download" / "snapshot", weights_bytes=size_mb << 20, shards=2, seed="import")
    hub.add_model("bench/imported", snapshot)
    files = [str(p) for p in snapshot.rglob("*") if p.is_file()]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # both start with a warm page cache
    started = time.perf_counter()
    subprocess.run(["sha256sum", *files], stdout=subprocess.DEVNULL, check=True)
    sha256sum_s = time.perf_counter() - started
    shoal = Shoal(REPO, root, hub.url)
    env = shoal.env(root / "cache-import")
    hub.faults.clear_log()
    started = time.perf_counter()
    shoal.run(["import", str(snapshot), "--as", "bench/imported"], env)
    import_s = time.perf_counter() - started
    return {"import_s": import_s, "sha256sum_s": sha256sum_s, "fetched": hub.faults.data_bytes()}


if __name__ == "__main__":
    sys.exit(main())
