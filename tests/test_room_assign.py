"""The teacher's room: `shoal room push` assigns models and datasets to every machine of
the room; members' agents verify the teacher's signature, pull in the background from the
room, pin, catch up after being off, unpin what is retracted, and refuse what the teacher
did not sign; the teacher sees every member's progress. Real agents on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.testing.tiny_llm import make_chat_dataset
from conftest import MODEL_ID, AgentProcess, mirror, run_shoal, tree_digest, wait_for
from test_swarm import agent_env, offline, wait_connected

pytestmark = pytest.mark.timeout(300)

DATASET = "lab/lesson-data"


def assignments(env: dict) -> dict:
    return json.loads(run_shoal(["room", "assignments", "--json"], env, check=True).stdout)


def states(env: dict) -> dict[str, str]:
    return {ref: s["state"] for ref, s in assignments(env)["items"].items()}


@pytest.fixture
def room(env, oss, hub, model_dir, tmp_path):
    """A teacher's agent holding the model (from the mirror) and a dataset (from the hub)."""
    mirror(env, model_dir)
    hub.add_dataset(DATASET, make_chat_dataset(tmp_path / "lesson-data", rows=300))
    t_env = agent_env(env, tmp_path, "teacher")
    run_shoal(["pull", MODEL_ID], t_env, check=True)
    run_shoal(["pull", "--dataset", DATASET], t_env, check=True)
    key = run_shoal(["id"], t_env, check=True).stdout.strip()
    teacher = AgentProcess(t_env).start()
    addr = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["addrs"][0]
    agents = [teacher]

    def student(name: str, **extra) -> AgentProcess:
        s_env = offline(agent_env(env, tmp_path, name, SHOAL_SWARM_PEERS=addr, SHOAL_TRUSTED_PUBLISHERS=key,
                                  SHOAL_DHT="0", **extra))
        agent = AgentProcess(s_env).start()
        agents.append(agent)
        return agent
    yield {"teacher": teacher, "key": key, "student": student, "env": t_env}
    for agent in agents:
        if agent.proc.poll() is None:
            agent.stop()


def test_a_push_reaches_every_member_pinned_and_a_late_one_catches_up(room, model_dir, hub, tmp_path):
    s1, s2 = room["student"]("s1"), room["student"]("s2")
    for s in (s1, s2):
        wait_connected(s.env)
    hub.faults.clear_log()
    pushed = json.loads(run_shoal(["room", "push", MODEL_ID, "--dataset", DATASET, "--json"], room["env"],
                                  check=True).stdout)
    assert {i["ref"] for i in pushed["items"]} == {f"{MODEL_ID}@master", f"datasets/{DATASET}@master"}
    want = {f"{MODEL_ID}@master": "complete", f"datasets/{DATASET}@master": "complete"}
    for s in (s1, s2):
        wait_for(lambda: states(s.env) == want, 60, f"{s.cache.name} to hold the assignments")
        rows = {r["model"]: r for r in json.loads(run_shoal(["ls", "--json"], s.env, check=True).stdout)}
        assert rows[MODEL_ID]["pinned"] and rows[f"datasets/{DATASET}"]["pinned"]
        assert tree_digest(Path(rows[MODEL_ID]["dir"])) == tree_digest(model_dir)
    assert hub.faults.data_requests() == []  # all from the room: the students are offline
    # The teacher sees the room.
    view = wait_for(lambda: (v := json.loads(run_shoal(["room", "status", "--json"], room["env"], check=True).stdout))
                    and all(a["complete"] == 2 for a in v["assignments"]) and v, 30, "the room at 100 %")
    assert {m["online"] for m in view["members"]} == {True} and view["stuck"] == []
    assert all(a["percent"] == 100.0 for a in view["assignments"]) and view["bound"]["done"] == 1.0
    assert set(view["assignments"][0]["by_source"]) == {"lan"}
    from tui.screens.room import render_assignments, render_room_status  # the TUI's room screen, live
    shown = render_room_status(view)
    assert f"{MODEL_ID}@master: 2/2 complete, 100%" in shown and shown.count("complete 100%") == 2 * 2
    assert f"{MODEL_ID}@master: complete 100%" in render_assignments(assignments(s1.env))
    # A machine that was off when the teacher pushed catches up from anyone in the room.
    s3 = room["student"]("s3")
    wait_for(lambda: states(s3.env) == want, 60, "the late member to catch up")
    # Retracting unpins, and the cache may evict it again.
    run_shoal(["room", "retract", f"datasets/{DATASET}"], room["env"], check=True)
    for s in (s1, s2, s3):
        wait_for(lambda: not {r["model"]: r for r in json.loads(run_shoal(["ls", "--json"], s.env, check=True).stdout)}[
            f"datasets/{DATASET}"]["pinned"], 30, "the retracted dataset to be unpinned")
        assert list(assignments(s.env)["items"]) == [f"{MODEL_ID}@master"]


def test_a_record_the_teacher_did_not_sign_is_refused_and_a_member_may_refuse(room, tmp_path):
    s1 = room["student"]("s1")
    wait_connected(s1.env)
    # Another machine in the swarm (it has the code) pushes: its key is not the teacher's.
    rogue_env = agent_env(room["env"] | {}, tmp_path, "rogue", SHOAL_SWARM_PEERS=json.loads(
        run_shoal(["status", "--json"], room["env"], check=True).stdout)["swarm"]["addrs"][0], SHOAL_DHT="0")
    run_shoal(["pull", MODEL_ID], rogue_env, check=True)
    rogue = AgentProcess(rogue_env).start()
    try:
        wait_connected(rogue_env)
        run_shoal(["room", "push", MODEL_ID], rogue_env, check=True)
        wait_for(lambda: assignments(s1.env)["refusals"], 30, "the rogue record to be refused")
        held = assignments(s1.env)
        assert held["record"] is None and "not trust" in held["refusals"][0]
    finally:
        rogue.stop()
    assert "refused an assignment record" in s1.log()
    # A member refuses one item: it is not pulled there; the other member's agent pulls it.
    run_shoal(["room", "refuse", MODEL_ID], s1.env, check=True)
    run_shoal(["room", "push", MODEL_ID], room["env"], check=True)
    wait_for(lambda: states(s1.env) == {f"{MODEL_ID}@master": "refused"}, 30, "the refusal to stand")
    assert json.loads(run_shoal(["ls", "--json"], s1.env, check=True).stdout) == []


# ------------------------------------------------------------------ the record, pure

def _identity(tmp_path, name):
    from agent.swarm.trust import Identity
    return Identity.load_or_create(tmp_path / f"{name}.key")


def test_only_the_teachers_newest_record_for_this_room_is_taken(tmp_path):
    from agent.assign import record as rec
    from agent.manifest import ModelRef
    teacher, stranger = _identity(tmp_path, "teacher"), _identity(tmp_path, "stranger")
    room, other_room = rec.room_id("room-a"), rec.room_id("room-b")
    trusted = frozenset({teacher.publisher_id})
    item = rec.make_item(ModelRef.parse("lab/m"), "model", at="07:30")
    first = rec.sign(rec.Record(room, 10, 1000, (item,)), teacher)
    newest: dict[str, int] = {}
    taken = rec.accept(first, room=room, trusted=trusted, newest=newest)
    assert taken.record.items == (item,) and taken.publisher == teacher.publisher_id
    newest[taken.publisher] = taken.record.seq
    refusals = {
        "forged": rec.sign(rec.Record(room, 11, 1000, (item,)), stranger),  # another key
        "replayed": first,  # an old record again
        "older": rec.sign(rec.Record(room, 9, 1000, ()), teacher),
        "other room": rec.sign(rec.Record(other_room, 12, 1000, ()), teacher),
    }
    for why, envelope in refusals.items():
        with pytest.raises(rec.AssignmentRefused):
            rec.accept(envelope, room=room, trusted=trusted, newest=newest)
    tampered = bytearray(rec.sign(rec.Record(room, 13, 1000, (item,)), teacher))
    tampered[20] ^= 1
    with pytest.raises(rec.AssignmentRefused, match="forged or damaged|malformed|msgpack"):
        rec.accept(bytes(tampered), room=room, trusted=trusted, newest=newest)
    assert rec.accept(rec.sign(rec.Record(room, 11, 1000, ()), teacher), room=room, trusted=trusted,
                      newest=newest).record.items == ()  # a newer one, retracting everything
    assert rec.next_seq(5, now=0) == 6 and rec.next_seq(5, now=100) == 100_000


def test_an_item_starts_at_the_next_such_time_after_the_push():
    import time as clock
    from agent.assign.record import start_at
    evening = clock.mktime((2026, 12, 7, 20, 0, 0, 0, 0, -1))
    assert start_at("07:00", evening) == clock.mktime((2026, 12, 8, 7, 0, 0, 0, 0, -1))
    assert start_at("21:30", evening) == clock.mktime((2026, 12, 7, 21, 30, 0, 0, 0, -1))


@pytest.mark.parametrize("kind,ref,message", [
    ("model", "datasets/lab/d", "dataset"), ("dataset", "lab/m", "not a dataset"),
    ("adapter", "lab/m", "not an adapter"), ("song", "lab/m", "not 'song'")])
def test_items_are_what_they_say(kind, ref, message):
    from agent.assign import record as rec
    from agent.errors import UsageError
    from agent.manifest import ModelRef
    with pytest.raises(UsageError, match=message):
        rec.make_item(ModelRef.parse(ref), kind)
    with pytest.raises(UsageError, match="HH:MM"):
        rec.make_item(ModelRef.parse("lab/m"), "model", at="25:00")


# ------------------------------------------------------------------ offline bundles

def test_a_bundle_carries_the_lesson_to_a_machine_with_no_network_and_a_flipped_byte_is_named(room, model_dir,
                                                                                              hub, oss, tmp_path):
    import shutil
    run_shoal(["room", "push", MODEL_ID, "--dataset", DATASET], room["env"], check=True)
    stick = tmp_path / "stick"
    out = json.loads(run_shoal(["bundle", "export", MODEL_ID, str(stick), "--dataset", DATASET, "--json"],
                               room["env"], check=True).stdout)
    assert out["assignment"] and {i["ref"] for i in out["items"]} == {f"{MODEL_ID}@master",
                                                                     f"datasets/{DATASET}@master"}
    # A machine of the room with no network to anyone: the bundle alone.
    hub.faults.clear_log()
    oss.faults.clear_log()
    lone_env = offline(agent_env(room["env"] | {}, tmp_path, "lone", SHOAL_TRUSTED_PUBLISHERS=room["key"],
                                 SHOAL_SWARM_PEERS="", SHOAL_DHT="0"))
    lone = AgentProcess(lone_env).start()
    try:
        done = json.loads(run_shoal(["bundle", "import", str(stick), "--json"], lone_env, check=True).stdout)
        assert all(i["pinned"] for i in done["items"])
        rows = {r["model"]: r for r in json.loads(run_shoal(["ls", "--json"], lone_env, check=True).stdout)}
        assert tree_digest(Path(rows[MODEL_ID]["dir"])) == tree_digest(model_dir)
        assert rows[MODEL_ID]["state"] == "complete" and rows[MODEL_ID]["pinned"]
        wait_for(lambda: set(states(lone_env).values()) == {"complete"}, 20, "the bundle's assignment to stand")
    finally:
        lone.stop()
    assert hub.faults.log() == [] and oss.faults.log() == []
    # One flipped byte in a copy of the stick: refused, naming the file and the chunk; nothing kept.
    bad = tmp_path / "bad-stick"
    shutil.copytree(stick, bad)
    shard = sorted((bad / "files" / MODEL_ID / "master").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[70_000] ^= 0x01  # in the second 64 KiB chunk
    shard.write_bytes(bytes(data))
    fresh = offline(agent_env(room["env"] | {}, tmp_path, "fresh", SHOAL_TRUSTED_PUBLISHERS=room["key"]))
    proc = run_shoal(["bundle", "import", str(bad)], fresh)  # no agent: the same checks in the command itself
    assert proc.returncode == 5, proc.stderr
    assert f"{shard.name} chunk 1 (bytes 65536-131071) does not match the signed manifest" in proc.stderr
    assert json.loads(run_shoal(["ls", "--json"], fresh, check=True).stdout) == []
    # A bundle signed by a key this machine does not trust is refused too.
    other = offline(agent_env(room["env"] | {}, tmp_path, "other", SHOAL_TRUSTED_PUBLISHERS="ab" * 32))
    proc = run_shoal(["bundle", "import", str(stick)], other)
    assert proc.returncode == 5 and "not trust" in proc.stderr, proc.stderr


def test_a_persons_own_pull_goes_first(env, room, tmp_path):
    """The teacher's uplink is capped: the assignment takes a while. The person at the
    machine pulls something else meanwhile: the background pull pauses (its chunks in
    flight finish, it starts no new one) and lets it through, then resumes."""
    run_shoal(["publish", "--dataset", DATASET], room["env"], check=True)
    s1 = room["student"]("s1")
    wait_connected(s1.env)
    run_shoal(["config", "set", "upload_rate", "250KB"], room["env"], check=True)
    run_shoal(["room", "push", MODEL_ID], room["env"], check=True)
    wait_for(lambda: states(s1.env).get(f"{MODEL_ID}@master") == "pulling", 30, "the assignment to start")
    proc = run_shoal(["pull", "--dataset", DATASET, "--json"], s1.env)
    assert proc.returncode == 0, proc.stderr
    held = assignments(s1.env)["items"][f"{MODEL_ID}@master"]
    assert held["state"] != "complete", held  # the person's pull finished first
    run_shoal(["config", "set", "upload_rate", "0"], room["env"], check=True)
    wait_for(lambda: states(s1.env).get(f"{MODEL_ID}@master") == "complete", 60, "the assignment to resume and end")
    log = s1.log()
    assert "paused: a person's pull on this machine goes first" in log and "resumed" in log
    assert log.index("paused") < log.index(f"pull datasets/{DATASET}@master finished: ok") < log.index("resumed")


def test_the_room_keeps_copies_when_members_evict(room, model_dir, tmp_path):
    """keep_copies = 2: a member whose person unpinned the assigned model and needs room may
    evict it while two other machines hold it whole, not when that would leave fewer."""
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    quota = {"SHOAL_QUOTA": str(size + 10_000), "SHOAL_QUOTA_HIGH": "1.0", "SHOAL_QUOTA_LOW": "0.5"}
    run_shoal(["publish", "--dataset", DATASET], room["env"], check=True)
    s1, s2 = room["student"]("s1", **quota), room["student"]("s2", **quota)
    for s in (s1, s2):
        wait_connected(s.env)
    run_shoal(["room", "push", MODEL_ID], room["env"], check=True)
    for s in (s1, s2):
        wait_for(lambda: states(s.env) == {f"{MODEL_ID}@master": "complete"}, 60, "the assignment")
    wait_for(lambda: not assignments(s1.env)["keeps"], 20, "s1 to know the teacher and s2 hold it too")
    run_shoal(["unpin", MODEL_ID], s1.env, check=True)
    run_shoal(["pull", "--dataset", DATASET], s1.env, check=True)  # needs room: evicts the model (2 others hold it)
    assert MODEL_ID not in {r["model"] for r in json.loads(run_shoal(["ls", "--json"], s1.env, check=True).stdout)}
    wait_for(lambda: assignments(s2.env)["keeps"], 20, "s2 to learn the room is down to two copies")
    du = json.loads(run_shoal(["du", "--json"], s2.env, check=True).stdout)
    assert "kept for the room" in next(m for m in du["models"] if m["model"] == MODEL_ID)["room"]
    run_shoal(["unpin", MODEL_ID], s2.env, check=True)
    proc = run_shoal(["pull", "--dataset", DATASET], s2.env)
    assert proc.returncode == 9, proc.stderr  # the quota: the model may not go
    assert MODEL_ID in {r["model"] for r in json.loads(run_shoal(["ls", "--json"], s2.env, check=True).stdout)}
    assert "kept for the room" in run_shoal(["du"], s2.env, check=True).stdout
