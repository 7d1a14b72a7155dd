#!/usr/bin/env python3
"""Benchmark: the teacher pushes a lesson to a room, in network namespaces (root only).

A teacher and ``--members`` agents, each in its own namespace (``--agent-mbit`` links), the
OSS mirror in its own (``--origin-mbit``: the school's outside link) holding a generated
model (``--size-mb``) and a chat dataset. The room is set up as a join code sets it up: one
swarm secret, the teacher's key trusted, the teacher's address to dial. With
``--subnets 2`` the room spans two subnets joined by a router that forwards no multicast
(mDNS finds only the members of one's own subnet; the rest come from the teacher's address,
peer exchange and the DHT). ``--offline K`` members are off when the teacher pushes and
start once the others are done; one member's person pulls another model from the mirror
while the push runs.

The teacher runs `shoal room push MODEL --dataset DATASET`; the benchmark follows the
teacher's `shoal room status` and prints, per member, when it held the lesson whole; the
time for the online members against the Kumar-Ross bound of these links (the mirror as
the seed: T_min = max(F/u_s, F/d, N·F/(u_s + N·u))); the mirror's egress of the lesson over
F; whether every member holds it pinned with the right bytes; when the late members caught
up; and whether the person's own pull finished before that member's assignment.

    sudo .venv/bin/python benchmarks/room_push.py [--members 12] [--size-mb 128] [--agent-mbit 100]
        [--origin-mbit 50] [--offline 2] [--subnets 1|2]

Every namespace is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing import netns  # noqa: E402

CLASSROOM = str(REPO / "benchmarks" / "classroom.py")  # its --serve-origin: the mirror in a namespace
BUCKET, MODEL = "classroom", "lab/classroom-model"
DATASET, PERSONAL = "lab/lesson-chat", "lab/person-model"
SUBNET = "10.78.0"


def shoal(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                          **kwargs)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def blake3_tree(root: Path) -> dict[str, str]:
    from agent.hashing import blake3_hash
    return {p.relative_to(root).as_posix(): blake3_hash(p.read_bytes()).hex()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--agent-mbit", type=float, default=100)
    parser.add_argument("--origin-mbit", type=float, default=50)
    parser.add_argument("--offline", type=int, default=2)
    parser.add_argument("--subnets", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    reason = netns.available()
    if reason:
        raise SystemExit(f"room push benchmark: {reason}")
    from agent.testing.models import make_model
    from agent.testing.tiny_llm import make_chat_dataset
    compileall.compile_dir(str(REPO / "agent"), quiet=1)  # once, as a wheel install does
    subnets = (SUBNET,) if args.subnets == 1 else (SUBNET, "10.78.1")
    allow = ",".join(f"{s}.0/24" for s in subnets) + ",224.0.0.251/32"
    with tempfile.TemporaryDirectory(prefix="shoal-roompush-") as tmp, \
            netns.Lab(tag="shpush", subnet=SUBNET, more_subnets=subnets[1:]) as lab:
        root = Path(tmp)
        os.chmod(root, 0o755)
        model = make_model(root / "model", weights_bytes=args.size_mb * 1024 * 1024, shards=4, seed="room-push")
        dataset = make_chat_dataset(root / "dataset", rows=20000)
        personal = make_model(root / "personal", weights_bytes=16 * 1024 * 1024, shards=1, seed="person")
        size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) + \
            sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
        origin = lab.add_host("origin", mbit=args.origin_mbit)
        server = lab.popen(origin, [sys.executable, CLASSROOM, "--serve-origin", "--host", origin.ip, "--model",
                                    str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        origin_url = json.loads(server.stdout.readline())["url"]
        names = ["teacher"] + [f"m{i:02d}" for i in range(args.members)]
        hosts = {name: lab.add_host(name, mbit=args.agent_mbit, segment=(i % args.subnets))
                 for i, name in enumerate(names)}
        key = None
        envs, procs = {}, {}
        for name, host in hosts.items():
            cache = root / name
            cache.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
            env.update(PYTHONPATH=str(REPO), SHOAL_CONFIG=str(root / "none.toml"), SHOAL_CACHE_DIR=str(cache),
                       SHOAL_GATEWAY_PORT="0", SHOAL_USE_MODELSCOPE="0", OSS_ENDPOINT=origin_url,
                       SHOAL_OSS_BUCKET=BUCKET, OSS_ACCESS_KEY_ID="lab", OSS_ACCESS_KEY_SECRET="lab",
                       SHOAL_SWARM="1", SHOAL_SWARM_HOST=host.ip, SHOAL_SWARM_PORT="7100",
                       SHOAL_SWARM_SECRET="room-push", SHOAL_MDNS="1", SHOAL_DHT="1", SHOAL_CHUNK_TIMEOUT="120",
                       SHOAL_TEST_ALLOW_NET=allow)
            envs[name] = env
        # The teacher's key and address: what a join code carries.
        key = shoal(["id"], envs["teacher"], check=True).stdout.strip()
        for what, folder, flag in ((DATASET, dataset, ["--dataset"]), (PERSONAL, personal, [])):
            done = lab.run(hosts["teacher"], [sys.executable, "-m", "agent.cli", "mirror", "push", *flag, what,
                                              "--from-dir", str(folder)], env=envs["teacher"], capture_output=True,
                           text=True)
            if done.returncode != 0:
                raise SystemExit(f"mirror push {what} failed: {done.stderr[-2000:]}")
        server.stdin.write("bytes\n")
        server.stdin.flush()
        server.stdout.readline()  # the pushes' own requests are not the lesson's

        def start(name: str) -> None:
            env = envs[name]
            if name != "teacher":
                env.update(SHOAL_TRUSTED_PUBLISHERS=key, SHOAL_SWARM_PEERS=teacher_addr)
            log = open(root / f"{name}.log", "w")
            procs[name] = lab.popen(hosts[name], [sys.executable, "-m", "agent.cli", "agent"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)

        start("teacher")
        wait_for(lambda: (root / "teacher" / "agent.json").exists(), 60, "the teacher's agent")
        teacher_addr = f"/ip4/{hosts['teacher'].ip}/tcp/7100/p2p/" + \
            json.loads(shoal(["status", "--json"], envs["teacher"]).stdout)["swarm"]["peer_id"]
        late = names[len(names) - args.offline:] if args.offline else []
        online = [n for n in names[1:] if n not in late]
        for name in online:
            start(name)
        for name in online:
            wait_for(lambda: (root / name / "agent.json").exists(), 90, f"{name}'s agent")

        def members_seen() -> int:
            peers = json.loads(shoal(["peers", "--json"], envs["teacher"]).stdout or "[]")
            return sum(1 for p in peers if p["connected"])
        wait_for(lambda: members_seen() >= len(online), 180, "every online member to reach the teacher")

        def everyone_met() -> bool:
            # A class's machines have been up since boot when the teacher pushes: every one
            # connected to every other (found by mDNS on its subnet, the rest by peer exchange).
            for name in online:
                peers = json.loads(shoal(["peers", "--json"], envs[name]).stdout or "[]")
                if sum(1 for p in peers if p["connected"] and p.get("rtt_ms") is not None) < len(online):
                    return False
            return True
        wait_for(everyone_met, 180, "every online member to meet every other")
        busy = online[0]
        pushed_at = time.monotonic()
        proc = shoal(["room", "push", MODEL, "--dataset", DATASET, "--json"], envs["teacher"])
        if proc.returncode != 0:
            raise SystemExit(f"room push failed: {proc.stderr}")
        time.sleep(2.0)
        person = subprocess.Popen([sys.executable, "-m", "agent.cli", "pull", PERSONAL, "--json"], env=envs[busy],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done_at: dict[str, float] = {}
        person_done = None
        assignment_state_then = None
        status = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if person_done is None and person.poll() is not None:
                person_done = time.monotonic() - pushed_at
                held = json.loads(shoal(["room", "assignments", "--json"], envs[busy]).stdout)
                assignment_state_then = {k: v["state"] for k, v in held["items"].items()}
            status = json.loads(shoal(["room", "status", "--json"], envs["teacher"]).stdout or "{}")
            for m in status.get("members", []):
                if m["items"] and all(i["state"] == "complete" for i in m["items"].values()):
                    done_at.setdefault(m["id"], time.monotonic() - pushed_at)
            if len(done_at) >= len(online) and person_done is not None:
                break
            time.sleep(1.0)
        online_done = max(done_at.values()) if len(done_at) >= len(online) else None
        served = (server.stdin.write("bytes\n"), server.stdin.flush(), json.loads(server.stdout.readline()))[2]
        lesson_bytes = sum(int(r[2].split("=")[1].split("-")[1]) - int(r[2].split("=")[1].split("-")[0]) + 1
                           for r in served["requests"] if PERSONAL not in r[1])
        # The late members: started now, they catch up from the room.
        late_started = time.monotonic()
        for name in late:
            start(name)
        late_done = {}
        while late and time.monotonic() - late_started < 600:
            status = json.loads(shoal(["room", "status", "--json"], envs["teacher"]).stdout or "{}")
            for m in status.get("members", []):
                if m["items"] and all(i["state"] == "complete" for i in m["items"].values()):
                    if m["id"] not in done_at:
                        late_done.setdefault(m["id"], time.monotonic() - late_started)
            if len(late_done) >= len(late):
                break
            time.sleep(1.0)
        served_late = (server.stdin.write("bytes\n"), server.stdin.flush(), json.loads(server.stdout.readline()))[2]
        # Every member: pinned, the right bytes.
        truth = blake3_tree(model)
        correct = pinned = 0
        for name in names[1:]:
            rows = {r["model"]: r for r in json.loads(shoal(["ls", "--json"], envs[name]).stdout or "[]")}
            row = rows.get(MODEL)
            if row and row["pinned"] and rows.get(f"datasets/{DATASET}", {}).get("pinned"):
                pinned += 1
            if row and row["state"] == "complete" and blake3_tree(Path(row["dir"])) == truth:
                correct += 1
        for proc in procs.values():
            proc.terminate()
    mbit = 1e6 / 8
    n = len(names)  # the teacher pulls its own assignment too
    u_s, u = args.origin_mbit * mbit, args.agent_mbit * mbit
    t_min = max(size / u_s, size / u, n * size / (u_s + n * u))
    print(f"\nroom push: teacher + {args.members} members ({args.subnets} subnet{'s' if args.subnets > 1 else ''}), "
          f"{args.agent_mbit:g} Mbit/s links, mirror {args.origin_mbit:g} Mbit/s, lesson {size / 1e6:.1f} MB "
          f"(model {args.size_mb} MiB + dataset)\n")
    print("| figure | value |\n| --- | --- |")
    print(f"| online members done | {len(done_at)} of {len(online)} |")
    print(f"| last online member done | {online_done and round(online_done, 1)} s |")
    print(f"| Kumar-Ross T_min for these links | {t_min:.1f} s |")
    print(f"| ratio | {online_done / t_min:.2f} |" if online_done else "| ratio | - |")
    print(f"| mirror egress of the lesson / F (online members) | {lesson_bytes / size:.3f} |")
    print(f"| mirror egress while the {len(late)} late members caught up / F | "
          f"{served_late['bytes'] / size:.3f} |")
    print(f"| late members done after they started | "
          f"{', '.join(f'{v:.1f} s' for v in sorted(late_done.values())) or '-'} |")
    print(f"| the person's own pull on {busy} done after the push | {person_done and round(person_done, 1)} s; "
          f"that member's assignments then: {assignment_state_then} |")
    print(f"| members pinned / with the right bytes | {pinned} / {correct} of {args.members} |")
    print(f"\nreproduce: sudo .venv/bin/python benchmarks/room_push.py --members {args.members} --size-mb {args.size_mb} "
          f"--agent-mbit {args.agent_mbit:g} --origin-mbit {args.origin_mbit:g} --offline {args.offline} "
          f"--subnets {args.subnets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
