"""The room shares by content: a peer that holds a file under another repository or
revision serves it, found by the chunks' BLAKE3 (``agent.swarm.content``), within the same
trust rules (the puller verifies every chunk against the manifest it trusts). Real agent
processes on loopback, the real oss2 client against the OSS server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import CHUNK, MODEL_ID, AgentProcess, run_shoal, tree_digest
from test_swarm import agent_env, wait_connected

pytestmark = pytest.mark.timeout(240)


def mirror_as(env, directory: Path, model: str, revision: str = "master") -> None:
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    ref = ModelRef(model, revision)
    push_directory(ref, directory, load_settings(env=env), manifest_from_dir(ref, directory, CHUNK))


def test_a_peer_serves_files_it_holds_under_another_repository(env, oss, model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "config.json").write_text('{"fine_tuned_from": "lab/tiny-model"}')
    mirror_as(env, model_dir, MODEL_ID)
    mirror_as(env, copy, "lab/copy")
    t_env = agent_env(env, tmp_path, "teacher", SHOAL_DHT="0")
    run_shoal(["pull", MODEL_ID], t_env, check=True)  # the teacher holds lab/tiny-model, not lab/copy
    teacher = AgentProcess(t_env).start()
    try:
        addr = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["addrs"][0]
        s_env = agent_env(env, tmp_path, "student", SHOAL_SWARM_PEERS=addr, SHOAL_DHT="0", SHOAL_LOG_LEVEL="DEBUG")
        student = AgentProcess(s_env).start()
        try:
            wait_connected(s_env)
            oss.faults.clear_log()
            out = run_shoal(["pull", "lab/copy", "--json"], s_env, check=True)
            done = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")][-1]
            shared = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file() and p.name != "config.json")
            assert done["fetched_by_source"].get("lan") == shared
            assert oss.faults.data_bytes("/files/") == (copy / "config.json").stat().st_size
            assert tree_digest(Path(s_env["SHOAL_CACHE_DIR"]) / "models" / "lab" / "copy" / "master") == \
                tree_digest(copy)
            asked = json.loads(run_shoal(["status", "--json"], t_env, check=True).stdout)["swarm"]["asked"]
            assert asked["content"] >= 1  # the student asked what the teacher holds of lab/copy by content
        finally:
            student.stop()
    finally:
        teacher.stop()
