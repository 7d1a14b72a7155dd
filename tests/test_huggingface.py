"""The third origin: a Hugging Face–compatible hub (HF_ENDPOINT), after ModelScope, off
unless configured. The real ``huggingface_hub`` client lists against a local server of the
hub's API (``agent.testing.hf_server``); bytes come by ranged GET through the hub's CDN
redirect, and every file is verified as the other origins' are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.testing.hf_server import HfHubServer
from agent.testing.hub_server import HubServer
from conftest import CHUNK, MODEL_ID, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hf(model_dir):
    with HfHubServer(lfs_threshold=64 * 1024) as server:  # the weights are LFS, the rest is git
        server.add_model(MODEL_ID, model_dir)
        yield server


def hf_env(tmp_path: Path, hf_url: str, **extra) -> dict:
    return {"SHOAL_CONFIG": str(tmp_path / "no-config.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "cache"),
            "HF_ENDPOINT": hf_url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "SHOAL_USE_MODELSCOPE": "0", "SHOAL_CHUNK_SIZE": str(CHUNK), "SHOAL_CHUNK_TIMEOUT": "5",
            "SHOAL_CONNECT_TIMEOUT": "2", "SHOAL_RETRIES": "2", "SHOAL_CONCURRENCY": "4", "SHOAL_MDNS": "0",
            **extra}


def done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def test_a_model_comes_whole_and_verified_from_a_hugging_face_hub(hf, model_dir, tmp_path):
    env = hf_env(tmp_path, hf.url)
    proc = run_shoal(["pull", MODEL_ID, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    result = done(proc)
    assert set(result["fetched_by_source"]) == {"huggingface"}
    assert tree_digest(Path(result["directory"])) == tree_digest(model_dir)
    log = hf.faults.log()
    # Listed through the hub's API with file metadata (the real client's request) ...
    assert any(e.path.startswith(f"/api/models/{MODEL_ID}/revision/main") and "blobs=" in e.path.lower() for e in log)
    # ... the weights by ranged GETs on the CDN the hub redirected to, in chunks.
    cdn = [e for e in log if e.path.startswith("/__cdn__/") and e.range]
    weights = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))
    assert len(cdn) >= weights // CHUNK


def test_modelscope_comes_first_and_the_hub_only_has_what_it_lacks(hf, model_dir, tmp_path):
    with HubServer() as empty_modelscope:  # knows no model
        env = hf_env(tmp_path, hf.url, SHOAL_USE_MODELSCOPE="1", MODELSCOPE_ENDPOINT=empty_modelscope.url,
                     MODELSCOPE_CACHE=str(tmp_path / "ms-cache"), MODELSCOPE_LOG_LEVEL="40")
        proc = run_shoal(["pull", MODEL_ID, "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert set(done(proc)["fetched_by_source"]) == {"huggingface"}
        assert any("/repo/files" in e.path for e in empty_modelscope.faults.log()), "ModelScope was not asked first"
    with HubServer() as modelscope:  # has it: the hub is not asked at all
        modelscope.add_model(MODEL_ID, model_dir)
        hf.faults.clear_log()
        env = hf_env(tmp_path / "second", hf.url, SHOAL_USE_MODELSCOPE="1", MODELSCOPE_ENDPOINT=modelscope.url,
                     MODELSCOPE_CACHE=str(tmp_path / "ms-cache2"), MODELSCOPE_LOG_LEVEL="40")
        proc = run_shoal(["pull", MODEL_ID, "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert set(done(proc)["fetched_by_source"]) == {"modelscope"}
        assert hf.faults.log() == []


def test_a_hub_that_lies_about_a_digest_fails_the_pull_and_keeps_nothing_wrong(hf, model_dir, tmp_path):
    shard = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*.safetensors"))[0]
    hf.lie_about(MODEL_ID, shard, "ab" * 32)
    env = hf_env(tmp_path, hf.url)
    proc = run_shoal(["pull", MODEL_ID, "--json"], env)
    assert proc.returncode == 5, proc.stderr
    assert shard in proc.stderr and "SHA-256" in proc.stderr
    assert not (tmp_path / "cache" / "models" / MODEL_ID / "master" / shard).exists()


def test_unknown_models_and_refused_tokens_say_what_to_do(model_dir, tmp_path):
    with HfHubServer(token="lab-token") as hub:
        hub.add_model(MODEL_ID, model_dir)
        proc = run_shoal(["pull", "lab/no-such-model"], hf_env(tmp_path, hub.url, HF_TOKEN="lab-token"))
        assert proc.returncode == 3 and "no model lab/no-such-model" in proc.stderr, proc.stderr
        # Without a token a private hub's model looks missing, as on the Hub: say so.
        proc = run_shoal(["pull", MODEL_ID], hf_env(tmp_path / "b", hub.url))
        assert proc.returncode == 3 and "HF_TOKEN" in proc.stderr, proc.stderr
        proc = run_shoal(["pull", MODEL_ID], hf_env(tmp_path / "c", hub.url, HF_TOKEN="wrong"))
        assert proc.returncode == 7 and "HF_TOKEN" in proc.stderr, proc.stderr
        proc = run_shoal(["pull", MODEL_ID, "--json"], hf_env(tmp_path / "d", hub.url, HF_TOKEN="lab-token"))
        assert proc.returncode == 0, proc.stderr


def test_the_hub_is_off_unless_configured(tmp_path):
    env = hf_env(tmp_path, "")
    env.pop("HF_ENDPOINT")
    proc = run_shoal(["pull", MODEL_ID], env)
    assert proc.returncode == 2 and "no source is configured" in proc.stderr and "HF_ENDPOINT" in proc.stderr
    proc = run_shoal(["pull", MODEL_ID], hf_env(tmp_path, "hf-mirror.com"))
    assert proc.returncode == 2 and "HF_ENDPOINT" in proc.stderr and "http" in proc.stderr
