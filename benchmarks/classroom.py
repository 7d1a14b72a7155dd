#!/usr/bin/env python3
"""Benchmark: a classroom pulling one model at once, in network namespaces (root only).

N agents (default 8), each in its own namespace on a bridge, every link limited with tc
(default 200 Mbit/s each way); the local OSS-compatible server in its own namespace,
limited to 100 Mbit/s. Agents find each other by mDNS. All N start pulling a generated
model (default 512 MiB) at the same moment. Printed: the time until the last agent is
done, the Kumar-Ross lower bound for a swarm with these links,

    T_min = max(F/u_s, F/d_min, N*F/(u_s + sum u_i)),

their ratio, and the origin's egress over F (payload bytes the server sent, and bytes on
its link). Then the same classroom with sharing off (every agent straight from OSS), for
contrast. Targets: ratio <= 1.3, origin egress <= 1.1 F.

    sudo python benchmarks/classroom.py [--agents 8] [--size-mb 512] [--agent-mbit 200]
                                        [--origin-mbit 100] [--no-contrast]

Every namespace it creates is deleted at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing import netns  # noqa: E402

BUCKET = "classroom"
MODEL = "lab/classroom-model"
SUBNET = "10.78.0"


def serve_origin(args) -> int:
    """Runs inside the origin's namespace: the OSS server on the lab address, the model pushed."""
    os.environ["SHOAL_TEST_ALLOW_NET"] = f"{SUBNET}.0/24"
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    from agent.testing.oss_server import OssServer
    server = OssServer(host=args.host, port=9000).start()
    server.create_bucket(BUCKET)
    env = {"OSS_ENDPOINT": server.url, "SHOAL_OSS_BUCKET": BUCKET,
           "OSS_ACCESS_KEY_ID": "lab", "OSS_ACCESS_KEY_SECRET": "lab", "SHOAL_CONFIG": "/nonexistent"}
    settings = load_settings(env=env)
    ref = ModelRef(MODEL, "master")
    push_directory(ref, Path(args.model), settings, manifest_from_dir(ref, Path(args.model)))
    server.faults.clear_log()
    print(json.dumps({"url": server.url}), flush=True)
    for line in sys.stdin:  # "bytes" -> payload bytes served since the last ask
        if line.strip() == "bytes":
            total = server.faults.data_bytes("/files/")
            seen: dict = {}
            requests = server.faults.data_requests("/files/")
            for entry in requests:
                seen[(entry.path, entry.range)] = seen.get((entry.path, entry.range), 0) + 1
            server.faults.clear_log()
            print(json.dumps({"bytes": total, "dup_chunks": sum(n - 1 for n in seen.values()),
                              "requests": [[e.at, e.path, e.range] for e in requests]}), flush=True)
    server.close()
    return 0


def shoal_env(cache: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(PYTHONPATH=str(REPO), SHOAL_CONFIG=str(cache.parent / "none.toml"), SHOAL_CACHE_DIR=str(cache),
               SHOAL_GATEWAY_PORT="0", SHOAL_USE_MODELSCOPE="0", **extra)
    return env


def shoal(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                          **kwargs)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def run_class(lab: netns.Lab, hosts: list, origin_url: str, root: Path, *, sharing: bool, label: str) -> dict:
    procs, envs = [], []
    for host in hosts:
        cache = root / label / host.name
        cache.mkdir(parents=True)
        env = shoal_env(cache, {"OSS_ENDPOINT": origin_url, "SHOAL_OSS_BUCKET": BUCKET, "OSS_ACCESS_KEY_ID": "lab",
                                "OSS_ACCESS_KEY_SECRET": "lab", "SHOAL_SWARM": "1" if sharing else "0",
                                "SHOAL_SWARM_HOST": host.ip, "SHOAL_MDNS": "1", "SHOAL_DHT": "0",
                                "SHOAL_SWARM_SECRET": "classroom", "SHOAL_CHUNK_TIMEOUT": "120"})
        log = open(cache.parent / f"{host.name}.log", "w")
        procs.append(lab.popen(host, [sys.executable, "-m", "agent.cli", "agent"], env=env, stdout=log,
                               stderr=subprocess.STDOUT))
        envs.append(env)
    for env in envs:
        wait_for(lambda: (Path(env["SHOAL_CACHE_DIR"]) / "agent.json").exists(), 60, "the agents to start")
    if sharing:
        def all_connected() -> bool:
            for env in envs:
                peers = json.loads(shoal(["peers", "--json"], env).stdout or "[]")
                if sum(1 for p in peers if p["connected"]) < len(hosts) - 1:
                    return False
            return True
        wait_for(all_connected, 90, "mDNS to connect every agent to every other")
    tx_before = {h.name: lab.tx_bytes(h) for h in hosts}
    started = time.monotonic()
    started_at = time.time()
    pulls = [subprocess.Popen([sys.executable, "-m", "agent.cli", "pull", MODEL, "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    finished, results = [], []
    for pull in pulls:
        out, err = pull.communicate(timeout=3600)
        if pull.returncode != 0:
            raise SystemExit(f"a pull failed ({pull.returncode}): {err}")
        finished.append(time.monotonic() - started)
        results.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    uploads = {h.name: lab.tx_bytes(h) - tx_before[h.name] for h in hosts}
    statuses = [json.loads(shoal(["status", "--json"], env).stdout or "{}") for env in envs]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=30)
    return {"last_done_s": max(r["elapsed_s"] for r in results) if results else max(finished),
            "wall_s": max(finished), "results": results, "uploads": uploads,
            "cpu": [s.get("cpu", {}) for s in statuses], "started_at": started_at}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--agent-mbit", type=float, default=200)
    parser.add_argument("--origin-mbit", type=float, default=100)
    parser.add_argument("--no-contrast", action="store_true", help="skip the run with sharing off")
    parser.add_argument("--serve-origin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        return serve_origin(args)
    reason = netns.available()
    if reason:
        raise SystemExit(f"classroom benchmark: {reason}")
    from agent.testing.models import make_model
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="shoal-classroom-") as tmp, netns.Lab(tag="shcls", subnet=SUBNET) as lab:
        root = Path(tmp)
        model = make_model(root / "model", weights_bytes=args.size_mb * 1024 * 1024, shards=4, seed="classroom")
        size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        origin = lab.add_host("origin", mbit=args.origin_mbit)
        hosts = [lab.add_host(f"a{i}", mbit=args.agent_mbit) for i in range(args.agents)]
        server = lab.popen(origin, [sys.executable, __file__, "--serve-origin", "--host", origin.ip,
                                    "--model", str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        origin_url = json.loads(server.stdout.readline())["url"]

        def origin_bytes() -> dict:
            server.stdin.write("bytes\n")
            server.stdin.flush()
            return json.loads(server.stdout.readline())

        runs = []
        for sharing in ([True] if args.no_contrast else [True, False]):
            origin_tx = lab.tx_bytes(origin)
            run = run_class(lab, hosts, origin_url, root, sharing=sharing, label="swarm" if sharing else "direct")
            served = origin_bytes()
            run["origin_bytes"], run["origin_dup_chunks"] = served["bytes"], served["dup_chunks"]
            run["origin_requests"] = served["requests"]
            run["origin_link_bytes"] = lab.tx_bytes(origin) - origin_tx
            run["sharing"] = sharing
            runs.append(run)
    assert netns.leftover_namespaces("shcls") == [], "namespaces left behind"

    bits = size * 8
    u_s, d_min, u_i = args.origin_mbit * 1e6, args.agent_mbit * 1e6, args.agent_mbit * 1e6
    t_min = max(bits / u_s, bits / d_min, args.agents * bits / (u_s + args.agents * u_i))
    lines = [f"Classroom: {args.agents} agents x {args.agent_mbit:.0f} Mbit/s, origin {args.origin_mbit:.0f} Mbit/s, "
             f"model {size / 2**20:.0f} MiB (F = {size} bytes), all start at once", "",
             "| run | last agent done (s) | T_min (s) | ratio | origin egress / F (payload) | origin link bytes / F | "
             "origin duplicate chunks | bytes from LAN | CPU s / GiB (control + data + other) | peak agent RSS MB "
             "| first byte (s, median) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        lan = sum(r["fetched_by_source"].get("lan", 0) for r in run["results"])
        total = sum(sum(r["fetched_by_source"].values()) for r in run["results"])
        cpu = run["cpu"]
        gib = total / 2**30 if total else 1
        control, data = sum(c.get("control_s", 0) for c in cpu), sum(c.get("data_s", 0) for c in cpu)
        other = sum(c.get("other_s", 0) for c in cpu)
        rss = max((c.get("peak_rss_bytes", 0) for c in cpu), default=0) / 1e6
        firsts = sorted(r.get("first_byte_s") or 0 for r in run["results"])
        lines.append(f"| {'sharing (swarm)' if run['sharing'] else 'sharing off (all from OSS)'} | "
                     f"{run['wall_s']:.1f} | {t_min:.1f} | {run['wall_s'] / t_min:.2f} | "
                     f"{run['origin_bytes'] / size:.2f} | {run['origin_link_bytes'] / size:.2f} | "
                     f"{run['origin_dup_chunks']} | {100 * lan / total if total else 0:.0f}% | "
                     f"{(control + data + other) / gib:.1f} ({control / gib:.1f} + {data / gib:.1f} + "
                     f"{other / gib:.1f}) | {rss:.0f} | {firsts[len(firsts) // 2] if firsts else 0:.2f} |")
    lines += ["", "targets (sharing): ratio <= 1.3, origin egress <= 1.1 F", "",
              "reproduce: sudo python benchmarks/classroom.py " + " ".join(sys.argv[1:])]
    report = "\n".join(lines)
    print(report)
    (out_dir / "classroom.md").write_text(report + "\n")
    (out_dir / "classroom.json").write_text(json.dumps(runs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
