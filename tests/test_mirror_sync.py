"""`shoal mirror sync`, the daily job, and the mirror's policy and lifecycle commands: real
``shoal`` processes, the real oss2 client and modelscope SDK against the local servers.
Upstream changes between runs; the mirror gets only what changed, keeps the last K
synced snapshots, never points at a half-made one (also when the sync is killed), and a
pull reads the current one."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import oss2
import pytest

from agent.testing.faults import Fault
from conftest import MODEL_ID, REPO, popen_shoal, run_shoal, tree_digest, wait_for

pytestmark = pytest.mark.timeout(240)


def sync_file(tmp_path: Path, keep: int) -> Path:
    path = tmp_path / "mirror-sync.toml"
    path.write_text(f'keep = {keep}\n\n[[model]]\nid = "{MODEL_ID}"\nrevision = "master"\n')
    return path


def sync(env: dict, path: Path) -> dict:
    proc = run_shoal(["mirror", "sync", str(path), "--json"], env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [outcome] = json.loads(proc.stdout)
    return outcome


def upstream_version(model_dir: Path, tmp_path: Path, n: int, *, shard: bool = False) -> Path:
    """The model as upstream has it after change ``n``: config.json edited (and a shard)."""
    version = tmp_path / f"upstream-v{n}"
    shutil.copytree(model_dir, version)
    config = json.loads((version / "config.json").read_text())
    (version / "config.json").write_text(json.dumps({**config, "shoal_upstream_change": n}))
    if shard:
        target = sorted(version.glob("*.safetensors"))[-1]
        data = bytearray(target.read_bytes())
        data[-100:] = bytes((b + n) % 256 for b in data[-100:])
        target.write_bytes(bytes(data))
    return version


def pulled(env: dict, cache: Path) -> tuple[dict, dict]:
    proc = run_shoal(["pull", MODEL_ID, "--json"], {**env, "SHOAL_CACHE_DIR": str(cache)}, check=True)
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return done, tree_digest(cache / "models" / MODEL_ID / "master")


def file_puts(oss) -> Counter:
    return Counter(e.path.split("?")[0] for e in oss.faults.log() if e.method == "PUT" and "/files/" in e.path)


def snapshots(env: dict, oss) -> list[str]:
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    return sorted(o.key.split("/")[-2] for o in oss2.ObjectIteratorV2(bucket, prefix=f"{MODEL_ID}/master~")
                  if o.key.endswith("/sync.json"))


def test_sync_pushes_only_what_changed_upstream_and_keeps_k_snapshots(env, oss, hub, model_dir, tmp_path):
    plan = sync_file(tmp_path, keep=2)
    first = sync(env, plan)
    assert first["status"] == "new" and len(first["uploaded"]) == 5 and first["copied"] == []
    done, tree = pulled(env, tmp_path / "student-1")
    assert set(done["fetched_by_source"]) == {"oss"} and tree == tree_digest(model_dir)

    # Nothing changed upstream: one listing, nothing read from the hub, nothing written but the pointer.
    hub.faults.clear_log()
    oss.faults.clear_log()
    again = sync(env, plan)
    assert again["status"] == "unchanged" and again["snapshot"] == first["snapshot"]
    assert hub.faults.data_requests() == [] and not file_puts(oss)

    # Upstream edits config.json: only it is downloaded and uploaded; the rest is copied inside OSS.
    v2 = upstream_version(model_dir, tmp_path, 2)
    hub.add_model(MODEL_ID, v2)
    hub.faults.clear_log()
    second = sync(env, plan)
    assert second["status"] == "updated" and second["uploaded"] == ["config.json"]
    assert sorted(second["copied"]) == sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                                              if p.is_file() and p.name != "config.json")
    assert {e.path.split("FilePath=")[1].split("&")[0] for e in hub.faults.data_requests()} == {"config.json"}
    done, tree = pulled(env, tmp_path / "student-2")
    assert set(done["fetched_by_source"]) == {"oss"} and tree == tree_digest(v2)

    # A third change: keep = 2 drops the first snapshot, tags the superseded one for the lifecycle.
    v3 = upstream_version(model_dir, tmp_path, 3, shard=True)
    hub.add_model(MODEL_ID, v3)
    third = sync(env, plan)
    assert third["status"] == "updated" and sorted(third["uploaded"]) == sorted(
        ["config.json", sorted(p.name for p in model_dir.glob("*.safetensors"))[-1]])
    assert third["deleted"] == [first["snapshot"]]
    assert snapshots(env, oss) == sorted([second["snapshot"], third["snapshot"]])
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    tags = bucket.get_object_tagging(f"{MODEL_ID}/{second['snapshot']}/files/config.json").tag_set.tagging_rule
    assert tags == {"shoal-state": "superseded"}
    assert bucket.get_object_tagging(f"{MODEL_ID}/{third['snapshot']}/files/config.json").tag_set.tagging_rule == {}
    record = json.loads(bucket.get_object(f"{MODEL_ID}/{third['snapshot']}/sync.json").read())
    assert record["upstream"]["fingerprint"] == third["fingerprint"] and record["synced_at"].endswith("Z")
    assert record["upstream"]["endpoint"] == hub.url
    done, tree = pulled(env, tmp_path / "student-3")
    assert tree == tree_digest(v3)
    rows = json.loads(run_shoal(["mirror", "status", MODEL_ID, "--json"], env, check=True).stdout)["files"]
    assert {r["restore"] for r in rows} == {"readable"} and len(rows) == 5


def test_a_sync_killed_mid_way_never_leaves_the_pointer_on_missing_files_and_resumes(env, oss, hub, model_dir,
                                                                                    tmp_path):
    plan = sync_file(tmp_path, keep=3)
    first = sync(env, plan)
    v2 = upstream_version(model_dir, tmp_path, 2, shard=True)
    (v2 / "extra.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB more to download
    hub.add_model(MODEL_ID, v2)
    hub.faults.add(Fault("slow", match="/repo", delay=0.3))
    oss.faults.clear_log()
    proc = popen_shoal(["mirror", "sync", str(plan), "--json"], env)
    # Killed once the new snapshot has some files but not all.
    wait_for(lambda: len(file_puts(oss)) >= 1 or proc.poll() is not None, 60, "the sync to upload a file")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    pointer = json.loads(bucket.get_object(f"{MODEL_ID}/master/current.json").read())
    assert pointer["snapshot"] == first["snapshot"]
    done, tree = pulled(env, tmp_path / "during")  # the mirror still serves the complete first snapshot
    assert set(done["fetched_by_source"]) == {"oss"} and tree == tree_digest(model_dir)

    hub.faults.clear()
    puts_before = file_puts(oss)
    resumed = sync(env, plan)
    assert resumed["status"] == "updated" and resumed["kept"]  # what the killed run uploaded is kept
    assert set(puts_before) <= set(file_puts(oss))
    assert all(n == 1 for n in file_puts(oss).values())  # no file went up twice
    done, tree = pulled(env, tmp_path / "after")
    assert set(done["fetched_by_source"]) == {"oss"} and tree == tree_digest(v2)


def test_a_big_unchanged_file_is_copied_inside_oss_in_parts(env, oss, monkeypatch):
    """Above OSS's 1 GiB CopyObject limit the sync copies with UploadPartCopy (here with the
    limit and the part size made small)."""
    import hashlib
    import agent.mirrorsync as mirrorsync
    from agent.config import load_settings
    from agent.manifest import ListedFile
    monkeypatch.setattr(mirrorsync, "COPY_PART_SIZE", 256 * 1024)
    data = bytes(range(256)) * 4000 + b"tail"  # ~1 MB: four parts
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    bucket.put_object("old/big.bin", data)
    sync = mirrorsync.MirrorSync(load_settings(env=env), keep=2, copy_threshold=100 * 1024)
    try:
        sync._copy("old/big.bin", "new/big.bin", ListedFile("big.bin", len(data), hashlib.sha256(data).digest()))
    finally:
        sync.close()
    copied = bucket.get_object("new/big.bin")
    assert copied.read() == data and copied.headers["x-oss-meta-sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(1 for e in oss.faults.log() if e.method == "PUT" and "partNumber" in e.path) == 4


def test_a_bad_sync_file_is_refused_clearly(env, tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in [("keep = 0\n[[model]]\nid = \"a/b\"\n", "keep = 0"),
                          ("keep = 2\n", "no [[model]] or [[dataset]] tables"),
                          ("[[model]]\nid = \"../etc\"\n", "model #1"),
                          ("[[model]]\nid = \"a/b\"\nrevision = \"master~1\"\n", "branch or tag")]:
        bad.write_text(text)
        proc = run_shoal(["mirror", "sync", str(bad)], env)
        assert proc.returncode != 0 and message in proc.stderr, (text, proc.stderr)


def test_the_read_only_policy_grants_reading_the_prefix_and_nothing_else(env):
    proc = run_shoal(["mirror", "policy", "--read-only", "--bucket", "lab-models"],
                     {**env, "SHOAL_OSS_PREFIX": "mirror/"}, check=True)
    policy = json.loads(proc.stdout)
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {"oss:GetObject", "oss:ListObjects"}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"acs:oss:*:*:lab-models/mirror/*", "acs:oss:*:*:lab-models"}
    listing = next(s for s in policy["Statement"] if s["Action"] == ["oss:ListObjects"])
    assert listing["Condition"] == {"StringLike": {"oss:Prefix": ["mirror/*"]}}
    restore = json.loads(run_shoal(["mirror", "policy", "--read-only", "--restore", "--bucket", "lab-models"], env,
                                   check=True).stdout)
    assert "oss:RestoreObject" in restore["Statement"][0]["Action"]


def test_lifecycle_moves_only_superseded_snapshots(env, oss):
    proc = run_shoal(["mirror", "lifecycle", "--ia-after", "30", "--archive-after", "180"], env, check=True)
    assert "superseded snapshots move to IA after 30 days, Archive after 180 days" in proc.stdout
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    [rule] = bucket.get_bucket_lifecycle().rules
    assert {(t.days, t.storage_class) for t in rule.storage_transitions} == {(30, "IA"), (180, "Archive")}
    assert rule.tagging.tag_set.tagging_rule == {"shoal-state": "superseded"}
    bad = run_shoal(["mirror", "lifecycle", "--ia-after", "30", "--archive-after", "10"], env)
    assert bad.returncode == 2 and "later than it" in bad.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_daily_timer_and_its_service_are_valid_units(tmp_path):
    import subprocess
    units = tmp_path / "units"
    units.mkdir()
    for name in ("shoal-mirror-sync.service", "shoal-mirror-sync.timer"):
        text = (REPO / "bootstrap" / name).read_text().replace("/opt/shoal/venv/bin/shoal", "/bin/true")
        (units / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / "shoal-mirror-sync.timer"),
                           str(units / "shoal-mirror-sync.service")], capture_output=True, text=True, timeout=60)
    problems = [line for line in proc.stderr.splitlines() if "shoal-mirror-sync" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
    timer = (REPO / "bootstrap" / "shoal-mirror-sync.timer").read_text()
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer


def pull_events(env: dict, cache: Path, *extra: str) -> list[dict]:
    proc = run_shoal(["pull", MODEL_ID, "--json", *extra], {**env, "SHOAL_CACHE_DIR": str(cache)}, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_a_pull_from_the_mirror_says_how_old_its_copy_is_and_fresh_takes_upstream(env, oss, hub, model_dir,
                                                                                  tmp_path):
    sync(env, sync_file(tmp_path, keep=2))
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    synced_at = json.loads(bucket.get_object(f"{MODEL_ID}/master/current.json").read())["synced_at"]
    # A pull that takes a few seconds, as real ones take minutes: the upstream check (the
    # SDK's import alone is over a second here) answers while it runs.
    oss.faults.add(Fault("slow", match="/files/", delay=0.6))
    events = pull_events(env, tmp_path / "same")
    [age] = [e for e in events if e["event"] == "mirror_age"]
    assert (age["made_at"], age["upstream_moved"]) == (synced_at, False)
    assert events[-1]["mirror_copy"] == {"made_at": synced_at, "upstream_moved": False}

    # Upstream moves on; the mirror has not synced yet.
    v2 = upstream_version(model_dir, tmp_path, 2)
    hub.add_model(MODEL_ID, v2)
    events = pull_events(env, tmp_path / "stale")
    [age] = [e for e in events if e["event"] == "mirror_age"]
    assert age["upstream_moved"] is True and "--fresh" in age["message"]
    assert set(events[-1]["fetched_by_source"]) == {"oss"}
    assert tree_digest(tmp_path / "stale" / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    human = run_shoal(["pull", MODEL_ID], {**env, "SHOAL_CACHE_DIR": str(tmp_path / "human")}, check=True)
    assert f"was made {synced_at}" in human.stderr + human.stdout and "has changed since" in human.stderr + human.stdout
    fresh = pull_events(env, tmp_path / "fresh", "--fresh")
    assert set(fresh[-1]["fetched_by_source"]) == {"modelscope"}
    assert not [e for e in fresh if e["event"] == "mirror_age"]
    assert tree_digest(tmp_path / "fresh" / "models" / MODEL_ID / "master") == tree_digest(v2)

    # A hub slow to list never holds the pull up: it finishes without the answer.
    hub.faults.add(Fault("slow", match="/repo/files", delay=8))
    events = pull_events(env, tmp_path / "slow-hub")
    assert events[-1]["event"] == "done" and events[-1]["mirror_copy"] is None
    assert set(events[-1]["fetched_by_source"]) == {"oss"}


def test_a_sync_takes_over_a_revision_that_mirror_push_wrote(env, oss, hub, model_dir, tmp_path):
    from conftest import mirror
    mirror(env, model_dir)  # `mirror push` wrote master/manifest.shoal and its files
    v2 = upstream_version(model_dir, tmp_path, 2)
    hub.add_model(MODEL_ID, v2)
    assert sync(env, sync_file(tmp_path, keep=2))["status"] == "new"
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    with pytest.raises(oss2.exceptions.NoSuchKey):  # pulls would read it before the pointer
        bucket.get_object(f"{MODEL_ID}/master/manifest.shoal")
    done, tree = pulled(env, tmp_path / "student")
    assert set(done["fetched_by_source"]) == {"oss"} and tree == tree_digest(v2)


def test_a_sync_file_keeps_a_dataset_beside_the_model_of_the_same_name(env, oss, hub, model_dir, tmp_path):
    """[[dataset]] tables: the dataset is synced from ModelScope's dataset API into its own
    folder of the mirror, next to the model of the same name; a student pulls each back."""
    from agent.testing.tiny_llm import make_chat_dataset
    data = make_chat_dataset(tmp_path / "data", rows=500)
    hub.add_dataset(MODEL_ID, data)
    plan = tmp_path / "mirror-sync.toml"
    plan.write_text(f'keep = 2\n[[model]]\nid = "{MODEL_ID}"\n[[dataset]]\nid = "{MODEL_ID}"\n')
    proc = run_shoal(["mirror", "sync", str(plan), "--json"], env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model, dataset = json.loads(proc.stdout)
    assert model["status"] == dataset["status"] == "new"
    assert sorted(dataset["uploaded"]) == ["README.md", "train.jsonl"]
    fetched = [e.path for e in hub.faults.data_requests() if "train.jsonl" in e.path]
    assert fetched and all("/api/v1/datasets/" in path for path in fetched)
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    assert json.loads(bucket.get_object(f"datasets/{MODEL_ID}/master/current.json").read())["snapshot"] == \
        dataset["snapshot"]
    student = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "student"), "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}
    done = json.loads(run_shoal(["pull", "--dataset", MODEL_ID, "--json", "--no-modelscope"], student,
                                check=True).stdout.splitlines()[-1])
    assert set(done["fetched_by_source"]) == {"oss"}
    assert tree_digest(tmp_path / "student" / "datasets" / MODEL_ID / "master") == tree_digest(data)
    _, tree = pulled({**student, "SHOAL_USE_MODELSCOPE": "0"}, tmp_path / "student")
    assert tree == tree_digest(model_dir)
