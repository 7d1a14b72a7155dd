"""Agents in their own network namespaces (root only, as in CI): on one bridge, students
find the teacher by mDNS alone (no bootstrap list, no DHT) and pull the model from it; on
two routed subnets, where multicast does not pass, a student finds the teacher through
the DHT by way of one agent it knows.

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
from conftest import MODEL_ID, REPO, TESTS, mirror, run_shoal, tree_digest, wait_for

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

LAB_NET = "10.77.0.0/16"


def lab_agent(lab: netns.Lab, host: netns.Host, env: dict):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)])
    # The guard lets the agent reach the lab's subnet and mDNS's group, nothing else.
    full["SHOAL_TEST_ALLOW_NET"] = f"{LAB_NET},224.0.0.251/32"
    full.update(SHOAL_SWARM="1", SHOAL_SWARM_HOST=host.ip, SHOAL_GATEWAY_PORT="0")
    full.setdefault("SHOAL_SWARM_SECRET", "lab-room")  # a swarm on a LAN address must have one
    return lab.popen(host, [sys.executable, "-m", "agent.cli", "agent"], env=full,
                     stdout=open(Path(env["SHOAL_CACHE_DIR"]).parent / f"{host.name}.log", "w"),
                     stderr=__import__("subprocess").STDOUT)


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


def peers_of(env: dict) -> list[dict]:
    return json.loads(run_shoal(["peers", "--json"], env, check=True).stdout)


def test_across_routed_subnets_a_student_finds_the_teacher_through_the_dht(env, oss, model_dir, tmp_path):
    mirror(env, model_dir)
    teacher_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "teacher"), "SHOAL_MDNS": "1", "SHOAL_DHT": "1"}
    run_shoal(["pull", MODEL_ID], teacher_env, check=True)
    key = run_shoal(["publish", MODEL_ID], teacher_env, check=True).stdout.split("SHOAL_TRUSTED_PUBLISHERS=")[1].strip()
    with netns.Lab(tag=f"shr{os.getpid() % 10000}", subnet="10.77.0", more_subnets=("10.77.1",)) as lab:
        # Room A: the teacher and a classmate's agent (found by each other over mDNS).
        # Room B: a student whose agent knows only the classmate's address.
        teacher_host, classmate_host = lab.add_host("teacher", segment=0), lab.add_host("classmate", segment=0)
        student_host = lab.add_host("student", segment=1)
        classmate_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "classmate"), "SHOAL_MDNS": "1", "SHOAL_DHT": "1"}
        lab_agent(lab, teacher_host, teacher_env)
        lab_agent(lab, classmate_host, classmate_env)
        for e in (teacher_env, classmate_env):
            wait_for(lambda: agent_up(e), 30, "the agents to start")
        wait_for(lambda: any(p["connected"] for p in peers_of(classmate_env)), 60, "mDNS in room A")
        classmate = json.loads(run_shoal(["status", "--json"], classmate_env, check=True).stdout)["swarm"]
        address = f"/ip4/{classmate_host.ip}/tcp/{classmate['addrs'][0].split('/tcp/')[1]}"
        student_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "student"), "SHOAL_MDNS": "1", "SHOAL_DHT": "1",
                       "SHOAL_SWARM_PEERS": address, "SHOAL_TRUSTED_PUBLISHERS": key, "SHOAL_RETRIES": "0"}
        lab_agent(lab, student_host, student_env)
        wait_for(lambda: agent_up(student_env), 30, "the student's agent to start")
        wait_for(lambda: any(p["connected"] for p in peers_of(student_env)), 60, "the student to reach the classmate")
        deadline = time.monotonic() + 90
        while True:  # the teacher's provider records go out once its DHT knows the classmate
            proc = run_shoal(["pull", MODEL_ID, "--json"], student_env)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert set(lines[-1]["fetched_by_source"]) == {"lan"}
        assert tree_digest(Path(student_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == \
            tree_digest(model_dir)
        peers = peers_of(student_env)
        teacher = [p for p in peers if (p["addr"] or "").startswith(f"/ip4/{teacher_host.ip}/")]
        assert teacher and teacher[0]["bytes_down"] > 0 and teacher[0]["via"] in ("dht", "inbound")
        assert not any(p["via"] == "mdns" for p in peers)  # multicast stayed in room A
    assert netns.leftover_namespaces(lab.tag) == []


def test_a_room_across_two_subnets_forms_from_the_join_code_and_takes_the_teachers_push(env, oss, model_dir,
                                                                                      tmp_path):
    """The teacher on one subnet, three members on the other, a router between that forwards
    no multicast: the members know only the teacher's address (as a join code gives it). The
    room forms (mDNS among the members, the teacher's address, peer exchange) and the
    teacher's push reaches every member, from the room alone (the mirror is out of reach)."""
    from agent.room import new_room, write_room_file, encode_code
    mirror(env, model_dir)
    teacher_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "teacher"), "SHOAL_MDNS": "1", "SHOAL_DHT": "1",
                   "SHOAL_SWARM_PORT": "7100"}
    run_shoal(["pull", MODEL_ID], teacher_env, check=True)
    key = run_shoal(["id"], teacher_env, check=True).stdout.strip()
    with netns.Lab(tag=f"shq{os.getpid() % 10000}", subnet="10.77.0", more_subnets=("10.77.1",)) as lab:
        teacher_host = lab.add_host("teacher", segment=0)
        # The join code a teacher's `shoal room create` prints: its secret, key and address.
        room = new_room("Lab 2", bytes.fromhex(key), [(teacher_host.ip, 7100)])
        assert encode_code(room)
        teacher_env["SHOAL_SWARM_SECRET"] = room.swarm_secret
        lab_agent(lab, teacher_host, teacher_env)
        members = []
        for name in ("m1", "m2", "m3"):
            config = tmp_path / f"{name}-config"
            config.mkdir()
            write_room_file(config / "room.toml", room, teacher=False)  # what `shoal room join CODE` writes
            m_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_CONFIG": str(config / "config.toml"),
                     "SHOAL_MDNS": "1", "SHOAL_DHT": "1", "SHOAL_RETRIES": "0"}
            m_env.pop("SHOAL_SWARM_SECRET", None)
            lab_agent(lab, lab.add_host(name, segment=1), {**m_env, "SHOAL_SWARM_SECRET": room.swarm_secret})
            members.append(m_env)
        for e in (teacher_env, *members):
            wait_for(lambda: agent_up(e), 30, "the agents to start")
        wait_for(lambda: sum(p["connected"] for p in peers_of(teacher_env)) >= 3, 60, "the room to form")
        oss.faults.clear_log()
        run_shoal(["room", "push", MODEL_ID], teacher_env, check=True)
        for m_env in members:
            wait_for(lambda: json.loads(run_shoal(["room", "assignments", "--json"], m_env, check=True).stdout)[
                "items"].get(f"{MODEL_ID}@master", {}).get("state") == "complete", 90, "the push to reach the member")
            row = json.loads(run_shoal(["ls", "--json"], m_env, check=True).stdout)[0]
            assert row["pinned"] and tree_digest(Path(row["dir"])) == tree_digest(model_dir)
        view = json.loads(run_shoal(["room", "status", "--json"], teacher_env, check=True).stdout)
        assert [a["complete"] for a in view["assignments"]] == [3] and view["stuck"] == []
        # How each was found: the view is live, and on a busy machine a member can show in it
        # (from the room's reports) a moment before the teacher's own connection to it does.
        def found_all():
            now = json.loads(run_shoal(["room", "status", "--json"], teacher_env, check=True).stdout)
            return now if all(m["via"] for m in now["members"]) else None
        view = wait_for(found_all, 30, "the teacher to say how each member was found")
        assert len(view["members"]) >= 3
        assert oss.faults.data_requests() == []
    assert netns.leftover_namespaces(lab.tag) == []


def test_across_three_subnets_each_chunk_enters_a_room_once(env, oss, model_dir, tmp_path):
    """A campus in small: the teacher's machine on one subnet, three students on each of two
    others, a router between that forwards no multicast. The students pull at once. Each
    agent's place is its subnet (no setting): every chunk crosses the router into a room
    about once (one student fetches it from the nearest room that has it, the room trades
    it), not once per student as it did when every peer counted as beside us."""
    from concurrent.futures import ThreadPoolExecutor
    from agent.room import new_room, write_room_file
    mirror(env, model_dir)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    teacher_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "teacher"), "SHOAL_MDNS": "1", "SHOAL_DHT": "1",
                   "SHOAL_SWARM_PORT": "7100"}
    run_shoal(["pull", MODEL_ID], teacher_env, check=True)
    run_shoal(["publish", MODEL_ID], teacher_env, check=True)  # signed: the room trusts its teacher's key
    key = run_shoal(["id"], teacher_env, check=True).stdout.strip()
    with netns.Lab(tag=f"shc{os.getpid() % 10000}", subnet="10.77.0", more_subnets=("10.77.1", "10.77.2")) as lab:
        teacher_host = lab.add_host("teacher", segment=0)
        room = new_room("Campus", bytes.fromhex(key), [(teacher_host.ip, 7100)])
        teacher_env["SHOAL_SWARM_SECRET"] = room.swarm_secret
        lab_agent(lab, teacher_host, teacher_env)
        students = []
        for segment in (1, 2):
            for n in range(3):
                name = f"s{segment}{n}"
                config = tmp_path / f"{name}-config"
                config.mkdir()
                write_room_file(config / "room.toml", room, teacher=False)
                # Each follows one student of the other room (a campus's bound on whom a pull
                # follows, at its smallest), the two of its own, and the teacher.
                s_env = {**env, "SHOAL_CACHE_DIR": str(tmp_path / name), "SHOAL_CONFIG": str(config / "config.toml"),
                         "SHOAL_MDNS": "1", "SHOAL_DHT": "1", "SHOAL_RETRIES": "0", "SHOAL_FOLLOW_PER_PLACE": "1"}
                s_env.pop("SHOAL_SWARM_SECRET", None)
                lab_agent(lab, lab.add_host(name, segment=segment), {**s_env, "SHOAL_SWARM_SECRET": room.swarm_secret})
                students.append((segment, s_env))
        for e in (teacher_env, *(s for _, s in students)):
            wait_for(lambda: agent_up(e), 30, "the agents to start")

        def placed(s_env):  # everyone connected, with its place known from its hello
            peers = [p for p in peers_of(s_env) if p["connected"] and p["location"]]
            return len(peers) >= 6 and peers
        for segment, s_env in students:
            peers = wait_for(lambda: placed(s_env), 90, "the campus to form")
            assert {p["location"] for p in peers} == {"10.77.0.0/24", "10.77.1.0/24", "10.77.2.0/24"}
        oss.faults.clear_log()
        before = {segment: lab.into_subnet_bytes(segment) for segment in (1, 2)}
        with ThreadPoolExecutor(len(students)) as pool:
            pulls = list(pool.map(lambda s: run_shoal(["pull", MODEL_ID, "--json"], s[1], timeout=120), students))
        entered = {segment: (lab.into_subnet_bytes(segment) - before[segment]) / size for segment in (1, 2)}
        print(f"into each student subnet, in model sizes: {entered}")
        for proc in pulls:
            assert proc.returncode == 0, proc.stderr[-2000:]
        for _, s_env in students:
            assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == \
                tree_digest(model_dir)
        # Each room took the model through the router about once (chunks, HAVE frames and
        # TCP/IP headers); three students each fetching their own copies across it would
        # be ~2-3x.
        assert all(f <= 1.35 for f in entered.values()), f"bytes into each student subnet, in model sizes: {entered}"
        assert oss.faults.data_requests() == []
        # HAVE streams each room's students were asked for: two per student from its room
        # mates and one from each student of the other room (following all three there: 15).
        subscribed = {segment: sum(json.loads(run_shoal(["status", "--json"], s, check=True).stdout)
                                   ["swarm"]["asked"].get("sub", 0) for seg, s in students if seg == segment)
                      for segment in (1, 2)}
        print(f"HAVE streams each room's students were asked for: {subscribed}")
        assert all(n <= 12 for n in subscribed.values()), subscribed
    assert netns.leftover_namespaces(lab.tag) == []
