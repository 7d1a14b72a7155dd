"""Rooms: a teacher makes one with ``shoal room create``, students join with the code
alone. The join code's checks, then a teacher and students in network namespaces (root,
as in CI): one student's running agent reloads into the room, one starts in it, both pull
the teacher's published model entirely from the LAN; a machine holding another room's
code is refused by the teacher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.room import Room, decode_code, encode_code, new_room
from agent.testing import netns
from conftest import MODEL_ID, REPO, TESTS, mirror, run_shoal, scan_terminal_qr, tree_digest, wait_for

pytestmark = pytest.mark.timeout(240)
LAB_NET = "10.78.0.0/16"
KEY = bytes(range(32))


def test_a_join_code_carries_the_room_and_refuses_typos():
    room = new_room("Lab 3", KEY, [("10.0.0.5", 7100), ("192.168.1.20", 7200)])
    code = encode_code(room)
    assert code.startswith("SHOAL-") and decode_code(code) == room
    # Read as a person types it: lower case, spaces for dashes, 0 for O, 1 for I.
    typed = code.lower().replace("-", " ").replace("o", "0").replace("i", "1")
    assert decode_code(typed) == room
    flipped = code[:20] + ("A" if code[20] != "A" else "B") + code[21:]
    with pytest.raises(UsageError, match="typo"):
        decode_code(flipped)
    # Every one-character typo is refused, the last character too (its spare bits included).
    letters = [i for i, c in enumerate(code) if i >= len("SHOAL-") and c != "-"]
    for i in letters:
        for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567":
            if c != code[i]:
                with pytest.raises(UsageError, match="typo|malformed|short"):
                    decode_code(code[:i] + c + code[i + 1:])
    with pytest.raises(UsageError, match="too short|missing"):
        decode_code(code[:30])
    with pytest.raises(UsageError, match="typo"):
        decode_code(code[:-4] + code[-3:])  # a character left out
    with pytest.raises(UsageError, match="not a shoal join code"):
        decode_code("SHOAL-!!!!!")
    other = new_room("Lab 3", KEY, [("10.0.0.5", 7100)])
    assert other.secret != room.secret and other.swarm_secret != room.swarm_secret
    with pytest.raises(UsageError):
        encode_code(Room("x" * 41, room.secret, KEY, room.addrs))


def test_room_commands_write_a_private_room_file_and_never_print_the_secret_unasked(tmp_path):
    env = {"SHOAL_CONFIG": str(tmp_path / "config.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    created = run_shoal(["room", "create", "Lab 3", "--addr", "10.0.0.5"], env, check=True)
    code = re.search(r"join code: (SHOAL-[A-Z2-7-]+)", created.stdout).group(1)
    assert scan_terminal_qr(created.stdout) == [code]  # a phone scanning the teacher's terminal reads the code
    room_file = tmp_path / "room.toml"
    assert room_file.stat().st_mode & 0o077 == 0
    shown = run_shoal(["room", "show"], env, check=True).stdout
    assert "Lab 3" in shown and code not in shown
    assert code in run_shoal(["room", "show", "--code"], env, check=True).stdout
    config = run_shoal(["config", "show"], env, check=True).stdout
    assert decode_code(code).swarm_secret not in config and "swarm" in config
    student = {"SHOAL_CONFIG": str(tmp_path / "s" / "config.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "s" / "cache")}
    bad = run_shoal(["room", "join", code[:-1] + ("A" if not code.endswith("A") else "B")], student)
    assert bad.returncode == 2 and "typo" in bad.stderr and not (tmp_path / "s" / "room.toml").exists()
    run_shoal(["room", "join", code], student, check=True)
    assert "10.0.0.5" in (tmp_path / "s" / "room.toml").read_text()
    assert "left the room" in run_shoal(["room", "leave"], student, check=True).stdout
    assert not (tmp_path / "s" / "room.toml").exists()


def room_agent(lab: netns.Lab, host: netns.Host, env: dict, log: Path):
    """An agent with no swarm setting of its own: all it knows of the room is its room file."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)])
    full["SHOAL_TEST_ALLOW_NET"] = f"{LAB_NET},224.0.0.251/32"
    # ModelScope stays on, as installed, but out of reach: an offline classroom.
    full.update(SHOAL_GATEWAY_PORT="0", MODELSCOPE_ENDPOINT="http://127.0.0.1:9", SHOAL_RETRIES="0")
    # The machine's own address to listen on (the tests' loopback guard refuses 0.0.0.0).
    full["SHOAL_SWARM_HOST"] = host.ip
    return lab.popen(host, [sys.executable, "-m", "agent.cli", "agent"], env=full,
                     stdout=open(log, "w"), stderr=subprocess.STDOUT)


def status(env) -> dict:
    proc = run_shoal(["status", "--json"], env)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_students_join_with_the_code_alone_and_pull_from_the_teacher(env, oss, model_dir, tmp_path):
    mirror(env, model_dir)
    teacher = {**env, "SHOAL_CONFIG": str(tmp_path / "teacher" / "config.toml"),
               "SHOAL_CACHE_DIR": str(tmp_path / "teacher" / "cache")}
    run_shoal(["pull", MODEL_ID], teacher, check=True)
    run_shoal(["publish", MODEL_ID], teacher, check=True)
    with netns.Lab(tag=f"shr{os.getpid() % 10000}", subnet="10.78.0") as lab:
        teacher_host = lab.add_host("teacher")
        created = run_shoal(["room", "create", "Lab 3", "--addr", teacher_host.ip], teacher, check=True)
        code = re.search(r"join code: (SHOAL-[A-Z2-7-]+)", created.stdout).group(1)
        teacher_env = {"SHOAL_CONFIG": teacher["SHOAL_CONFIG"], "SHOAL_CACHE_DIR": teacher["SHOAL_CACHE_DIR"]}
        room_agent(lab, teacher_host, teacher_env, tmp_path / "teacher.log")
        wait_for(lambda: status(teacher_env).get("swarm"), 30, "the teacher's agent in its room")

        students = []
        for name in ("s1", "s2"):
            s_env = {"SHOAL_CONFIG": str(tmp_path / name / "config.toml"),
                     "SHOAL_CACHE_DIR": str(tmp_path / name / "cache")}
            host = lab.add_host(name)
            if name == "s1":  # running before it joins: `room join` reloads it into the room
                proc = room_agent(lab, host, s_env, tmp_path / f"{name}.log")
                pid = wait_for(lambda: status(s_env).get("pid"), 30, "s1's agent")
                assert status(s_env)["swarm"] is None
                joined = run_shoal(["room", "join", code], s_env, check=True)
                assert "reloaded" in joined.stdout, joined.stdout
                wait_for(lambda: status(s_env).get("swarm"), 30, "s1's agent to reload into the room")
                assert status(s_env)["pid"] == pid == proc.pid  # the same process, settings re-read
            else:  # joins first, then starts
                run_shoal(["room", "join", code], s_env, check=True)
                room_agent(lab, host, s_env, tmp_path / f"{name}.log")
                wait_for(lambda: status(s_env).get("swarm"), 30, "s2's agent, in the room from its start")
            students.append(s_env)
        for s_env in students:
            def teacher_connected():
                peers = json.loads(run_shoal(["peers", "--json"], s_env, check=True).stdout)
                return any(p["connected"] and teacher_host.ip in (p["addr"] or "") for p in peers)
            wait_for(teacher_connected, 60, "a student to reach the teacher")
            oss.faults.clear_log()
            out = run_shoal(["pull", MODEL_ID, "--json"], s_env, check=True)
            lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            assert lines[0]["plan"].startswith("LAN peer manifest, signed by")
            assert set(lines[-1]["fetched_by_source"]) == {"lan"}
            assert oss.faults.data_requests() == []  # the outside link carried nothing
            assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == \
                tree_digest(model_dir)

        # A machine given another room's code (same teacher address, another secret) is
        # refused at the handshake, and says why.
        other = encode_code(new_room("Lab 4", bytes(32), [(teacher_host.ip, 7100)]))
        stranger = {"SHOAL_CONFIG": str(tmp_path / "x" / "config.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "x" / "cache")}
        run_shoal(["room", "join", other], stranger, check=True)
        room_agent(lab, lab.add_host("x"), stranger, tmp_path / "x.log")
        wait_for(lambda: status(stranger).get("swarm"), 30, "the stranger's agent")

        def refused():
            peers = json.loads(run_shoal(["peers", "--json"], stranger, check=True).stdout or "[]")
            return [p for p in peers if not p["connected"] and p.get("error")]
        [peer] = wait_for(refused, 60, "the stranger's dial to be refused")
        assert "another swarm" in peer["error"] or "SWARM_SECRET" in peer["error"], peer
        proc = run_shoal(["pull", MODEL_ID], stranger)
        assert proc.returncode != 0
