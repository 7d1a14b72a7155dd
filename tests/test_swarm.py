"""The LAN swarm with real agent processes on loopback: a teacher's agent seeds a model it
published; students' agents, told only the teacher's address and key, pull it from the LAN
with the mirror and the origin out of reach; an untrusted manifest is refused clearly."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import MODEL_ID, AgentProcess, mirror, popen_shoal, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(240)


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


SECRET = "room-101"


def agent_env(env: dict, tmp_path: Path, name: str, **extra) -> dict:
    return {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_GATEWAY_PORT": "0", "SHOAL_SWARM": "1",
            "SHOAL_SWARM_HOST": "127.0.0.1", "SHOAL_SWARM_SECRET": SECRET, **extra}


def pull_lines(proc_stdout: str) -> list[dict]:
    return [json.loads(line) for line in proc_stdout.splitlines() if line.startswith("{")]


def oss_bytes(oss) -> int:
    """Bytes of model files the OSS server was asked for (ranged GETs)."""
    return oss.faults.data_bytes("/files/")


def model_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


@pytest.fixture
def teacher(env, oss, model_dir, tmp_path):
    """The teacher's agent: pulls the model from the mirror, publishes it, seeds it."""
    mirror(env, model_dir)
    t_env = agent_env(env, tmp_path, "teacher")
    run_shoal(["pull", MODEL_ID], t_env, check=True)
    run_shoal(["publish", MODEL_ID], t_env, check=True)
    key = run_shoal(["id"], t_env, check=True).stdout.strip()
    agent = AgentProcess(t_env).start()
    status = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)
    yield {"env": t_env, "key": key, "addr": status["swarm"]["addrs"][0], "agent": agent}
    agent.stop()


def offline(env: dict) -> dict:
    """No mirror, no hub: an offline classroom."""
    dead = dead_endpoint()
    return {**env, "OSS_ENDPOINT": dead, "MODELSCOPE_ENDPOINT": dead, "SHOAL_RETRIES": "0"}


def wait_connected(env: dict, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(run_shoal(["status", "--json"], env, check=True).stdout)
        if status["peers"] and all(p["connected"] for p in status["peers"]):
            return
        time.sleep(0.2)
    raise AssertionError(f"peers never connected: {status['peers']}")


def test_students_pull_from_the_teacher_with_no_mirror_and_no_origin(env, teacher, hub, oss, model_dir, tmp_path):
    students = []
    try:
        for name in ("student-1", "student-2"):
            # Discovery by the bootstrap list alone: no mDNS, no DHT.
            s_env = offline(agent_env(env, tmp_path, name, SHOAL_SWARM_PEERS=teacher["addr"],
                                      SHOAL_TRUSTED_PUBLISHERS=teacher["key"], SHOAL_DHT="0"))
            students.append((s_env, AgentProcess(s_env).start()))
        oss.faults.clear_log()
        hub.faults.clear_log()
        for s_env, _ in students:
            wait_connected(s_env)
            out = run_shoal(["pull", MODEL_ID, "--json"], s_env, check=True)
            lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            plan, done = lines[0], lines[-1]
            assert plan["plan"].startswith("LAN peer manifest, signed by")
            assert set(done["fetched_by_source"]) == {"lan"}
            assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == \
                tree_digest(model_dir)
            # The student keeps the teacher's signature: it vouches for the manifest to the next
            # student as the teacher does (an offer from a student alone is then enough).
            assert (Path(s_env["SHOAL_CACHE_DIR"]) / "manifests" / f"{done['manifest_id']}.sig").is_file()
        assert oss.faults.data_requests() == [] and hub.faults.data_requests() == []
        peers = json.loads(run_shoal(["peers", "--json"], students[0][0], check=True).stdout)
        assert peers[0]["connected"] and teacher["addr"].endswith(peers[0]["id"])
    finally:
        for _, agent in students:
            agent.stop()


def test_a_manifest_from_an_untrusted_peer_is_refused(env, teacher, tmp_path):
    s_env = offline(agent_env(env, tmp_path, "stranger", SHOAL_SWARM_PEERS=teacher["addr"]))
    agent = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        proc = run_shoal(["pull", MODEL_ID], s_env)
        assert proc.returncode == 5, proc.stderr
        assert "a publisher you do not trust" in proc.stderr and "SHOAL_TRUSTED_PUBLISHERS" in proc.stderr
        assert not (Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master").exists()
    finally:
        agent.stop()


def test_a_peer_serving_corrupt_bytes_is_dropped_and_the_mirror_fills_in(env, teacher, oss, model_dir, tmp_path):
    # Damage the teacher's copy behind its index's back, as a failing disk would.
    shard = sorted((Path(teacher["env"]["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    s_env = agent_env(env, tmp_path, "student", SHOAL_SWARM_PEERS=teacher["addr"],
                      SHOAL_TRUSTED_PUBLISHERS=teacher["key"])
    agent = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        out = run_shoal(["pull", MODEL_ID, "--json"], s_env, check=True)
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        troubles = [line["message"] for line in lines if line.get("event") == "trouble"]
        assert any("the peer is dropped for this pull" in t for t in troubles)
        assert lines[-1]["fetched_by_source"]["lan"] > 0 and lines[-1]["fetched_by_source"]["oss"] > 0
        assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        agent.stop()


def test_a_pinned_manifest_id_needs_no_publisher_key(env, teacher, model_dir, tmp_path):
    listed = json.loads(run_shoal(["ls", "--json"], teacher["env"], check=True).stdout)
    manifest_id = listed[0]["manifest_id"]
    s_env = offline(agent_env(env, tmp_path, "pinner", SHOAL_SWARM_PEERS=teacher["addr"]))
    agent = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        out = run_shoal(["pull", f"{MODEL_ID}@{manifest_id}", "--json"], s_env, check=True)
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert lines[0]["plan"] == "LAN peer manifest, pinned"
        assert lines[-1]["manifest_id"] == manifest_id and set(lines[-1]["fetched_by_source"]) == {"lan"}
        assert tree_digest(Path(lines[-1]["directory"])) == tree_digest(model_dir)
    finally:
        agent.stop()


def test_two_agents_pulling_at_once_fetch_the_model_from_the_origin_about_once(env, oss, model_dir, tmp_path):
    mirror(env, model_dir)
    # A slow origin (0.4 s per chunk), as a lab's outside link is next to its LAN.
    oss.faults.add(Fault("slow", match="/files/", delay=0.4))
    first_env = agent_env(env, tmp_path, "a")
    first = AgentProcess(first_env).start()
    address = json.loads(run_shoal(["status", "--json"], first_env, check=True).stdout)["swarm"]["addrs"][0]
    second_env = agent_env(env, tmp_path, "b", SHOAL_SWARM_PEERS=address)
    second = AgentProcess(second_env).start()
    try:
        wait_connected(second_env)
        oss.faults.clear_log()
        pulls = [popen_shoal(["pull", MODEL_ID, "--json"], e) for e in (first_env, second_env)]
        results = []
        for proc in pulls:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(pull_lines(out)[-1])
        size = model_size(model_dir)
        assert oss_bytes(oss) <= 1.2 * size, (oss_bytes(oss), size, [r["fetched_by_source"] for r in results])
        assert all(r["fetched_by_source"].get("lan", 0) > 0 for r in results)
        for e in (first_env, second_env):
            assert tree_digest(Path(e["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        first.stop()
        second.stop()


def test_a_peer_outside_the_swarm_is_refused(env, teacher, tmp_path):
    s_env = offline(agent_env(env, tmp_path, "stranger", SHOAL_SWARM_PEERS=teacher["addr"],
                              SHOAL_TRUSTED_PUBLISHERS=teacher["key"], SHOAL_SWARM_SECRET="another-room"))
    agent = AgentProcess(s_env).start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc = run_shoal(["pull", MODEL_ID], s_env)
            peers = json.loads(run_shoal(["peers", "--json"], s_env, check=True).stdout)
            if peers and "SHOAL_SWARM_SECRET" in (peers[0]["error"] or ""):
                break
            time.sleep(0.5)
        assert proc.returncode == 4, proc.stderr  # nothing but the (unreachable) origin was left
        assert "not in this swarm" not in proc.stdout
        # Another secret is another private network: not even libp2p's handshake completes.
        assert not peers[0]["connected"] and "SHOAL_SWARM_SECRET" in peers[0]["error"]
        assert not (Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master").exists()
        served = json.loads(run_shoal(["peers", "--json"], teacher["env"], check=True).stdout)
        assert all(p["bytes_up"] == 0 for p in served)
    finally:
        agent.stop()


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_a_peer_that_dies_or_stalls_mid_transfer_leaves_the_pull_to_the_mirror(env, oss, model_dir, tmp_path, how):
    mirror(env, model_dir)
    seed_env = agent_env(env, tmp_path, "seed", SHOAL_UPLOAD_RATE="300KB")
    run_shoal(["pull", MODEL_ID], seed_env, check=True)
    run_shoal(["publish", MODEL_ID], seed_env, check=True)
    key = run_shoal(["id"], seed_env, check=True).stdout.strip()
    seed = AgentProcess(seed_env).start()
    address = json.loads(run_shoal(["status", "--json"], seed_env, check=True).stdout)["swarm"]["addrs"][0]
    s_env = agent_env(env, tmp_path, "student", SHOAL_SWARM_PEERS=address, SHOAL_TRUSTED_PUBLISHERS=key)
    student = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        pull = popen_shoal(["pull", MODEL_ID, "--json"], s_env)
        time.sleep(2.0)  # a few hundred KB have come from the seed by now
        seed.proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
        done = pull_lines(out)[-1]
        assert done["fetched_by_source"]["lan"] > 0 and done["fetched_by_source"]["oss"] > 0
        assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        if how == "stalled":
            seed.proc.send_signal(signal.SIGCONT)
        seed.stop(signal.SIGKILL)
        student.stop()


def test_endgame_fetches_a_slow_peers_last_chunks_again_from_another_peer(env, oss, model_dir, tmp_path):
    """Two seeds hold the model; one uploads at 2 KB/s. When nothing is left to start, the
    chunks still crawling from it are fetched a second time from the other seed (endgame)."""
    mirror(env, model_dir)
    seeds, addresses, key = [], [], None
    for name, rate in (("slow", "2KB"), ("fast", None)):
        seed_env = agent_env(env, tmp_path, name, **({"SHOAL_UPLOAD_RATE": rate} if rate else {}))
        run_shoal(["pull", MODEL_ID], seed_env, check=True)
        if key is None:  # one publisher is enough: both hold the mirror's manifest
            run_shoal(["publish", MODEL_ID], seed_env, check=True)
            key = run_shoal(["id"], seed_env, check=True).stdout.strip()
        seeds.append(AgentProcess(seed_env).start())
        addresses.append(json.loads(run_shoal(["status", "--json"], seed_env, check=True).stdout)["swarm"]["addrs"][0])
    # A chunk may take 10 s before it is given up: the endgame (after 4 s) comes first.
    s_env = offline(agent_env(env, tmp_path, "student", SHOAL_SWARM_PEERS=",".join(addresses),
                              SHOAL_TRUSTED_PUBLISHERS=key, SHOAL_CHUNK_TIMEOUT="10"))
    student = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        done = pull_lines(run_shoal(["pull", MODEL_ID, "--json"], s_env, check=True).stdout)[-1]
        assert set(done["fetched_by_source"]) == {"lan"}
        assert done["endgame_duplicates"] > 0, done
        assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        for agent in (student, *seeds):
            agent.stop()


def test_the_lan_demo_runs_end_to_end(tmp_path):
    """`shoal demo --lan` (what ./bootstrap/demo runs second): real agents on loopback."""
    proc = run_shoal(["demo", "--lan", "--size-mb", "16"], {"SHOAL_CONFIG": str(tmp_path / "none.toml")},
                     timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "the students got every byte from the LAN" in proc.stderr
    assert proc.stderr.count("fetched LAN ") >= 4 and "Together they fetched" in proc.stderr
    # The dataset came from the teacher too, and a student trained 3 steps on it, offline.
    assert proc.stderr.count("done: datasets/shoal-demo/chat-data@master") == 2
    assert "step 3/3  loss" in proc.stderr and "adapter shoal-demo/tiny-qwen2+lora/classroom" in proc.stderr


def test_a_student_finds_the_teacher_through_the_dht_via_a_peer_both_know(env, oss, model_dir, tmp_path):
    """No mDNS, and neither knows the other's address: both know only a third agent (as on
    routed subnets, where multicast does not pass). The teacher provides the model in the
    DHT; the student's pull looks it up, dials the teacher and pulls from it."""
    mirror(env, model_dir)
    env = {**env, "SHOAL_PEER_EXCHANGE": "0"}  # else the rendezvous may name the teacher first (pex)
    hub_env = agent_env(env, tmp_path, "rendezvous")
    hub_agent = AgentProcess(hub_env).start()
    rendezvous = json.loads(run_shoal(["status", "--json"], hub_env, check=True).stdout)["swarm"]["addrs"][0]
    t_env = agent_env(env, tmp_path, "teacher", SHOAL_SWARM_PEERS=rendezvous)
    run_shoal(["pull", MODEL_ID], t_env, check=True)
    run_shoal(["publish", MODEL_ID], t_env, check=True)
    key = run_shoal(["id"], t_env, check=True).stdout.strip()
    teacher = AgentProcess(t_env).start()
    s_env = offline(agent_env(env, tmp_path, "student", SHOAL_SWARM_PEERS=rendezvous, SHOAL_TRUSTED_PUBLISHERS=key))
    student = AgentProcess(s_env).start()
    try:
        wait_connected(s_env)
        wait_connected(t_env)
        teacher_id = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["peer_id"]
        assert teacher_id not in {p["id"] for p in json.loads(run_shoal(["peers", "--json"], s_env, check=True).stdout)}
        deadline = time.monotonic() + 60
        while True:  # the teacher's provider records go out once its routing table has the rendezvous
            proc = run_shoal(["pull", MODEL_ID, "--json"], s_env)
            # Not found yet (no provider record reached it) is what a retry is for; a pull
            # that broke (its DHT path once raised an AttributeError) is not.
            assert "internal error" not in proc.stderr, proc.stderr
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert proc.returncode == 0, proc.stderr
        assert set(pull_lines(proc.stdout)[-1]["fetched_by_source"]) == {"lan"}
        peers = {p["id"]: p for p in json.loads(run_shoal(["peers", "--json"], s_env, check=True).stdout)}
        # Reached by the student's lookup, or by the teacher's DHT traffic (its provider records).
        assert peers[teacher_id]["via"] in ("dht", "inbound") and peers[teacher_id]["bytes_down"] > 0
        assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    finally:
        for agent in (student, teacher, hub_agent):
            agent.stop()
