"""Agents in their own network namespaces on a bridge (root only, as in CI): students find
the teacher by mDNS alone (no bootstrap list, no DHT) and pull the model from it.

Multicast and the lab subnet exist only inside namespaces this test makes and deletes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from agent.testing import netns
from conftest import MODEL_ID, REPO, TESTS, mirror, run_shoal, tree_digest

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

LAB_NET = "10.77.0.0/24"


def lab_agent(lab: netns.Lab, host: netns.Host, env: dict):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)])
    # The guard lets the agent reach the lab's subnet and mDNS's group, nothing else.
    full["SHOAL_TEST_ALLOW_NET"] = f"{LAB_NET},224.0.0.251/32"
    full.update(SHOAL_SWARM="1", SHOAL_SWARM_HOST=host.ip, SHOAL_GATEWAY_PORT="0")
    return lab.popen(host, [sys.executable, "-m", "agent.cli", "agent"], env=full,
                     stdout=open(Path(env["SHOAL_CACHE_DIR"]).parent / f"{host.name}.log", "w"),
                     stderr=__import__("subprocess").STDOUT)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def agent_up(env: dict) -> bool:
    return (Path(env["SHOAL_CACHE_DIR"]) / "agent.json").exists()


def test_students_find_the_teacher_by_mdns_alone_and_pull_from_it(env, oss, model_dir, tmp_path):
    mirror(env, model_dir)
    teacher_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "teacher"), "SHOAL_MDNS": "1", "SHOAL_DHT": "0"}
    run_shoal(["pull", MODEL_ID], teacher_env, check=True)
    key = run_shoal(["publish", MODEL_ID], teacher_env, check=True).stdout.split("SHOAL_TRUSTED_PUBLISHERS=")[1].strip()
    with netns.Lab(tag=f"sht{os.getpid() % 10000}") as lab:
        teacher_host = lab.add_host("teacher")
        lab_agent(lab, teacher_host, teacher_env)
        students = []
        for name in ("s1", "s2"):
            # Offline: the mirror and the hub are on loopback outside the lab, out of reach.
            s_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_MDNS": "1", "SHOAL_DHT": "0",
                     "SHOAL_TRUSTED_PUBLISHERS": key, "SHOAL_RETRIES": "0"}
            lab_agent(lab, lab.add_host(name), s_env)
            students.append(s_env)
        for e in (teacher_env, *students):
            wait_for(lambda: agent_up(e), 30, "the agents to start")
        oss.faults.clear_log()
        for s_env in students:
            def teacher_seen():
                peers = json.loads(run_shoal(["peers", "--json"], s_env, check=True).stdout)
                return [p for p in peers if p["connected"] and (p["addr"] or "").startswith(f"/ip4/{teacher_host.ip}/")]
            wait_for(teacher_seen, 60, "mDNS to find the teacher")
            out = run_shoal(["pull", MODEL_ID, "--json"], s_env, check=True)
            lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            assert lines[0]["plan"].startswith("LAN peer manifest, signed by")
            assert set(lines[-1]["fetched_by_source"]) == {"lan"}
            assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == \
                tree_digest(model_dir)
        assert oss.faults.data_requests() == []
    assert netns.leftover_namespaces(lab.tag) == []
