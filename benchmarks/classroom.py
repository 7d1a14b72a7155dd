#!/usr/bin/env python3
"""Benchmark: a classroom pulling one model at once, in network namespaces (root only),
with shoal and with libtorrent on the same harness, back to back, in one invocation.

N agents (``--agents``), each in its own namespace on one bridge, every link limited with
tc (``--agent-mbit`` each way); the origin in its own namespace, limited to
``--origin-mbit``: for shoal the local OSS-compatible server (the mirror), for libtorrent
a seeding client. shoal's agents find each other by mDNS (``--no-multicast``: a bootstrap
list and the DHT instead). All start pulling a generated model (``--size-mb``) at the same
moment. Printed per run: the time until the last agent is done over the Kumar-Ross lower
bound for these links,

    T_min = max(F/u_s, F/d_min, N*F/(u_s + sum u_i)),

the origin's egress over F (payload the origin sent, and bytes on its link), origin
chunks sent more than once, CPU seconds per GiB delivered (the agents' or clients' CPU
during the pull, summed), and the peak RSS of one agent or client.

Scenarios (both systems): ``--late-joiners K`` (K agents start when the others are half
done), ``--leave K`` (K agents are killed then), ``--slow-agent MBIT`` (one agent's link
limited to MBIT). Every remaining agent's files are checked against the origin's.

    sudo python benchmarks/classroom.py [--agents 24] [--size-mb 128] [--agent-mbit 100]
        [--origin-mbit 50] [--late-joiners 4] [--leave 2] [--slow-agent 10] [--no-multicast]
        [--rooms 3 --room-mbit 100]
        [--no-libtorrent] [--contrast]

libtorrent: Debian's ``python3-libtorrent`` (``apt-get install python3-libtorrent``), run with
``/usr/bin/python3`` (``benchmarks/lt_client.py``). ``--contrast`` adds a shoal run with
sharing off (every agent straight from the mirror). ``--rooms R``: a campus in small, the
agents dealt over R subnets joined by a router (each room's link ``--room-mbit`` each way,
multicast not routed), the origin on a subnet of its own (its link the outside link); the
bytes into and out of each room are printed over F. Every namespace it creates is deleted
at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
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

from agent.testing import netns  # noqa: E402

BUCKET = "classroom"
MODEL = "lab/classroom-model"
SUBNET = "10.78.0"
LT_PYTHON = "/usr/bin/python3"
LT_CLIENT = str(REPO / "benchmarks" / "lt_client.py")


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
    chunk = int(args.chunk_mb * 2**20) if args.chunk_mb else None
    push_directory(ref, Path(args.model), settings, manifest_from_dir(ref, Path(args.model), chunk))
    server.faults.clear_log()
    print(json.dumps({"url": server.url}), flush=True)
    for line in sys.stdin:  # "bytes" -> payload bytes served since the last ask
        if line.strip() == "bytes":
            requests = server.faults.data_requests("/files/")
            total = server.faults.data_bytes("/files/")
            seen: dict = {}
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


def blake3_tree(root: Path) -> dict[str, str]:
    from agent.hashing import blake3_hash
    return {p.relative_to(root).as_posix(): blake3_hash(p.read_bytes()).hex()
            for p in sorted(root.rglob("*")) if p.is_file()}


def agent_first_chunk(result: dict, what: str = "first_chunk_s") -> float | None:
    """Seconds from the agent taking the pull (asking peers first) to its first verified
    chunk (or, with ``first_request_s``, to its first chunk request: bytes moving)."""
    timings = result.get("timings") or {}
    if timings.get(what) is None:
        return None
    return round(timings.get("offers_s", 0.0) + timings[what], 3)


class Scenario:
    """Who starts late, who is killed, and when: when the median agent is half done."""

    def __init__(self, args, hosts: list):
        self.late = hosts[len(hosts) - args.late_joiners:] if args.late_joiners else []
        # The slow agent (the first host) stays: the scenario is about it finishing.
        rest = [h for h in hosts if h not in self.late and not (args.slow_agent and h is hosts[0])]
        self.leavers = rest[:args.leave] if args.leave else []
        self.fired = threading.Event()


def profile(pid: int, seconds: float, label: str) -> subprocess.Popen:
    """py-spy (``pip install py-spy``) on one agent for ``seconds``: collapsed stacks in
    benchmarks/out/profile-LABEL.txt (a flame graph tool reads them; ``sort | tail`` too)."""
    out = REPO / "benchmarks" / "out" / f"profile-{label}.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
                             "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_shoal_class(lab, hosts, origin_url, root: Path, args, *, sharing: bool, label: str) -> dict:
    scenario = Scenario(args, hosts)
    procs, envs = {}, {}
    first = None
    # mDNS does not cross a router: rooms find each other through the first agent and the DHT.
    bootstrap = args.no_multicast or args.rooms > 1
    for host in hosts:
        cache = root / label / host.name
        cache.mkdir(parents=True)
        extra = {"OSS_ENDPOINT": origin_url, "SHOAL_OSS_BUCKET": BUCKET, "OSS_ACCESS_KEY_ID": "lab",
                 "OSS_ACCESS_KEY_SECRET": "lab", "SHOAL_SWARM": "1" if sharing else "0",
                 "SHOAL_SWARM_HOST": host.ip, "SHOAL_SWARM_PORT": "7100", "SHOAL_SWARM_SECRET": "classroom",
                 "SHOAL_CHUNK_TIMEOUT": "120", "SHOAL_MDNS": "0" if args.no_multicast else "1",
                 "SHOAL_DHT": "1" if bootstrap else "0", **dict(kv.split("=", 1) for kv in args.set)}
        if args.trace:
            extra["SHOAL_TRACE"] = str(REPO / "benchmarks" / "out" / f"trace-{host.name}.txt")
            extra["SHOAL_LOG_LEVEL"] = "DEBUG"
        if bootstrap and first is not None:
            extra["SHOAL_SWARM_PEERS"] = first
        env = shoal_env(cache, extra)
        # With --trace the agents' logs are kept beside the traces (benchmarks/out/agent-NAME.log).
        log = open((REPO / "benchmarks" / "out" / f"agent-{host.name}.log") if args.trace
                   else cache.parent / f"{host.name}.log", "w")
        procs[host.name] = lab.popen(host, [sys.executable, "-m", "agent.cli", "agent"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        envs[host.name] = env
        if bootstrap and first is None:
            wait_for(lambda: (cache / "agent.json").exists(), 60, "the first agent to start")
            first = json.loads(shoal(["status", "--json"], env).stdout)["swarm"]["addrs"][0]
    for env in envs.values():
        wait_for(lambda: (Path(env["SHOAL_CACHE_DIR"]) / "agent.json").exists(), 90, "the agents to start")
    if sharing:
        def all_connected() -> bool:
            # Connected and past the hello (a key to the peer's data port, its RTT measured),
            # as a class's agents are by the time the teacher says "pull": agents started in
            # the same second still redial crossed connections and say hello again for a
            # while, and those hellos would otherwise land in the pulls' first seconds.
            for env in envs.values():
                peers = json.loads(shoal(["peers", "--json"], env).stdout or "[]")
                ready = [p for p in peers if p["connected"] and p.get("rtt_ms") is not None and not p.get("error")]
                if len(ready) < len(hosts) - 1:
                    return False
            return True
        wait_for(all_connected, 180, "discovery to connect every agent to every other and say hello")
    watched = procs[hosts[1].name].pid
    if args.profile:  # one agent of the room, idle with its peers connected
        profile(watched, args.profile, "idle").wait()
    status_before = {name: json.loads(shoal(["status", "--json"], env).stdout or "{}") for name, env in envs.items()}
    cpu_before = {name: status.get("cpu", {}) for name, status in status_before.items()}
    profiler = profile(watched, args.profile, "pull") if args.profile else None
    started, started_at = time.monotonic(), time.time()
    pulls, finished, results = {}, {}, {}

    def start_pull(host) -> None:
        # /usr/bin/time: what each `shoal pull` client costs (they share the machine's cores too).
        pulls[host.name] = subprocess.Popen(["/usr/bin/time", "-f", "client-cpu %U %S",
                                             sys.executable, "-m", "agent.cli", "pull", MODEL, "--json"],
                                            env=envs[host.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)
    for host in hosts:
        if host not in scenario.late:
            start_pull(host)
    if scenario.late or scenario.leavers:
        def half_done() -> bool:
            done = []
            for host in hosts:
                if host in scenario.late:
                    continue
                status = json.loads(shoal(["status", "--json"], envs[host.name]).stdout or "{}")
                pull = next(iter(status.get("pulls", [])), None)
                done.append(1.0 if pull is None else pull["done_bytes"] / max(1, pull["total_bytes"]))
            return statistics.median(done) >= 0.5
        wait_for(half_done, 1800, "the class to be half done")
        for host in scenario.leavers:
            procs[host.name].send_signal(signal.SIGKILL)
        for host in scenario.late:
            start_pull(host)
    for name, pull in pulls.items():
        out, err = pull.communicate(timeout=3600)
        finished[name] = time.monotonic() - started
        if pull.returncode != 0:
            if any(h.name == name for h in scenario.leavers):
                continue
            raise SystemExit(f"{name}'s pull failed ({pull.returncode}): {err}")
        results[name] = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        cpu_line = [line.split()[1:] for line in err.splitlines() if line.startswith("client-cpu ")]
        results[name]["client_cpu_s"] = sum(map(float, cpu_line[-1])) if cpu_line else None
    if profiler is not None:
        profiler.wait()
    status_after = {name: json.loads(shoal(["status", "--json"], env).stdout or "{}")
                    for name, env in envs.items() if not any(h.name == name for h in scenario.leavers)}
    cpu_after = {name: status.get("cpu", {}) for name, status in status_after.items()}
    asked: dict[str, int] = {}  # what the agents asked of each other during the pulls
    for name, status in status_after.items():
        for kind, n in ((status.get("swarm") or {}).get("asked") or {}).items():
            before = ((status_before[name].get("swarm") or {}).get("asked") or {}).get(kind, 0)
            asked[kind] = asked.get(kind, 0) + n - before
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        proc.wait(timeout=60)
    remaining = [h for h in hosts if h not in scenario.leavers]
    cpu = {name: {k: cpu_after[name].get(k, 0) - cpu_before[name].get(k, 0)
                  for k in ("control_s", "data_s", "other_s", "total_s")} for name in cpu_after}
    for name in cpu:  # the data plane by part: recv, hash, write, send
        before, after = (s.get(name, {}).get("data_by_part_s", {}) for s in (cpu_before, cpu_after))
        cpu[name]["data_by_part_s"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"system": "shoal" if sharing else "shoal, sharing off",
            "last_done_s": max(finished[h.name] for h in remaining),
            "delivered": sum(sum(r["fetched_by_source"].values()) for r in results.values()),
            "from_lan": sum(r["fetched_by_source"].get("lan", 0) for r in results.values()),
            "cpu": cpu, "peak_rss": max(c.get("peak_rss_bytes", 0) for c in cpu_after.values()),
            "first_byte_s": sorted(r.get("first_byte_s") or 0 for r in results.values()),
            "late_first_byte_s": [results[h.name].get("first_byte_s") for h in scenario.late],
            "late_first_chunk_s": [agent_first_chunk(results[h.name]) for h in scenario.late],
            "late_first_request_s": [agent_first_chunk(results[h.name], "first_request_s") for h in scenario.late],
            "dirs": {h.name: root / label / h.name / "models" / MODEL / "master" for h in remaining},
            "started_at": started_at, "finished": finished, "results": results, "asked": asked}


def origin_timeline(run: dict, origin_mbit: float) -> str:
    """When the origin's link started and stopped being busy, from the pulls' start: where
    a room loses time at its start and at its tail."""
    start = run["started_at"]
    first = min((r[0] for r in run.get("origin_requests") or []), default=None)
    busy = [t1 - start for (t0, b0, *_), (t1, b1, *_) in zip(run["origin_tx_samples"], run["origin_tx_samples"][1:])
            if t1 > t0 and (b1 - b0) * 8 / (t1 - t0) >= 0.8 * origin_mbit * 1e6]
    text = "origin link (shoal): "
    text += f"first chunk request {first - start:.1f} s after the pulls started; " if first else ""
    if busy:
        text += f"at >= 80% of its rate from {busy[0]:.1f} s to {busy[-1]:.1f} s ({len(busy)} half-second samples)"
    else:
        text += "never at 80% of its rate"
    return text


def run_libtorrent_class(lab, hosts, origin, root: Path, model: Path, args) -> dict:
    scenario = Scenario(args, hosts)
    torrent = root / "model.torrent"
    subprocess.run([LT_PYTHON, LT_CLIENT, "--make-torrent", str(model), str(torrent)], check=True)
    port = 6881
    peers = ",".join(f"{h.ip}:{port}" for h in [origin, *hosts])
    clients, lines = {}, {}

    def start(host, seed: bool, save: Path) -> None:
        save.mkdir(parents=True, exist_ok=True)
        proc = lab.popen(host, [LT_PYTHON, LT_CLIENT, "--torrent", str(torrent), "--save", str(save), "--listen",
                                host.ip, "--port", str(port), "--peers", peers, *(["--seed"] if seed else [])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        clients[host.name] = proc
        lines[host.name] = []

        def read() -> None:
            for line in proc.stdout:
                lines[host.name].append((time.monotonic(), json.loads(line)))
        threading.Thread(target=read, daemon=True).start()
    start(origin, True, model.parent)
    time.sleep(1.0)
    origin_tx = lab.tx_bytes(origin)
    started = time.monotonic()
    for host in hosts:
        if host not in scenario.late:
            start(host, False, root / "lt" / host.name)

    def progress(name: str) -> float:
        seen = [p["progress"] for _, p in lines.get(name, []) if "progress" in p]
        return seen[-1] if seen else 0.0
    if scenario.late or scenario.leavers:
        wait_for(lambda: statistics.median(progress(h.name) for h in hosts if h not in scenario.late) >= 0.5,
                 1800, "libtorrent's class to be half done")
        for host in scenario.leavers:
            clients[host.name].send_signal(signal.SIGKILL)
        for host in scenario.late:
            start(host, False, root / "lt" / host.name)
    remaining = [h for h in hosts if h not in scenario.leavers]

    def done_at(name: str) -> float | None:
        return next((t for t, p in lines[name] if "done_s" in p), None)
    wait_for(lambda: all(done_at(h.name) is not None for h in remaining), 3600, "libtorrent's clients to finish")
    last = max(done_at(h.name) for h in remaining) - started
    origin_link = lab.tx_bytes(origin) - origin_tx
    for proc in clients.values():
        if proc.poll() is None:
            proc.stdin.close()
    for proc in clients.values():
        proc.wait(timeout=60)
    time.sleep(0.5)
    stats = {name: next((p for _, p in reversed(lines[name]) if "cpu_s" in p), {}) for name in lines}
    downloaders = [stats[h.name] for h in remaining]
    return {"system": "libtorrent 2.0.8", "last_done_s": last,
            "delivered": sum(s.get("downloaded", 0) for s in downloaders), "from_lan": None,
            "origin_bytes": stats[origin.name].get("uploaded", 0), "origin_link_bytes": origin_link,
            "origin_dup_chunks": None,
            "cpu": {h.name: {"total_s": stats[h.name].get("cpu_s", 0)} for h in remaining},
            "peak_rss": max((s.get("peak_rss_bytes", 0) for s in downloaders), default=0),
            "dirs": {h.name: root / "lt" / h.name / model.name for h in remaining}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=24)
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--agent-mbit", type=float, default=100)
    parser.add_argument("--origin-mbit", type=float, default=50)
    parser.add_argument("--late-joiners", type=int, default=0)
    parser.add_argument("--leave", type=int, default=0)
    parser.add_argument("--slow-agent", type=float, default=0, metavar="MBIT")
    parser.add_argument("--no-multicast", action="store_true", help="bootstrap list and DHT instead of mDNS")
    parser.add_argument("--rooms", type=int, default=1,
                        help="agents spread over this many subnets (rooms) behind a router; the origin on its own")
    parser.add_argument("--room-mbit", type=float, default=0, help="each room's link to the router, each way (0: unlimited)")
    parser.add_argument("--no-libtorrent", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="every agent writes when each chunk arrived (benchmarks/out/trace-*.txt)")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="py-spy one agent for SECONDS idle, then from the pulls' start (benchmarks/out/profile-*.txt)")
    parser.add_argument("--contrast", action="store_true", help="also a shoal run with sharing off")
    parser.add_argument("--chunk-mb", type=float, help="the mirror's chunk size (default: shoal's choice for the size)")
    parser.add_argument("--set", action="append", default=[], metavar="SHOAL_X=V",
                        help="a setting for every agent, e.g. --set SHOAL_UPLOAD_SLOTS=2")
    parser.add_argument("--serve-origin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        return serve_origin(args)
    reason = netns.available()
    if reason:
        raise SystemExit(f"classroom benchmark: {reason}")
    use_lt = not args.no_libtorrent
    if use_lt and subprocess.run([LT_PYTHON, "-c", "import libtorrent"], capture_output=True).returncode != 0:
        raise SystemExit("libtorrent is not installed for the system Python: apt-get install python3-libtorrent "
                         "(or pass --no-libtorrent)")
    from agent.testing.models import make_model
    # Bytecode compiled once, as installing a wheel does: otherwise, in a shell with
    # PYTHONDONTWRITEBYTECODE set, each of the room's agents and `shoal pull` clients
    # compiles every module it imports, the pull's first ones included, on the shared cores.
    compileall.compile_dir(str(REPO / "agent"), quiet=1)
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    runs = []
    rooms = [f"{SUBNET.rsplit('.', 1)[0]}.{r + 1}" for r in range(args.rooms)] if args.rooms > 1 else []
    with tempfile.TemporaryDirectory(prefix="shoal-classroom-") as tmp, \
            netns.Lab(tag="shcls", subnet=SUBNET, more_subnets=tuple(rooms), router_mbit=args.room_mbit or None) as lab:
        root = Path(tmp)
        os.chmod(root, 0o755)
        model = make_model(root / "model", weights_bytes=args.size_mb * 1024 * 1024, shards=4, seed="classroom")
        size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        truth = blake3_tree(model)
        origin = lab.add_host("origin", mbit=args.origin_mbit)
        # With rooms: the origin alone on its subnet (its link is the campus's outside link),
        # the agents dealt over the rooms' subnets.
        hosts = [lab.add_host(f"a{i}", mbit=args.slow_agent if (args.slow_agent and i == 0) else args.agent_mbit,
                              segment=1 + i % args.rooms if rooms else 0)
                 for i in range(args.agents)]
        server = lab.popen(origin, [sys.executable, __file__, "--serve-origin", "--host", origin.ip,
                                    "--model", str(model), *(["--chunk-mb", str(args.chunk_mb)] if args.chunk_mb else [])],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        origin_url = json.loads(server.stdout.readline())["url"]

        def origin_served() -> dict:
            server.stdin.write("bytes\n")
            server.stdin.flush()
            return json.loads(server.stdout.readline())

        for sharing in ([True, False] if args.contrast else [True]):
            origin_tx = lab.tx_bytes(origin)
            room_bytes = [(lab.into_subnet_bytes(r), lab.out_of_subnet_bytes(r)) for r in range(1, len(rooms) + 1)]
            samples, stop = [], threading.Event()

            def sample() -> None:  # the origin link's bytes and the machine's CPU over time
                while not stop.is_set():
                    with open("/proc/stat") as f:
                        fields = [int(x) for x in f.readline().split()[1:]]
                    samples.append((time.time(), lab.tx_bytes(origin), sum(fields), fields[3] + fields[4]))
                    stop.wait(0.5)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            run = run_shoal_class(lab, hosts, origin_url, root, args, sharing=sharing,
                                  label="swarm" if sharing else "direct")
            stop.set()
            sampler.join()
            run["origin_tx_samples"] = samples
            run["rooms"] = [((lab.into_subnet_bytes(r) - i) / size, (lab.out_of_subnet_bytes(r) - o) / size)
                            for r, (i, o) in enumerate(room_bytes, start=1)]
            served = origin_served()
            run.update(origin_bytes=served["bytes"], origin_dup_chunks=served["dup_chunks"],
                       origin_link_bytes=lab.tx_bytes(origin) - origin_tx, origin_requests=served["requests"])
            runs.append(run)
        server.stdin.close()
        server.wait(timeout=30)
        if use_lt:
            runs.append(run_libtorrent_class(lab, hosts, origin, root, model, args))
        for run in runs:  # every remaining agent has the origin's bytes
            wrong = [name for name, d in run["dirs"].items() if blake3_tree(Path(d)) != truth]
            run["wrong"] = wrong
    assert netns.leftover_namespaces("shcls") == [], "namespaces left behind"

    bits = size * 8
    u_s, d_min, u_i = args.origin_mbit * 1e6, args.agent_mbit * 1e6, args.agent_mbit * 1e6
    if args.slow_agent:
        d_min = min(d_min, args.slow_agent * 1e6)
    n = args.agents - args.leave
    t_min = max(bits / u_s, bits / d_min, n * bits / (u_s + n * u_i))
    if rooms and args.room_mbit:  # a room's copies through its link and its own machines' uploads
        per_room = -(-n // args.rooms)
        t_min = max(t_min, bits / (args.room_mbit * 1e6),
                    per_room * bits / ((args.room_mbit + per_room * args.agent_mbit) * 1e6))
    scenario = ", ".join(filter(None, [f"{args.late_joiners} late joiners" if args.late_joiners else "",
                                       f"{args.leave} leave mid-pull" if args.leave else "",
                                       f"one agent at {args.slow_agent:.0f} Mbit/s" if args.slow_agent else "",
                                       "no multicast" if args.no_multicast else "",
                                       f"{args.rooms} rooms behind a router" + (
                                           f" ({args.room_mbit:.0f} Mbit/s each)" if args.room_mbit else "")
                                       if rooms else ""])) or "all start at once"
    lines = [f"Classroom: {args.agents} agents x {args.agent_mbit:.0f} Mbit/s, origin {args.origin_mbit:.0f} Mbit/s, "
             f"model {size / 2**20:.0f} MiB (F = {size} bytes); {scenario}", "",
             "| system | last done (s) | T_min (s) | ratio | origin egress / F | origin link / F | "
             "origin chunks sent twice | from LAN | CPU s / GiB delivered | peak RSS MB | all correct |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        gib = run["delivered"] / 2**30 if run["delivered"] else 1
        cpu = sum(c.get("total_s", 0) for c in run["cpu"].values()) / gib
        split = ""
        if "control_s" in next(iter(run["cpu"].values()), {}):
            control = sum(c["control_s"] for c in run["cpu"].values()) / gib
            data = sum(c["data_s"] for c in run["cpu"].values()) / gib
            parts = {}
            for c in run["cpu"].values():
                for k, v in c.get("data_by_part_s", {}).items():
                    parts[k] = parts.get(k, 0) + v / gib
            split = f" (control {control:.1f}, data {data:.1f}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in parts.items()) + ")" if parts else f" (control {control:.1f}, data {data:.1f})"
        lan = f"{100 * run['from_lan'] / run['delivered']:.0f}%" if run.get("from_lan") is not None else "-"
        dups = run["origin_dup_chunks"] if run["origin_dup_chunks"] is not None else "-"
        lines.append(f"| {run['system']} | {run['last_done_s']:.1f} | {t_min:.1f} | {run['last_done_s'] / t_min:.2f} | "
                     f"{run['origin_bytes'] / size:.2f} | {run['origin_link_bytes'] / size:.2f} | {dups} | {lan} | "
                     f"{cpu:.1f}{split} | {run['peak_rss'] / 1e6:.0f} | "
                     f"{'yes' if not run['wrong'] else 'NO: ' + ', '.join(run['wrong'])} |")
    shoal_run = runs[0]
    for run in runs:
        if run.get("rooms"):
            lines.append(f"{run['system']}: bytes into each room / F: "
                         + ", ".join(f"{i:.2f}" for i, _ in run["rooms"]) + "; out of each room / F: "
                         + ", ".join(f"{o:.2f}" for _, o in run["rooms"]))
    firsts = shoal_run["first_byte_s"]
    lines += ["", f"shoal, time from `shoal pull` to its first verified chunk: median {statistics.median(firsts):.2f} s"
              + (f"; late joiners (peers already hold most of it): "
                 f"{', '.join(f'{t:.2f}' for t in shoal_run['late_first_byte_s'])} s (in the agent, from taking "
                 f"the pull: {', '.join(f'{t:.2f}' if t is not None else '-' for t in shoal_run['late_first_chunk_s'])} s;"
                 f" its first chunk request, bytes moving: "
                 f"{', '.join(f'{t:.2f}' if t is not None else '-' for t in shoal_run['late_first_request_s'])} s)"
                 if shoal_run["late_first_byte_s"] else ""),
              origin_timeline(shoal_run, args.origin_mbit),
              "`shoal pull` clients (not in the agents' CPU above): "
              f"{sum(r.get('client_cpu_s') or 0 for r in shoal_run['results'].values()):.1f} CPU s in all",
              "control plane (shoal, all agents, during the pulls): " + (", ".join(
                  f"{n} {kind}" for kind, n in shoal_run["asked"].items()) or "-")
              + " (hello: over libp2p; offer, sub: data-port connections; get: chunk connections; "
              "busy: chunk requests answered busy)",
              "", "reproduce: sudo python benchmarks/classroom.py " + " ".join(sys.argv[1:])]
    report = "\n".join(lines)
    print(report)
    (out_dir / "classroom.md").write_text(report + "\n")
    for run in runs:
        run["dirs"] = {k: str(v) for k, v in run["dirs"].items()}
    (out_dir / "classroom.json").write_text(json.dumps(runs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
