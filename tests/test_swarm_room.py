"""A room of agents pulling one model at once, as real agent processes on loopback (a
a bootstrap list naming only the first agent, no namespaces, mDNS off): the outside link carries the model about once, no chunk is
fetched from the origin twice while the agent that claimed it lives, and a room whose
member stops dead for 15 s still finishes, correct, without paying the origin again for
its slowness. Also the control plane's idle cost: an agent with 20 connected peers and no
pull uses next to no CPU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import trio

from agent.testing.faults import Fault
from agent.testing.models import make_model
from conftest import MODEL_ID, AgentProcess, mirror, popen_shoal, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(420)
ROOM = 12


def room_env(env: dict, tmp_path: Path, name: str, **extra) -> dict:
    """An agent of the room. Its log (beside its cache, see AgentProcess) is at DEBUG: each
    origin chunk it takes says who it counted as pulling, for when a duplicate appears."""
    return {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_GATEWAY_PORT": "0", "SHOAL_SWARM": "1",
            "SHOAL_SWARM_HOST": "127.0.0.1", "SHOAL_SWARM_SECRET": "room-12", "SHOAL_DHT": "0", "SHOAL_MDNS": "0",
            "SHOAL_CONCURRENCY": "4", "SHOAL_ORIGIN_STREAMS": "2", "SHOAL_LOG_LEVEL": "DEBUG", **extra}


def start_room(env, tmp_path, count: int) -> tuple[list[dict], list[AgentProcess]]:
    """``count`` agents, each told only the first one's address: the hellos pass the rest on."""
    envs, agents, first = [], [], None
    for i in range(count):
        e = room_env(env, tmp_path, f"agent-{i}", **({"SHOAL_SWARM_PEERS": first} if first else {}))
        agent = AgentProcess(e).start()
        if first is None:
            first = json.loads(run_shoal(["status", "--json"], e, check=True).stdout)["swarm"]["addrs"][0]
        envs.append(e)
        agents.append(agent)
    deadline = time.monotonic() + 120
    for e in envs:  # each connected to every other: told of each other by the first (peer exchange)
        while True:
            peers = json.loads(run_shoal(["peers", "--json"], e, check=True).stdout)
            if sum(p["connected"] for p in peers) >= count - 1:
                break
            assert time.monotonic() < deadline, f"an agent of the room never met the others: {peers}"
            time.sleep(0.3)
    return envs, agents


def requested_twice(oss) -> list:
    seen: dict = {}
    for entry in oss.faults.data_requests("/files/"):
        seen[(entry.path, entry.range)] = seen.get((entry.path, entry.range), 0) + 1
    return [key for key, n in seen.items() if n > 1]


@pytest.fixture(scope="module")
def room_model(tmp_path_factory) -> Path:
    """~6 MB: 96 chunks, so that a stopped agent's few chunks are a few percent of the model."""
    return make_model(tmp_path_factory.mktemp("room") / "model", weights_bytes=6 * 1024 * 1024, shards=2,
                      seed="room")


def model_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


def pull_all(envs) -> list[dict]:
    pulls = [popen_shoal(["pull", MODEL_ID, "--json"], e) for e in envs]
    results = []
    for proc in pulls:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append([json.loads(line) for line in out.splitlines() if line.startswith("{")][-1])
    return results


@pytest.mark.parametrize("stop_one", [False, True], ids=["all-live", "one-stopped-15s"])
def test_a_room_of_twelve_pulls_the_model_through_the_origin_about_once(env, oss, room_model, tmp_path, stop_one):
    model_dir = room_model
    mirror(env, model_dir)
    envs, agents = start_room(env, tmp_path, ROOM)
    try:
        oss.faults.clear_log()
        oss.faults.add(Fault("slow", match="/files/", delay=0.2))  # a thin outside link, per chunk
        if not stop_one:
            results = pull_all(envs)
        else:
            pulls = [popen_shoal(["pull", MODEL_ID, "--json"], e) for e in envs]
            while len(oss.faults.data_requests("/files/")) < 6:  # the room is under way
                time.sleep(0.05)
            stopped = agents[ROOM // 2]
            stopped.proc.send_signal(signal.SIGSTOP)
            time.sleep(15)
            stopped.proc.send_signal(signal.SIGCONT)
            results = []
            for proc in pulls:
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err
                results.append([json.loads(line) for line in out.splitlines() if line.startswith("{")][-1])
        size = model_size(model_dir)
        egress = oss.faults.data_bytes("/files/")
        twice = requested_twice(oss)
        assert egress <= 1.1 * size, (egress / size, twice)
        if not stop_one:
            # Nobody paid the origin twice for a chunk: every claimer lived.
            assert twice == [] and all(r["origin_duplicate_chunks"] == 0 for r in results), (
                twice, [(r["origin_duplicate_chunks"], r["fetched_by_source"]) for r in results],
                [str(a.log_path) for a in agents])
        else:
            # Fetched again only what the stopped agent had claimed (two at most:
            # SHOAL_ORIGIN_STREAMS) or held alone when it stopped, once it fell silent past
            # the liveness bound.
            assert len(twice) <= 6, twice
        assert sum(r["fetched_by_source"].get("lan", 0) for r in results) > (ROOM - 2) * size
        for e in envs:
            assert tree_digest(Path(e["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        for agent in agents:
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGCONT)
            agent.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_an_idle_agent_with_twenty_peers_costs_next_to_nothing(env, tmp_path):
    """20 swarm nodes (in this process) connect to an agent and say hello; then nothing
    happens for 30 s. The agent's CPU over those 30 s stays under 2% of a core."""
    from agent.store import Store
    from agent.swarm.node import SwarmNode
    from agent.swarm.protocol import SwarmAccess
    a_env = room_env(env, tmp_path, "idle")
    agent = AgentProcess(a_env).start()
    stores = []
    try:
        address = json.loads(run_shoal(["status", "--json"], a_env, check=True).stdout)["swarm"]["addrs"][0]
        async with trio.open_nursery() as nursery:
            nodes = []
            for i in range(20):
                stores.append(Store(tmp_path / f"peer-{i}"))
                node = SwarmNode(stores[-1], bytes([i + 7]) * 32, access=SwarmAccess("room-12"),
                                 listen_host="127.0.0.1")
                await nursery.start(node.serve)
                await node.connect(address)
                await node.hello(agent_id := address.rsplit("/p2p/", 1)[1])
                nodes.append(node)
            with trio.fail_after(60):  # the agent has said hello back to every one of them
                while True:
                    peers = json.loads((await trio.run_process(
                        [os.sys.executable, "-m", "agent.cli", "peers", "--json"], capture_stdout=True,
                        env={**os.environ, **a_env, "PYTHONPATH": str(Path(__file__).parent.parent)})).stdout)
                    if sum(1 for p in peers if p["connected"] and p["rtt_ms"] is not None) >= 20:
                        break
                    await trio.sleep(0.5)
            await trio.sleep(2)  # let the start-up settle
            before = _cpu_seconds(agent.proc.pid)
            await trio.sleep(30)
            spent = _cpu_seconds(agent.proc.pid) - before
            assert all(agent_id in node.connected() for node in nodes)
            nursery.cancel_scope.cancel()
        assert spent < 0.02 * 30, f"an idle agent with 20 peers used {spent:.2f} CPU seconds in 30 s"
    finally:
        for store in stores:
            store.close()
        agent.stop()
