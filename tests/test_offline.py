"""'Is it cached?' needs no internet: a complete model pulls with every origin unreachable
(one line says upstream could not be checked), `--offline` / `SHOAL_OFFLINE=1` / `offline =
true` never ask an origin, and a revision pinned by manifest id never needs one. Real
`shoal` processes, the real oss2 client and modelscope SDK against the local servers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import MODEL_ID, mirror, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(120)


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def cached(env, oss, hub, model_dir):
    """The model pulled once from the mirror; the servers' logs cleared."""
    mirror(env, model_dir)
    done = events(run_shoal(["pull", MODEL_ID, "--json"], env, check=True).stdout)[-1]
    oss.faults.clear_log()
    hub.faults.clear_log()
    return done["manifest_id"]


def folder(env) -> Path:
    return Path(env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master"


def test_a_complete_model_pulls_with_every_origin_unreachable(env, cached, model_dir):
    dead = dead_endpoint()
    env.update(OSS_ENDPOINT=dead, MODELSCOPE_ENDPOINT=dead, SHOAL_RETRIES="0")
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "upstream could not be checked" in line]
    assert len(said) == 1 and "complete copy in the cache" in said[0]
    assert "fetched nothing" in proc.stderr
    assert tree_digest(folder(env)) == tree_digest(model_dir)


@pytest.mark.parametrize("how", ["flag", "environment", "config"])
def test_offline_asks_no_origin(env, cached, oss, hub, model_dir, tmp_path, how):
    args = ["pull", MODEL_ID, "--json"]
    if how == "flag":
        args.append("--offline")
    elif how == "environment":
        env["SHOAL_OFFLINE"] = "1"
    else:
        config = tmp_path / "offline.toml"
        config.write_text("offline = true\n")
        env["SHOAL_CONFIG"] = str(config)
    done = events(run_shoal(args, env, check=True).stdout)[-1]
    assert done["event"] == "done" and done["chunks_fetched"] == 0
    assert oss.faults.log() == [] and hub.faults.log() == []  # not one request, not even a listing
    assert tree_digest(folder(env)) == tree_digest(model_dir)


def test_offline_and_not_cached_says_so(env, oss, hub):
    proc = run_shoal(["pull", "lab/never-pulled", "--offline"], env)
    assert proc.returncode == 3, proc.stderr
    assert "not in the cache" in proc.stderr and "offline" in proc.stderr
    assert oss.faults.log() == [] and hub.faults.log() == []


def test_a_revision_pinned_by_manifest_id_needs_no_origin(env, cached, oss, hub, model_dir):
    done = events(run_shoal(["pull", f"{MODEL_ID}@{cached}", "--json"], env, check=True).stdout)[-1]
    assert done["manifest_id"] == cached and done["chunks_fetched"] == 0
    assert oss.faults.log() == [] and hub.faults.log() == []
