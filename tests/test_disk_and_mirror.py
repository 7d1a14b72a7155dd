"""A full disk mid-pull, and `shoal mirror push` filling the mirror that pulls then use."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import MODEL_ID, mirror, popen_shoal, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a real filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machines run as root)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler.bin"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_mid_pull_is_a_clear_error_and_the_pull_resumes_after_space_is_freed(
        env, hub, oss, model_dir, small_disk):
    mirror(env, model_dir)
    env["SHOAL_CACHE_DIR"] = str(small_disk / "cache")
    env["SHOAL_CONCURRENCY"] = "2"
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    oss.faults.add(Fault("slow", match=shards[1], delay=1.5))
    proc = popen_shoal(["pull", MODEL_ID], env)
    first = small_disk / "cache" / "models" / MODEL_ID / "master" / shards[0]
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    filler = fill(small_disk)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 6, err
    assert "Disk full" in err and "no space left" in err and "pull again" in err
    listing = run_shoal(["ls", "--json"], env, check=True)
    [row] = json.loads(listing.stdout)
    assert row["state"] == "pulling" and 0 < row["have"] < row["size"]

    filler.unlink()
    oss.faults.clear()
    oss.faults.clear_log()
    run_shoal(["pull", MODEL_ID], env, check=True)
    assert tree_digest(small_disk / "cache" / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    # The finished shard was not fetched again.
    assert not oss.faults.data_requests(match=shards[0])


def test_a_pull_that_cannot_fit_is_refused_before_it_starts(env, hub, oss, model_dir, small_disk):
    mirror(env, model_dir)
    env["SHOAL_CACHE_DIR"] = str(small_disk / "cache")
    with open(small_disk / "filler.bin", "wb") as f:
        f.write(b"\0" * (5 * 1024 * 1024))
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 6
    assert "needs" in proc.stderr and "free some space" in proc.stderr
    assert oss.faults.data_requests() == []


def test_mirror_push_from_modelscope_fills_the_mirror_for_pulls_without_the_origin(env, hub, oss, model_dir, tmp_path):
    proc = run_shoal(["mirror", "push", MODEL_ID, "--bucket", oss.bucket], env, check=True)
    assert "5 uploaded" in proc.stdout
    again = run_shoal(["mirror", "push", MODEL_ID, "--bucket", oss.bucket], env, check=True)
    assert "0 uploaded, 5 already there" in again.stdout
    # A different machine, no ModelScope at all: everything comes from the mirror.
    other = {**env, "SHOAL_CACHE_DIR": str(tmp_path / "other-cache")}
    hub.faults.clear_log()
    out = run_shoal(["pull", MODEL_ID, "--no-modelscope", "--json"], other, check=True)
    done = [json.loads(line) for line in out.stdout.splitlines()][-1]
    assert set(done["fetched_by_source"]) == {"oss"}
    assert hub.faults.log() == []
    assert tree_digest(tmp_path / "other-cache" / "models" / MODEL_ID / "master") == tree_digest(model_dir)


def test_mirror_push_from_a_directory_and_without_credentials(env, hub, oss, model_dir):
    proc = run_shoal(["mirror", "push", "lab/fine-tune@v1", "--from-dir", str(model_dir)], env, check=True)
    assert "mirrored lab/fine-tune@v1" in proc.stdout
    no_keys = {k: v for k, v in env.items() if not k.startswith("OSS_ACCESS_KEY")}
    proc = run_shoal(["mirror", "push", MODEL_ID, "--from-dir", str(model_dir)], no_keys)
    assert proc.returncode == 2 and "OSS_ACCESS_KEY_ID" in proc.stderr
