"""The local servers are real enough to trust: the real oss2 and modelscope clients work
against them, they run as standalone processes, and they inject the faults they claim."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import oss2
import pytest
import requests

from agent.testing.faults import Fault
from agent.testing.guard import OutsideConnection
from conftest import MODEL_ID, REPO, TESTS, run_sdk_download, tree_digest


@pytest.mark.parametrize("auth", ["v1", "v4", "sts"])
def test_oss2_reads_and_writes_objects_with_every_signature(oss, auth, tmp_path):
    kwargs = {}
    if auth == "v1":
        credentials = oss2.Auth("id", "secret/with/four/slashes")
    elif auth == "v4":
        credentials, kwargs = oss2.AuthV4("id", "secret"), {"region": "cn-hangzhou"}
    else:
        token = oss.sts.issue()
        credentials = oss2.StsAuth(token["AccessKeyId"], token["AccessKeySecret"], token["SecurityToken"])
    bucket = oss2.Bucket(credentials, oss.url, oss.bucket, **kwargs)
    bucket.put_object("m/a.bin", b"0123456789", headers={"x-oss-meta-sha256": "feed"})
    got = bucket.get_object("m/a.bin", byte_range=(2, 5))
    assert (got.status, got.read()) == (206, b"2345")
    head = bucket.head_object("m/a.bin")
    assert head.content_length == 10 and head.headers["x-oss-meta-sha256"] == "feed"
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("m/missing")
    assert [o.key for o in oss2.ObjectIteratorV2(bucket, prefix="m/")] == ["m/a.bin"]


def test_the_oss_server_enforces_sts_token_life_and_archive_storage_classes(oss):
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    bucket.put_object("m/cold.bin", b"frozen")
    forged = oss2.Bucket(oss2.StsAuth("STS.x", "y", "never-issued"), oss.url, oss.bucket)
    with pytest.raises(oss2.exceptions.ServerError) as refused:
        forged.get_object("m/cold.bin")
    assert refused.value.code == "InvalidSecurityToken"
    oss.sts.configure(ttl=0.5, advertised=3600)
    token = requests.get(f"{oss.url}/__shoal__/sts/credentials", timeout=10).json()  # as the chain asks
    assert token["Code"] == "Success" and token["Expiration"].endswith("Z")
    sts = oss2.Bucket(oss2.StsAuth(token["AccessKeyId"], token["AccessKeySecret"], token["SecurityToken"]),
                      oss.url, oss.bucket)
    assert sts.get_object("m/cold.bin").read() == b"frozen"
    time.sleep(0.6)
    with pytest.raises(oss2.exceptions.ServerError) as expired:
        sts.get_object("m/cold.bin")
    assert (expired.value.status, expired.value.code) == (403, "SecurityTokenExpired")

    oss.storage.set(oss.bucket, "m/cold.bin", "ColdArchive")
    oss.storage.restore_delay = 0.5
    with pytest.raises(oss2.exceptions.ServerError) as archived:
        bucket.get_object("m/cold.bin")
    assert (archived.value.status, archived.value.code) == (403, "InvalidObjectState")
    assert bucket.head_object("m/cold.bin").headers["x-oss-storage-class"] == "ColdArchive"
    config = oss2.models.RestoreConfiguration(days=1, job_parameters=oss2.models.RestoreJobParameters("Bulk"))
    assert bucket.restore_object("m/cold.bin", input=config).status == 202
    with pytest.raises(oss2.exceptions.ServerError) as again:
        bucket.restore_object("m/cold.bin", input=config)
    assert again.value.code == "RestoreAlreadyInProgress"
    assert bucket.head_object("m/cold.bin").headers["x-oss-restore"] == 'ongoing-request="true"'
    time.sleep(0.6)
    assert bucket.get_object("m/cold.bin").read() == b"frozen"
    assert 'ongoing-request="false"' in bucket.head_object("m/cold.bin").headers["x-oss-restore"]
    bucket.put_object("m/warm.bin", b"x")
    with pytest.raises(oss2.exceptions.ServerError) as standard:
        bucket.restore_object("m/warm.bin")
    assert standard.value.code == "OperationNotSupported"
    assert [(r["key"], r["tier"], r["days"]) for r in oss.storage.restores] == [("m/cold.bin", "Bulk", 1)] * 2


def test_oss2_multipart_upload_and_resumable_download_round_trip(oss, tmp_path):
    from agent.testing.models import write_pseudo_random_file
    src = tmp_path / "big.bin"
    write_pseudo_random_file(src, "mp", 3 * 1024 * 1024 + 7)
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    oss2.resumable_upload(bucket, "big.bin", str(src), store=oss2.ResumableStore(root=str(tmp_path)),
                          multipart_threshold=512 * 1024, part_size=512 * 1024, num_threads=2)
    out = tmp_path / "out.bin"
    oss2.resumable_download(bucket, "big.bin", str(out), store=oss2.ResumableDownloadStore(root=str(tmp_path)),
                            multiget_threshold=512 * 1024, part_size=512 * 1024, num_threads=3)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_the_modelscope_sdk_downloads_through_the_local_hub(hub, model_dir, tmp_path):
    from modelscope.hub.api import HubApi
    files = HubApi(endpoint=hub.url).list_repo_files(MODEL_ID, "model", revision="master")
    assert {f.path: f.sha256 for f in files} == tree_digest(model_dir)
    proc = run_sdk_download(MODEL_ID, hub.url, tmp_path, tmp_path / "snap")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(tmp_path / "snap") == tree_digest(model_dir)


def test_hub_faults_apply_to_file_content(hub, model_dir):
    url = f"{hub.url}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json"
    original = (model_dir / "config.json").read_bytes()
    hub.faults.add(Fault("status", match="config.json", status=500, times=1))
    assert requests.get(url, timeout=5).status_code == 500
    assert requests.get(url, timeout=5).content == original  # times=1: used up
    hub.faults.add(Fault("corrupt", match="config.json", times=1))
    assert requests.get(url, timeout=5).content != original
    hub.faults.add(Fault("ignore_range", match="config.json", times=1))
    r = requests.get(url, headers={"Range": "bytes=0-3"}, timeout=5)
    assert (r.status_code, r.content) == (200, original)
    r = requests.get(url, headers={"Range": "bytes=2-5"}, timeout=5)
    assert (r.status_code, r.content) == (206, original[2:6])


def test_a_reset_fault_cuts_the_body_mid_way(oss):
    bucket = oss2.Bucket(oss2.Auth("id", "secret"), oss.url, oss.bucket)
    bucket.put_object("r.bin", b"x" * 200_000)
    oss.faults.add(Fault("reset", match="r.bin", times=1))
    with pytest.raises(Exception):
        r = requests.get(f"{oss.url}/{oss.bucket}/r.bin", timeout=5)
        assert len(r.content) == 200_000
    assert len(requests.get(f"{oss.url}/{oss.bucket}/r.bin", timeout=5).content) == 200_000


@pytest.mark.parametrize("module,args", [
    ("agent.testing.oss_server", ["--bucket", "standalone"]),
    ("agent.testing.hub_server", ["--model", "lab/x=MODEL_DIR"]),
])
def test_servers_run_as_standalone_processes_and_take_faults_over_http(module, args, model_dir):
    args = [a.replace("MODEL_DIR", str(model_dir)) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        assert url.startswith("http://127.0.0.1:")
        r = requests.post(f"{url}/__shoal__/faults", json=[{"kind": "status", "status": 503, "times": 1}], timeout=5)
        assert r.json() == {"added": 1}
        probe = f"{url}/standalone" if "oss" in module else f"{url}/api/v1/models/lab/x/revisions"
        assert requests.get(probe, timeout=5).status_code == 503
        assert requests.get(probe, timeout=5).status_code == 200
        assert len(requests.get(f"{url}/__shoal__/log", timeout=5).json()) >= 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_loopback_guard_refuses_outside_addresses():
    with pytest.raises(OutsideConnection):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    with pytest.raises(requests.ConnectionError, match="loopback guard"):
        requests.get("https://www.modelscope.cn/api/v1/models", timeout=1)


def test_the_keep_alive_hub_answers_many_requests_on_one_connection(model_dir):
    """The hub the small-files benchmark uses keeps connections alive like a real hub's front
    end; a fault that cuts a body closes that connection only, and a request body (the
    control endpoint's JSON) is read exactly, so the next request on it parses."""
    import http.client
    from agent.testing.hub_server import HubServer
    original = (model_dir / "config.json").read_bytes()
    with HubServer(keep_alive=True) as hub:
        hub.add_model(MODEL_ID, model_dir)
        port = int(hub.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        path = f"/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json"
        conn.request("GET", path, headers={"Range": "bytes=0-3"})
        first = conn.getresponse()
        assert (first.status, first.read()) == (206, original[:4])
        sock = conn.sock
        conn.request("POST", "/__shoal__/faults", body=json.dumps([]).encode(),
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().read()
        conn.request("GET", path)
        again = conn.getresponse()
        assert (again.status, again.read()) == (200, original)
        assert conn.sock is sock  # the same TCP connection throughout
        hub.faults.add(Fault("reset", match="config.json", times=1))
        conn.request("GET", path)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            conn.getresponse().read()
        conn.close()
        assert requests.get(f"{hub.url}{path}", timeout=5).content == original  # the server lives on
        big = socket.create_connection(("127.0.0.1", port), timeout=5)
        big.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999\r\n\r\n")
        assert big.recv(100).startswith(b"HTTP/1.1 413")
        big.close()
