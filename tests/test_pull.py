"""`shoal pull` end to end: real CLI processes, the real oss2 and modelscope clients
against the local OSS and hub servers, real files. Each test asserts what a user would
check: the files hash like the origin's, where the bytes came from, the exit code and
the message."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import CHUNK, MODEL_ID, mirror, popen_shoal, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(180)


def model_path(env, revision="master") -> Path:
    return Path(env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / revision


def shard(model_dir: Path, n: int) -> str:
    return sorted(p.name for p in model_dir.glob("*.safetensors"))[n]


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_pull_from_the_mirror_takes_every_chunk_from_oss(env, hub, oss, model_dir):
    mirror(env, model_dir)
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    assert tree_digest(model_path(env)) == tree_digest(model_dir)
    done = events(proc)[-1]
    assert done["event"] == "done" and set(done["fetched_by_source"]) == {"oss"}
    assert hub.faults.data_requests() == []  # the origin served no byte
    assert not list(model_path(env).rglob("*.partial"))
    # A second pull has nothing to fetch.
    again = events(run_shoal(["pull", MODEL_ID, "--json"], env, check=True))[-1]
    assert again["chunks_fetched"] == 0 and again["manifest_id"] == done["manifest_id"]
    listing = run_shoal(["ls"], env, check=True).stdout
    assert MODEL_ID in listing and "100.0%" in listing and "complete" in listing


def test_pull_without_a_mirror_proves_files_by_the_origin_sha256(env, hub, oss, model_dir):
    del env["SHOAL_OSS_BUCKET"]
    proc = run_shoal(["pull", f"{MODEL_ID}@master", "--json"], env, check=True)
    plan, done = events(proc)[0], events(proc)[-1]
    assert plan["plan"] == "ModelScope listing" and not plan["trusted"]
    assert set(done["fetched_by_source"]) == {"modelscope"}
    assert tree_digest(model_path(env)) == tree_digest(model_dir)
    assert run_shoal(["verify", MODEL_ID], env, check=True).stdout.count("all files match") == 1


def test_human_progress_says_where_bytes_come_from(env, hub, oss, model_dir):
    mirror(env, model_dir, only={"config.json"})
    proc = run_shoal(["pull", MODEL_ID], env, check=True)
    assert "OSS mirror manifest" in proc.stderr
    assert "from ModelScope" in proc.stderr or "ModelScope" in proc.stderr.split("done:")[1]
    assert "verified" in proc.stderr


def test_a_corrupt_chunk_from_the_mirror_is_refetched_from_modelscope_and_never_written(env, hub, oss, model_dir):
    mirror(env, model_dir)
    target = shard(model_dir, 0)
    oss.faults.add(Fault("corrupt", match=target, times=1))
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    troubles = [e for e in events(proc) if e["event"] == "trouble"]
    assert any("does not match the manifest" in t["message"] and target in t["message"] for t in troubles)
    hub_ranges = hub.faults.data_requests(match=target)
    assert len(hub_ranges) == 1  # exactly the corrupt chunk, from the origin
    assert tree_digest(model_path(env)) == tree_digest(model_dir)
    assert events(proc)[-1]["fetched_by_source"]["modelscope"] <= CHUNK


@pytest.mark.parametrize("fault", [
    Fault("status", match="files/", status=500, times=5),
    Fault("status", match="files/", status=503, times=3),
    Fault("reset", match="files/", times=4),
    Fault("slow", match="files/", delay=4.0, times=2),
], ids=["500s", "503s", "resets", "timeouts"])
def test_a_flaky_mirror_still_completes(env, hub, oss, model_dir, fault):
    mirror(env, model_dir)
    oss.faults.add(fault)
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    assert tree_digest(model_path(env)) == tree_digest(model_dir)
    assert events(proc)[-1]["event"] == "done"


def test_files_missing_from_the_mirror_come_from_modelscope(env, hub, oss, model_dir):
    missing = shard(model_dir, 1)
    mirror(env, model_dir, only={p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                                 if p.is_file() and p.name != missing})
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    by_source = events(proc)[-1]["fetched_by_source"]
    assert by_source["modelscope"] == (model_dir / missing).stat().st_size
    assert {r.path.split("FilePath=")[1] for r in hub.faults.data_requests()} == {missing}
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_a_mirror_that_ignores_range_is_left_for_the_origin(env, hub, oss, model_dir):
    mirror(env, model_dir)
    oss.faults.add(Fault("ignore_range", match=shard(model_dir, 0)))
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    assert any("ignored the Range header" in e.get("message", "") for e in events(proc))
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_kill_9_halfway_then_pull_again_refetches_only_what_was_in_flight(env, hub, oss, model_dir):
    mirror(env, model_dir)
    env["SHOAL_CONCURRENCY"] = "2"
    # Slow every chunk down so the kill lands mid-pull.
    oss.faults.add(Fault("slow", match="files/", delay=0.05))
    proc = popen_shoal(["pull", MODEL_ID, "--json"], env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(oss.faults.data_requests()) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    oss.faults.clear()
    first = oss.faults.data_requests()
    assert 20 <= len(first) < 66, "the kill should land mid-pull"
    assert list(model_path(env).glob("*.partial"))
    oss.faults.clear_log()

    done = events(run_shoal(["pull", MODEL_ID, "--json"], env, check=True))[-1]
    second = oss.faults.data_requests()
    total_chunks = sum(-(-p.stat().st_size // CHUNK) for p in model_dir.rglob("*") if p.is_file())
    refetched = len(first) + len(second) - total_chunks
    # What was requested but not verified when the kill came: at most the chunks in flight.
    print(f"killed after {len(first)} requests; resumed with {len(second)}; re-fetched {refetched}")
    assert 0 <= refetched <= 2, f"re-fetched {refetched} chunks"
    assert done["chunks_fetched"] == len(second)
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_ctrl_c_keeps_verified_chunks_and_exits_130(env, hub, oss, model_dir):
    mirror(env, model_dir)
    env["SHOAL_CONCURRENCY"] = "1"
    oss.faults.clear_log()
    oss.faults.add(Fault("slow", match="files/", delay=0.15))  # 34 chunks, one at a time: 5 s at least
    # What a terminal gives a command: Ctrl-C's default action and not blocked, whatever
    # this test process inherited or was left with (the child inherits both across exec).
    parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    proc = popen_shoal(["pull", MODEL_ID], env, interruptible=True)
    deadline = time.monotonic() + 60
    while len(oss.faults.data_requests(f"/{oss.bucket}/")) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the pull ended before it was interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, f"{err}\n(this test process: SIGINT handler, blocked signals = {parent})"
    assert "run the same command to resume" in err
    oss.faults.clear()
    run_shoal(["pull", MODEL_ID], env, check=True)
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


@pytest.mark.parametrize("entry,message", [
    ({"Path": "../../escaped.bin", "Size": 10}, "unsafe file path '../../escaped.bin'"),
    ({"Path": "/etc/cron.d/x", "Size": 10}, "is absolute"),
    ({"Path": "weights.bin", "Size": 10 ** 18}, "absurd size"),
])
def test_a_lying_hub_listing_is_refused_and_nothing_is_written(env, hub, oss, tmp_path, entry, message):
    del env["SHOAL_OSS_BUCKET"]
    hub.override_listing(MODEL_ID, [{"Name": "x", "Type": "blob", "Sha256": "ab" * 32, **entry}])
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 5, proc.stderr
    assert message in proc.stderr and "Invalid manifest" in proc.stderr
    assert not (tmp_path / "escaped.bin").exists() and not Path("/etc/cron.d/x").exists()
    cache = Path(env["SHOAL_CACHE_DIR"])
    assert not (cache / "models").exists() or not any(p.is_file() for p in (cache / "models").rglob("*"))


def test_an_unknown_model_exits_3_and_says_what_to_check(env, hub, oss):
    proc = run_shoal(["pull", "lab/no-such-model"], env)
    assert proc.returncode == 3, proc.stderr
    assert "no model lab/no-such-model" in proc.stderr and "check the spelling" in proc.stderr


def test_no_reachable_source_exits_4(env, tmp_path):
    import socket
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env.update(OSS_ENDPOINT=dead, MODELSCOPE_ENDPOINT=dead)
    proc = run_shoal(["pull", MODEL_ID], env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "no reachable source" in proc.stderr
    assert "OSS mirror" in proc.stderr and "ModelScope" in proc.stderr


def test_rejected_oss_credentials_fall_back_with_a_warning_or_fail_clearly(env, hub, oss, model_dir):
    mirror(env, model_dir)
    oss.faults.add(Fault("status", status=403, code="InvalidAccessKeyId"))
    proc = run_shoal(["pull", MODEL_ID], env, check=True)
    assert "OSS refused the request (403 InvalidAccessKeyId)" in proc.stderr
    assert "check OSS_ACCESS_KEY_ID" in proc.stderr
    assert tree_digest(model_path(env)) == tree_digest(model_dir)

    run_shoal(["rm", MODEL_ID], env, check=True)
    proc = run_shoal(["pull", MODEL_ID, "--no-modelscope"], env)
    assert proc.returncode == 7, proc.stderr
    assert "InvalidAccessKeyId" in proc.stderr


def test_verify_finds_damage_and_pull_repairs_only_the_damaged_chunks(env, hub, oss, model_dir):
    mirror(env, model_dir)
    run_shoal(["pull", MODEL_ID], env, check=True)
    target = model_path(env) / shard(model_dir, 0)
    with open(target, "r+b") as f:  # flip a byte in chunk 3, as a failing disk would
        f.seek(3 * CHUNK + 17)
        byte = f.read(1)
        f.seek(3 * CHUNK + 17)
        f.write(bytes([byte[0] ^ 1]))
    proc = run_shoal(["verify", MODEL_ID], env)
    assert proc.returncode == 5
    assert f"DAMAGED {target.name}: 1 bad chunk(s) [3]" in proc.stdout
    oss.faults.clear_log()
    done = events(run_shoal(["pull", MODEL_ID, "--json"], env, check=True))[-1]
    assert done["chunks_fetched"] == 1
    assert tree_digest(model_path(env)) == tree_digest(model_dir)
    assert run_shoal(["verify", MODEL_ID], env).returncode == 0


def test_pull_to_a_directory_and_rm(env, hub, oss, model_dir, tmp_path):
    mirror(env, model_dir)
    dest = tmp_path / "models" / "tiny"
    run_shoal(["pull", MODEL_ID, "--to", str(dest)], env, check=True)
    assert tree_digest(dest) == tree_digest(model_dir)
    assert str(dest) in run_shoal(["ls"], env, check=True).stdout
    run_shoal(["rm", MODEL_ID], env, check=True)
    assert not dest.exists() or not any(dest.rglob("*"))
    assert "no models" in run_shoal(["ls"], env, check=True).stdout


def test_bad_settings_exit_2_with_the_variable_named(env):
    env["SHOAL_CONCURRENCY"] = "lots"
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 2 and "$SHOAL_CONCURRENCY" in proc.stderr
    env["SHOAL_CONCURRENCY"] = "4"
    del env["OSS_ACCESS_KEY_SECRET"]
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 2 and "OSS_ACCESS_KEY_SECRET" in proc.stderr


def test_sigterm_finishes_in_flight_chunks_and_the_next_pull_refetches_nothing_verified(env, hub, oss, model_dir):
    mirror(env, model_dir)
    env["SHOAL_CONCURRENCY"] = "2"
    oss.faults.add(Fault("slow", match="files/", delay=0.05))
    proc = popen_shoal(["pull", MODEL_ID, "--json"], env)
    deadline = time.monotonic() + 60
    while len(oss.faults.data_requests()) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM" in err
    assert json.loads(out.splitlines()[-1])["event"] == "error"
    first = len(oss.faults.data_requests())
    oss.faults.clear()
    oss.faults.clear_log()
    done = events(run_shoal(["pull", MODEL_ID, "--json"], env, check=True))[-1]
    total_chunks = sum(-(-p.stat().st_size // CHUNK) for p in model_dir.rglob("*") if p.is_file())
    # Every chunk requested before SIGTERM was finished and kept: none is fetched twice.
    assert first + done["chunks_fetched"] == total_chunks
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_a_mirror_without_the_model_leaves_everything_to_modelscope(env, hub, oss, model_dir):
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    plan, done = events(proc)[0], events(proc)[-1]
    assert plan["plan"] == "ModelScope listing"
    assert set(done["fetched_by_source"]) == {"modelscope"}
    # Once the mirror said 404 for a file it is not asked again for that file: only the
    # chunks already in flight (concurrency 4) can meet a 404, not all 37.
    misses = [e for e in oss.faults.log() if e.status == 404 and "/files/" in e.path]
    assert len(misses) <= 5 * 4 and len({m.path.split("/files/")[1] for m in misses}) == 5
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_a_file_that_fails_the_origin_sha256_is_fetched_again_elsewhere(env, hub, oss, model_dir, tmp_path):
    # The mirror holds the files but no manifest (a push cut short), and one file is wrong.
    import oss2
    from agent.sources.oss import file_key
    from agent.manifest import ModelRef
    bucket = oss2.Bucket(oss2.Auth("k", "s"), oss.url, oss.bucket)
    bad = shard(model_dir, 1)
    for p in model_dir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name == bad:
                data = data[:1000] + b"X" + data[1001:]
            bucket.put_object(file_key("", ModelRef(MODEL_ID), p.relative_to(model_dir).as_posix()), data)
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    troubles = [e["message"] for e in events(proc) if e["event"] == "trouble"]
    assert any(bad in t and "does not match the SHA-256" in t for t in troubles)
    assert {r.path.split("FilePath=")[1] for r in hub.faults.data_requests()} == {bad}
    assert tree_digest(model_path(env)) == tree_digest(model_dir)


def test_an_origin_that_serves_wrong_bytes_everywhere_is_an_integrity_error(env, hub, oss, model_dir):
    del env["SHOAL_OSS_BUCKET"]
    bad = shard(model_dir, 0)
    hub.faults.add(Fault("corrupt", match=bad))
    proc = run_shoal(["pull", MODEL_ID, "--json"], env)
    assert proc.returncode == 5, proc.stderr
    assert "does not match the SHA-256 the origin listed, from every source" in proc.stderr
    error = events(proc)[-1]
    assert error["event"] == "error" and error["exit_code"] == 5
    assert not (model_path(env) / bad).exists()
    # The other files are complete and kept.
    assert (model_path(env) / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_many_small_files_fetched_in_batches_keep_every_fault_rule(env, hub, oss, tmp_path):
    """Small files go out 16 to a thread hop (agent.scheduler); a file that fails inside a
    batch is handled as alone: from the mirror, a corrupt one is refused (and said so) and
    taken from ModelScope, one the mirror lacks comes from ModelScope, a 500 is retried."""
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    many = tmp_path / "many"
    for i in range(60):
        path = many / f"part-{i // 20}" / f"f{i:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * (500 + 97 * i))
    ref = ModelRef("lab/many-small", "master")
    hub.add_model(ref.model_id, many)
    corrupt, missing, flaky = "part-0/f007.json", "part-1/f025.json", "part-2/f043.json"
    push_directory(ref, many, load_settings(env=env), manifest_from_dir(ref, many, CHUNK),
                   only={p.relative_to(many).as_posix() for p in many.rglob("*.json")} - {missing})
    oss.faults.add(Fault("corrupt", match=corrupt, times=1))
    oss.faults.add(Fault("status", match=flaky, status=500, times=1))
    proc = run_shoal(["pull", ref.model_id, "--json"], env, check=True)
    got = Path(env["SHOAL_CACHE_DIR"]) / "models" / ref.model_id / "master"
    assert tree_digest(got) == tree_digest(many)
    seen = events(proc)
    troubles = [e["message"] for e in seen if e["event"] == "trouble"]
    assert len(troubles) == 1 and "does not match the manifest" in troubles[0] and corrupt in troubles[0]
    assert [e.fault for e in oss.faults.data_requests(flaky)] == ["status", None]  # retried once
    from_hub = {r.path.split("FilePath=")[1].split("&")[0] for r in hub.faults.data_requests()}
    assert from_hub == {corrupt, missing}
    assert seen[-1]["fetched_by_source"]["oss"] == sum(
        p.stat().st_size for p in many.rglob("*.json") if p.relative_to(many).as_posix() not in (corrupt, missing))


def test_small_and_large_chunks_are_taken_in_step_by_bytes():
    """Without peers, a pull takes small files' chunks and large chunks in step (by bytes),
    each kind in file order: the small files' CPU work overlaps the large file's transfer."""
    from types import SimpleNamespace
    from agent.picking import FifoPicker, Job
    mib = 1 << 20
    small = [SimpleNamespace(file=SimpleNamespace(rel=f"s{i}", size=100_000, chunk_size=8 * mib)) for i in range(40)]
    large = SimpleNamespace(file=SimpleNamespace(rel="w.bin", size=4 * 8 * mib, chunk_size=8 * mib))
    jobs = [Job(t, 0) for t in small] + [Job(large, i) for i in range(4)]
    picker = FifoPicker(jobs)
    order = []
    while (job := picker.take_now()) is not None:
        order.append(job.key)
    assert [k for k in order if k[0] != "w.bin"] == [(f"s{i}", 0) for i in range(40)]
    assert [k for k in order if k[0] == "w.bin"] == [("w.bin", i) for i in range(4)]
    positions = [order.index(("w.bin", i)) for i in range(4)]
    assert positions == [1, 12, 23, 34]  # a large chunk, then small ones to the same share of their bytes
