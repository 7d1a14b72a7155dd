"""The mirror as labs run it: STS credentials from the Alibaba Cloud credentials chain that
expire mid-pull and are refreshed, and objects in archive storage classes that a pull
takes from ModelScope meanwhile and asks OSS to restore. Real ``shoal`` processes, the
real oss2 client and the real ``alibabacloud-credentials`` chain (its credentials-URI
provider) against the local OSS server, which issues the tokens and enforces their life
and the storage classes (``agent.testing.oss_server``)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import MODEL_ID, mirror, run_shoal, tree_digest, wait_for

pytestmark = pytest.mark.timeout(180)


def chain_env(env: dict, oss, tmp_path: Path) -> dict:
    """Credentials only from the chain, which finds them at the credentials URI (as an ECS
    sidecar or a lab's token service would serve them); no static key anywhere."""
    env = {k: v for k, v in env.items() if not k.startswith("OSS_ACCESS_KEY")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "OSS_ENDPOINT": oss.url, "SHOAL_OSS_CREDENTIALS": "chain", "HOME": str(home),
            "ALIBABA_CLOUD_CREDENTIALS_URI": f"{oss.url}/__shoal__/sts/credentials",
            "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", "ALIBABA_CLOUD_CLI_PROFILE_DISABLED": "true"}


def done_event(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def test_a_pull_whose_sts_token_expires_three_times_completes_from_the_mirror(env, oss, hub, model_dir, tmp_path):
    mirror(env, model_dir)
    oss.sts.configure(ttl=1.0, advertised=3600)  # each token dies after 1 s, though it says an hour
    oss.faults.add(Fault("slow", match="/files/", delay=0.25))  # a slow link: the pull outlives tokens
    pull_env = {**chain_env(env, oss, tmp_path), "SHOAL_CONCURRENCY": "2"}
    proc = run_shoal(["pull", MODEL_ID, "--json"], pull_env, timeout=150)
    assert proc.returncode == 0, proc.stderr
    done = done_event(proc)
    assert set(done["fetched_by_source"]) == {"oss"}, done  # no fallback
    assert hub.faults.data_requests() == []
    assert tree_digest(Path(pull_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    data = oss.faults.data_requests("/files/")
    expired = [e for e in data if e.status == 403]
    served = Counter((e.path, e.range) for e in data if e.status == 206)
    assert len(expired) >= 3 and oss.sts.issued >= 4, (len(expired), oss.sts.issued)
    assert max(served.values()) == 1  # nothing fetched twice: a refused request sent no data


def test_doctor_names_the_credential_source_and_its_expiry_never_the_secret(env, oss, tmp_path):
    oss.sts.configure(ttl=3600)
    proc = run_shoal(["doctor", "--json"], chain_env(env, oss, tmp_path), check=True)
    creds = json.loads(proc.stdout)["mirror"]["credentials"]
    assert creds["mode"] == "chain" and "credential_uri" in creds["source"] and creds["sts"] is True
    assert time.strptime(creds["expires"], "%Y-%m-%dT%H:%M:%SZ")
    assert creds["access_key_id"].startswith("STS.") and creds["access_key_id"].endswith("***")
    assert "sts-" not in proc.stdout  # the token itself is never shown
    human = run_shoal(["doctor"], chain_env(env, oss, tmp_path), check=True).stdout
    assert "credentials: chain: default/credential_uri (STS), expires" in human
    # Nothing in the chain: doctor says so, and a pull goes to ModelScope with the reason.
    empty = {k: v for k, v in chain_env(env, oss, tmp_path).items() if k != "ALIBABA_CLOUD_CREDENTIALS_URI"}
    assert "none found" in run_shoal(["doctor"], empty, check=True).stdout


def test_an_archived_shard_comes_from_modelscope_is_restored_then_read_from_the_mirror(env, oss, hub, model_dir,
                                                                                     tmp_path):
    mirror(env, model_dir)
    shard = sorted(p.name for p in model_dir.glob("*.safetensors"))[0]
    key = f"{MODEL_ID}/master/files/{shard}"
    oss.storage.set(oss.bucket, key, "ColdArchive")
    oss.storage.restore_delay = 3.0
    pull_env = {**env, "SHOAL_OSS_RESTORE": "1", "SHOAL_OSS_RESTORE_TIER": "Expedited", "SHOAL_CONCURRENCY": "4"}
    proc = run_shoal(["pull", MODEL_ID, "--json"], pull_env, check=True)
    done = done_event(proc)
    assert done["fetched_by_source"].get("modelscope") and done["fetched_by_source"].get("oss"), done
    assert [e.path for e in hub.faults.data_requests()] and all(shard in e.path for e in hub.faults.data_requests())
    refused = [e for e in oss.faults.data_requests("/files/") if shard in e.path]
    # Once known archived, not asked again: at most the requests already in flight (4 of its 17 chunks).
    assert 1 <= len(refused) <= 4 and all(e.status == 403 for e in refused)
    assert oss.storage.restores == [{"bucket": oss.bucket, "key": key, "tier": "Expedited", "days": 2}]
    assert tree_digest(Path(env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)

    def status() -> dict:
        out = run_shoal(["mirror", "status", MODEL_ID, "--json"], env, check=True).stdout
        return {row["path"]: row for row in json.loads(out)["files"]}
    rows = status()
    assert (rows[shard]["storage_class"], rows[shard]["restore"]) == ("ColdArchive", "restoring")
    assert all(row["restore"] == "readable" for path, row in rows.items() if path != shard)
    wait_for(lambda: status()[shard]["restore"].startswith("restored"), 30, "the restore to finish")

    # A later pull (another machine: a fresh cache) reads the restored shard from the mirror.
    hub.faults.clear_log()
    later = {**pull_env, "SHOAL_CACHE_DIR": str(tmp_path / "later")}
    assert set(done_event(run_shoal(["pull", MODEL_ID, "--json"], later, check=True))["fetched_by_source"]) == {"oss"}
    assert hub.faults.data_requests() == []


def test_an_archived_object_without_restore_falls_through_and_says_so(env, oss, hub, model_dir):
    mirror(env, model_dir)
    shard = sorted(p.name for p in model_dir.glob("*.safetensors"))[1]
    oss.storage.set(oss.bucket, f"{MODEL_ID}/master/files/{shard}", "Archive")
    proc = run_shoal(["pull", MODEL_ID, "--json"], env, check=True)
    assert done_event(proc)["fetched_by_source"].get("oss")  # the other files still from the mirror
    assert oss.storage.restores == []
    human = run_shoal(["mirror", "status", MODEL_ID], env, check=True).stdout
    assert shard in human and "Archive" in human and "archived (not restored)" in human
