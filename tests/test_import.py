"""`shoal import DIR --as OWNER/NAME`: what a lab downloaded already (a hub cache snapshot,
any copy) becomes the cache's without a fetch, each file hashed against the origin's
listing first; what does not match is named and fetched. Real `shoal` processes against
the local hub server (the real modelscope SDK's endpoints)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import MODEL_ID, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(120)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def folder(env) -> Path:
    return Path(env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master"


def hf_snapshot(model_dir: Path, root: Path) -> Path:
    """A huggingface_hub cache entry: blobs by etag, a snapshot folder of symbolic links."""
    repo = root / "models--lab--tiny-model"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    for path in model_dir.rglob("*"):
        if path.is_file():
            rel = path.relative_to(model_dir)
            blob = blobs / f"etag-{abs(hash(str(rel))):x}"
            shutil.copyfile(path, blob)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def origin_env(env):
    del env["SHOAL_OSS_BUCKET"]  # the listing is ModelScope's: files proven by its SHA-256
    return env


def test_a_hub_cache_snapshot_is_imported_without_a_fetch(origin_env, hub, model_dir, tmp_path):
    env = origin_env
    snapshot = hf_snapshot(model_dir, tmp_path / "hf-cache")
    hub.faults.clear_log()
    out = run_shoal(["import", str(snapshot), "--as", MODEL_ID, "--json"], env, check=True)
    lines = events(out.stdout)
    imported = next(e for e in lines if e["event"] == "imported")
    assert imported["files"] == 5 and imported["refused"] == {}
    done = lines[-1]
    assert done["chunks_fetched"] == 0 and done["imported_bytes"] == done["total_bytes"]
    assert hub.faults.data_requests() == []  # the listing was asked for, not a byte
    assert tree_digest(folder(env)) == tree_digest(model_dir)
    # Linked, not copied: the hub cache's blob and the model's file are one inode.
    shard = next(folder(env).glob("*.safetensors"))
    assert shard.stat().st_ino == (snapshot / shard.name).resolve().stat().st_ino
    assert run_shoal(["verify", MODEL_ID], env, check=True).stdout.count("all files match") == 1


def test_what_does_not_match_is_named_and_fetched(origin_env, hub, model_dir, tmp_path):
    env = origin_env
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    shards = sorted(copy.glob("*.safetensors"))
    with open(shards[0], "r+b") as f:  # a bit rotted on a USB stick
        f.seek(1000)
        f.write(b"\x00")
    (copy / "config.json").unlink()
    hub.faults.clear_log()
    out = run_shoal(["import", str(copy), "--as", MODEL_ID, "--json"], env, check=True)
    imported = next(e for e in events(out.stdout) if e["event"] == "imported")
    assert imported["refused"] == {shards[0].name: "its SHA-256 is not the origin's", "config.json": "not in the folder"}
    asked = {r.path.split("FilePath=")[1].split("&")[0] for r in hub.faults.data_requests()}
    assert asked == {shards[0].name, "config.json"}
    assert tree_digest(folder(env)) == tree_digest(model_dir)
    # As a person reads it (another cache, the same folder).
    human = run_shoal(["import", str(copy), "--as", MODEL_ID], {**env, "SHOAL_CACHE_DIR": str(tmp_path / "c2")},
                      check=True)
    assert "imported 3 file(s)" in human.stderr
    assert "not imported, fetched instead: config.json: not in the folder" in human.stderr


def test_move_takes_the_files_into_the_cache(origin_env, hub, model_dir, tmp_path):
    env = origin_env
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    run_shoal(["import", str(copy), "--as", MODEL_ID, "--move"], env, check=True)
    assert tree_digest(folder(env)) == tree_digest(model_dir)
    assert [p for p in copy.rglob("*") if p.is_file()] == []  # moved, not copied
