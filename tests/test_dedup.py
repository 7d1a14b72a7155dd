"""Bytes paid once: the cache keeps every verified file once, by content, and a pull takes
what it already holds under any model, dataset or revision instead of fetching it. Real
`shoal` processes against the real modelscope SDK's hub server and the OSS server; what
a user would check: bytes the origin sent, files on disk, inodes, `shoal du`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import CHUNK, MODEL_ID, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(180)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def folder(env, model: str, revision: str = "master", kind: str = "models") -> Path:
    return Path(env["SHOAL_CACHE_DIR"]) / kind / model / revision


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def variant(src: Path, dst: Path, changes: dict[str, str]) -> Path:
    """A copy of ``src`` with some files' text changed: a new revision, a fine-tune's repo."""
    shutil.copytree(src, dst)
    for rel, text in changes.items():
        (dst / rel).write_text(text)
    return dst


def mirror_as(env, directory: Path, model: str, revision: str = "master") -> None:
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    ref = ModelRef(model, revision)
    push_directory(ref, directory, load_settings(env=env), manifest_from_dir(ref, directory, CHUNK))


def pull(env, target: str) -> dict:
    return events(run_shoal(["pull", target, "--json"], env, check=True).stdout)[-1]


def du(env) -> dict:
    return json.loads(run_shoal(["du", "--json"], env, check=True).stdout)


def distinct_bytes(*dirs: Path) -> int:
    seen = {}
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                seen[hashlib.sha256(p.read_bytes()).hexdigest()] = p.stat().st_size
    return sum(seen.values())


@pytest.fixture
def origin_only(env):
    del env["SHOAL_OSS_BUCKET"]  # plans from ModelScope's listing: files proven by its SHA-256
    return env


def test_a_new_revision_fetches_only_the_file_that_changed(origin_only, hub, model_dir, tmp_path):
    env = origin_only
    v2 = variant(model_dir, tmp_path / "v2", {"config.json": '{"model_type": "qwen2", "revision": 2}'})
    hub.add_model(MODEL_ID, model_dir, revision="v1")
    hub.add_model(MODEL_ID, v2, revision="v2")
    pull(env, f"{MODEL_ID}@v1")
    hub.faults.clear_log()
    done = pull(env, f"{MODEL_ID}@v2")
    assert hub.faults.data_bytes() == size(v2 / "config.json")  # the one changed file, nothing else
    assert done["reused_bytes"] == size(model_dir) - size(model_dir / "config.json")
    assert tree_digest(folder(env, MODEL_ID, "v2")) == tree_digest(v2)
    assert tree_digest(folder(env, MODEL_ID, "v1")) == tree_digest(model_dir)
    for name in shards(model_dir):  # one copy on disk: the two folders' files are one inode
        assert (folder(env, MODEL_ID, "v1") / name).stat().st_ino == (folder(env, MODEL_ID, "v2") / name).stat().st_ino
    report = du(env)
    assert report["usage_bytes"] == distinct_bytes(model_dir, v2) <= 1.01 * size(model_dir)
    assert report["logical_bytes"] == size(model_dir) + size(v2)


def test_a_second_repository_with_the_same_shards_fetches_none_of_them(origin_only, hub, model_dir, tmp_path):
    env = origin_only
    copy = variant(model_dir, tmp_path / "finetune", {"config.json": '{"finetuned": true}'})
    hub.add_model("lab/copy", copy)
    pull(env, MODEL_ID)
    hub.faults.clear_log()
    done = pull(env, "lab/copy")
    asked = {r.path.split("FilePath=")[1].split("&")[0] for r in hub.faults.data_requests()}
    assert asked == {"config.json"} and done["fetched_by_source"] == {"modelscope": size(copy / "config.json")}
    assert tree_digest(folder(env, "lab/copy")) == tree_digest(copy)
    assert du(env)["usage_bytes"] == distinct_bytes(model_dir, copy)
    # A plain folder any tool loads: regular files, readable, no symbolic link anywhere.
    assert not [p for p in folder(env, "lab/copy").rglob("*") if p.is_symlink()]


def test_trusted_manifests_share_by_their_chunk_hashes(env, hub, oss, model_dir, tmp_path):
    """From the mirror (trusted manifests, files proven chunk by chunk): a second model with
    the same files is linked because its BLAKE3 chunk list is the same, not by name."""
    copy = variant(model_dir, tmp_path / "copy", {"config.json": '{"copy": true}'})
    mirror_as(env, model_dir, MODEL_ID)
    mirror_as(env, copy, "lab/copy")
    pull(env, MODEL_ID)
    oss.faults.clear_log()
    done = pull(env, "lab/copy")
    assert oss.faults.data_bytes("/files/") == size(copy / "config.json")
    assert done["reused_bytes"] == size(copy) - size(copy / "config.json")
    assert tree_digest(folder(env, "lab/copy")) == tree_digest(copy)


def test_a_partly_changed_file_reuses_its_matching_chunks(env, hub, oss, model_dir, tmp_path):
    """A shard whose last bytes changed (a fine-tune's head, an appended tensor): with
    trusted manifests every chunk the cache verified elsewhere is copied, not fetched."""
    changed = variant(model_dir, tmp_path / "changed", {})
    shard = changed / shards(model_dir)[1]
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(b ^ 0x5A for b in data[-100:])
    shard.write_bytes(bytes(data))
    mirror_as(env, model_dir, MODEL_ID)
    mirror_as(env, changed, "lab/changed")
    pull(env, MODEL_ID)
    oss.faults.clear_log()
    done = pull(env, "lab/changed")
    last_chunk = len(data) - (len(data) - 1) // CHUNK * CHUNK
    assert oss.faults.data_bytes("/files/") == last_chunk  # one chunk of the changed shard, nothing else
    assert done["reused_bytes"] == size(changed) - last_chunk
    assert tree_digest(folder(env, "lab/changed")) == tree_digest(changed)


def test_a_shared_file_survives_rm_of_one_model_and_goes_with_the_last(origin_only, hub, model_dir, tmp_path):
    env = origin_only
    copy = variant(model_dir, tmp_path / "copy", {"config.json": "{}"})
    hub.add_model("lab/copy", copy)
    pull(env, MODEL_ID)
    pull(env, "lab/copy")
    blobs = Path(env["SHOAL_CACHE_DIR"]) / "blobs"
    run_shoal(["rm", MODEL_ID], env, check=True)
    assert tree_digest(folder(env, "lab/copy")) == tree_digest(copy)
    assert not folder(env, MODEL_ID).exists()
    assert du(env)["usage_bytes"] == size(copy)
    run_shoal(["rm", "lab/copy"], env, check=True)
    assert list(blobs.iterdir()) == [] and du(env)["usage_bytes"] == 0


def test_eviction_never_breaks_a_pinned_models_files(origin_only, hub, model_dir, tmp_path):
    """lab/a shares its shards with the pinned lab/copy and has a file of its own: evicting
    it frees that file, and the pinned model keeps every shard it links."""
    from agent.testing.models import make_model
    env = origin_only
    own = variant(model_dir, tmp_path / "a", {"extra.txt": os.urandom(512 * 1024).hex()})
    copy = variant(model_dir, tmp_path / "copy", {"config.json": "{}"})
    other = make_model(tmp_path / "other", weights_bytes=512 * 1024, seed="other")
    for name, directory in (("lab/a", own), ("lab/copy", copy), ("lab/other", other)):
        hub.add_model(name, directory)
    # lab/a and lab/copy fit under the high watermark (0.9); lab/other on top of them does not.
    env["SHOAL_QUOTA"] = str(int(distinct_bytes(own, copy) / 0.85))
    pull(env, "lab/a")
    pull(env, "lab/copy")
    run_shoal(["pin", "lab/copy"], env, check=True)
    done = run_shoal(["pull", "lab/other", "--json"], env, check=True)
    evicted = [e["model"] for e in events(done.stdout) if e["event"] == "evicted"]
    assert evicted == ["lab/a@master"]
    assert tree_digest(folder(env, "lab/copy")) == tree_digest(copy)  # its shards stayed: it links them
    assert run_shoal(["verify", "lab/copy"], env, check=True).stdout.count("all files match") == 1
    assert du(env)["usage_bytes"] == distinct_bytes(copy, other)


def test_a_damaged_blob_is_fetched_once_for_every_model_that_links_it(origin_only, hub, model_dir, tmp_path):
    env = origin_only
    copy = variant(model_dir, tmp_path / "copy", {"config.json": "{}"})
    hub.add_model("lab/copy", copy)
    pull(env, MODEL_ID)
    pull(env, "lab/copy")
    victim = folder(env, MODEL_ID) / shards(model_dir)[0]
    with open(victim, "r+b") as f:  # the disk flips a byte: both models' copy (one inode) is hit
        f.seek(CHUNK + 5)
        byte = f.read(1)
        f.seek(CHUNK + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = run_shoal(["verify", MODEL_ID], env)
    assert proc.returncode == 5 and "DAMAGED" in proc.stdout and "lab/copy" in proc.stdout
    hub.faults.clear_log()
    pull(env, MODEL_ID)  # the damaged chunk, once
    assert hub.faults.data_bytes() == CHUNK
    done = pull(env, "lab/copy")  # links the repaired file: nothing fetched
    assert hub.faults.data_bytes() == CHUNK and done["fetched_by_source"] == {}
    assert tree_digest(folder(env, MODEL_ID)) == tree_digest(model_dir)
    assert tree_digest(folder(env, "lab/copy")) == tree_digest(copy)


def test_a_listing_that_names_a_held_sha256_with_another_size_is_refused(origin_only, hub, model_dir):
    env = origin_only
    pull(env, MODEL_ID)
    shard = model_dir / shards(model_dir)[0]
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    hub.add_model("lab/liar", model_dir)
    hub.override_listing("lab/liar", [{"Name": "w.safetensors", "Path": "w.safetensors", "Type": "blob",
                                       "Size": shard.stat().st_size + 4096, "Sha256": sha}])
    hub.faults.clear_log()
    proc = run_shoal(["pull", "lab/liar"], env)
    assert proc.returncode == 5, proc.stderr
    assert "the listing or manifest is wrong" in proc.stderr and "w.safetensors" in proc.stderr
    assert hub.faults.data_requests() == []  # refused before a byte was fetched
    assert tree_digest(folder(env, MODEL_ID)) == tree_digest(model_dir)


def test_a_manifest_cannot_hand_its_bytes_to_a_pull_of_another_file(env, hub, oss, model_dir, tmp_path):
    """A trusted manifest names the SHA-256 of a real shard for other bytes of the same size.
    Its pull is proven by its chunk hashes (it is what its publisher signed), but a later
    pull of the real model (the origin's SHA-256) must not take those bytes from the cache."""
    from agent.config import load_settings
    from agent.manifest import FileEntry, ModelRef, build_manifest
    from agent.hashing import hash_file
    from agent.mirror import push_directory
    real = model_dir / shards(model_dir)[0]
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / real.name).write_bytes(os.urandom(real.stat().st_size))
    chunks, _ = hash_file(evil_dir / real.name, CHUNK)
    claimed = hashlib.sha256(real.read_bytes()).digest()
    ref = ModelRef("lab/evil", "master")
    manifest = build_manifest(ref.model_id, ref.revision, CHUNK,
                              [FileEntry(real.name, real.stat().st_size, claimed, tuple(chunks))])
    push_directory(ref, evil_dir, load_settings(env=env), manifest)
    pull(env, "lab/evil")  # trusted: its bytes match its chunk hashes
    del env["SHOAL_OSS_BUCKET"]
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    troubles = [e["message"] for e in events(proc.stdout) if e["event"] == "trouble"]
    assert any("no longer shared" in t for t in troubles), troubles
    assert tree_digest(folder(env, MODEL_ID)) == tree_digest(model_dir)
    assert (folder(env, "lab/evil") / real.name).read_bytes() == (evil_dir / real.name).read_bytes()


V1_SCHEMA = """
CREATE TABLE models (key TEXT PRIMARY KEY, model_id TEXT NOT NULL, revision TEXT NOT NULL, dir TEXT NOT NULL,
    chunk_size INTEGER NOT NULL, total_size INTEGER NOT NULL, manifest_id TEXT, state TEXT NOT NULL,
    updated REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0, last_used REAL NOT NULL DEFAULT 0);
CREATE TABLE files (model_key TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 BLOB NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model_key, path));
CREATE TABLE chunks (model_key TEXT NOT NULL, path TEXT NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    source TEXT NOT NULL, PRIMARY KEY (model_key, path, idx));
"""


def write_old_cache(cache: Path, models: dict[str, Path]) -> None:
    """A cache as shoal wrote it before content addressing (schema 1): each model's files
    copied in its own folder, an index of models, files and chunks, manifests kept."""
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir
    (cache / "manifests").mkdir(parents=True)
    db = sqlite3.connect(cache / "index.sqlite")
    db.executescript(V1_SCHEMA)
    for model, src in models.items():
        ref = ModelRef(model, "master")
        dst = cache / "models" / model / "master"
        shutil.copytree(src, dst)
        manifest = manifest_from_dir(ref, dst, CHUNK)
        (cache / "manifests" / f"{manifest.id}.shoal").write_bytes(manifest.encode())
        db.execute("INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                   (str(ref), model, "master", str(dst), CHUNK, manifest.total_size, manifest.id, "complete", 1.0, 1.0))
        for f in manifest.files:
            db.execute("INSERT INTO files VALUES (?,?,?,?,1)", (str(ref), f.path, f.size, f.sha256))
            db.executemany("INSERT INTO chunks VALUES (?,?,?,?,?)",
                           [(str(ref), f.path, i, h, "oss") for i, h in enumerate(f.chunks)])
    db.commit()
    db.close()


def test_an_old_cache_is_migrated_in_place_and_loses_nothing(origin_only, hub, model_dir, tmp_path):
    env = origin_only
    copy = variant(model_dir, tmp_path / "copy", {"config.json": "{}"})
    hub.add_model("lab/copy", copy)
    cache = Path(env["SHOAL_CACHE_DIR"])
    write_old_cache(cache, {MODEL_ID: model_dir, "lab/copy": copy})
    assert du(env)["usage_bytes"] == distinct_bytes(model_dir, copy)  # the first open migrated it
    listing = {m["model"]: m for m in json.loads(run_shoal(["ls", "--json"], env, check=True).stdout)}
    assert {m: (r["state"], r["have"]) for m, r in listing.items()} == \
        {MODEL_ID: ("complete", size(model_dir)), "lab/copy": ("complete", size(copy))}
    for name in shards(model_dir):  # the two copies became one
        assert (folder(env, MODEL_ID) / name).stat().st_ino == (folder(env, "lab/copy") / name).stat().st_ino
    for model, src in ((MODEL_ID, model_dir), ("lab/copy", copy)):
        assert tree_digest(folder(env, model)) == tree_digest(src)
        assert run_shoal(["verify", model], env, check=True).stdout.count("all files match") == 1
        assert pull(env, model)["chunks_fetched"] == 0
    assert hub.faults.data_requests() == []
    version = sqlite3.connect(cache / "index.sqlite").execute("PRAGMA user_version").fetchone()[0]
    assert version == 2


@pytest.mark.parametrize("how", ["removed", "damaged"])
def test_a_lost_index_is_rebuilt_from_the_files_it_can_verify(origin_only, hub, model_dir, tmp_path, how):
    env = origin_only
    copy = variant(model_dir, tmp_path / "copy", {"config.json": "{}"})
    hub.add_model("lab/copy", copy)
    pull(env, MODEL_ID)
    pull(env, "lab/copy")
    cache = Path(env["SHOAL_CACHE_DIR"])
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (cache / name).unlink(missing_ok=True)
    if how == "damaged":
        (cache / "index.sqlite").write_bytes(b"this is not a database" * 100)
    proc = run_shoal(["ls", "--json"], env, check=True)
    assert "rebuilt from the files it could verify" in proc.stderr and "2 model(s) complete" in proc.stderr
    assert {m["model"]: m["state"] for m in json.loads(proc.stdout)} == {MODEL_ID: "complete", "lab/copy": "complete"}
    if how == "damaged":
        assert list(cache.glob("index.sqlite.damaged-*"))  # kept aside, not deleted
    hub.faults.clear_log()
    assert pull(env, "lab/copy")["chunks_fetched"] == 0 and hub.faults.data_requests() == []
    assert du(env)["usage_bytes"] == distinct_bytes(model_dir, copy)
