"""The LAN swarm with real agent processes on loopback: a teacher's agent seeds a model it
published; students' agents, told only the teacher's address and key, pull it from the LAN
with the mirror and the origin out of reach; an untrusted manifest is refused clearly."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from conftest import MODEL_ID, AgentProcess, mirror, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(240)


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def agent_env(env: dict, tmp_path: Path, name: str, **extra) -> dict:
    return {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_GATEWAY_PORT": "0", "SHOAL_SWARM": "1",
            "SHOAL_SWARM_HOST": "127.0.0.1", **extra}


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
            s_env = offline(agent_env(env, tmp_path, name, SHOAL_SWARM_PEERS=teacher["addr"],
                                      SHOAL_TRUSTED_PUBLISHERS=teacher["key"]))
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
