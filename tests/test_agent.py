"""The background agent as a real process: shared pulls, cancel, access control, quota,
rate cap, the ModelScope gateway, metrics, SIGTERM and bad control frames."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import (CHUNK, MODEL_ID, REPO, TESTS, AgentProcess, mirror, popen_shoal, run_sdk_download, run_shoal,
                      tree_digest, wait_for)

pytestmark = pytest.mark.timeout(180)


def total_chunks(model_dir: Path) -> int:
    return sum(-(-p.stat().st_size // CHUNK) for p in model_dir.rglob("*") if p.is_file())


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def agent_env(env):
    env = dict(env)
    env["SHOAL_GATEWAY_PORT"] = "0"
    return env


@pytest.fixture
def agent(agent_env):
    process = AgentProcess(agent_env).start()
    yield process
    process.stop()


def test_two_clients_pulling_the_same_model_share_one_download(agent, agent_env, oss, model_dir):
    mirror(agent_env, model_dir)
    oss.faults.add(Fault("slow", match="files/", delay=0.03))
    first = popen_shoal(["pull", MODEL_ID, "--json"], agent_env)
    while not oss.faults.data_requests():
        time.sleep(0.01)
    second = popen_shoal(["pull", MODEL_ID, "--json"], agent_env)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert events(out1)[-1]["event"] == events(out2)[-1]["event"] == "done"
    # The mirror saw each chunk once, though two people pulled.
    requests = [(r.path, r.range) for r in oss.faults.data_requests()]
    assert len(requests) == len(set(requests)) == total_chunks(model_dir)
    assert tree_digest(agent.cache / "models" / MODEL_ID / "master") == tree_digest(model_dir)
    listed = json.loads(run_shoal(["ls", "--json"], agent_env, check=True).stdout)
    assert listed[0]["state"] == "complete"


def test_cancel_stops_a_pull_and_frees_it(agent, agent_env, oss, model_dir):
    mirror(agent_env, model_dir)
    oss.faults.add(Fault("slow", match="files/", delay=0.2))
    client = popen_shoal(["pull", MODEL_ID], agent_env)
    while len(oss.faults.data_requests()) < 3:
        time.sleep(0.01)
    status = json.loads(run_shoal(["status", "--json"], agent_env, check=True).stdout)
    assert [p["model"] for p in status["pulls"]] == [f"{MODEL_ID}@master"]
    assert run_shoal(["cancel", MODEL_ID], agent_env, check=True).returncode == 0
    _, err = client.communicate(timeout=30)
    assert client.returncode == 130 and "cancelled on request" in err
    status = json.loads(run_shoal(["status", "--json"], agent_env, check=True).stdout)
    assert status["pulls"] == []
    asked = len(oss.faults.data_requests())
    time.sleep(0.5)
    assert len(oss.faults.data_requests()) == asked  # nothing is fetched after the cancel
    proc = run_shoal(["cancel", MODEL_ID], agent_env)
    assert proc.returncode == 3 and "no pull of" in proc.stderr


def _raw_call(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_the_control_socket_is_owner_only_and_other_users_are_refused(agent_env, tmp_path):
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to act as another user) and the system python3")
    shared = Path(tempfile.mkdtemp(prefix="shoal-sock-"))
    try:
        shared.chmod(0o755)
        agent_env["SHOAL_SOCKET"] = str(shared / "agent.sock")
        process = AgentProcess(agent_env).start()
        try:
            sock = shared / "agent.sock"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            client = ("import socket,struct,sys\n"
                      "body=b'\\x82\\xa6method\\xa6status\\xa6params\\x80'\n"
                      "s=socket.socket(socket.AF_UNIX)\n"
                      "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES'); sys.exit()\n"
                      # The agent refuses before reading, so the send may meet a closed socket.
                      "try:\n s.sendall(struct.pack('>I',len(body))+body)\nexcept OSError:\n pass\n"
                      "print(s.recv(65536))\n")
            as_nobody = lambda: subprocess.run(  # noqa: E731
                ["/usr/bin/python3", "-c", client, str(sock)], user=65534, group=65534,
                capture_output=True, text=True, timeout=20, cwd="/")
            assert as_nobody().stdout.strip() == "EACCES"  # file permissions stop them first
            sock.chmod(0o666)  # even if the socket's mode is loosened, the agent checks who calls
            out = as_nobody().stdout
            assert "may not use this agent" in out and "uid 65534" in out
            # The owner still can.
            assert json.loads(run_shoal(["status", "--json"], agent_env, check=True).stdout)["pid"]
        finally:
            process.stop()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_malformed_and_oversized_frames_get_an_error_and_the_agent_keeps_running(agent, agent_env):
    from hypothesis import given, settings, strategies as st
    path = str(Path(agent_env["SHOAL_CACHE_DIR"]) / "agent.sock")
    from agent.rpc import FrameDecoder
    huge = _raw_call(path, struct.pack(">I", 64 * 1024 * 1024) + b"x" * 100)
    [reply] = FrameDecoder().feed(huge)
    assert "exceeds" in reply["error"]["message"]
    frame = lambda body: struct.pack(">I", len(body)) + body  # noqa: E731
    not_a_map = _raw_call(path, frame(b"\x93\x01\x02\x03"))
    assert "must hold a map" in FrameDecoder().feed(not_a_map)[0]["error"]["message"]
    unknown = _raw_call(path, frame(b"\x81\xa6method\xacshutdown_now"))
    assert "unknown method" in FrameDecoder().feed(unknown)[0]["error"]["message"]

    @settings(max_examples=40, deadline=None)
    @given(st.binary(min_size=0, max_size=64))
    def garbage(body):
        reply = _raw_call(path, frame(body))
        for message in FrameDecoder().feed(reply):
            assert "error" in message or "result" in message
    garbage()
    assert json.loads(run_shoal(["status", "--json"], agent_env, check=True).stdout)["pid"] == agent.info["pid"]


def test_quota_evicts_the_least_recently_used_unpinned_model_never_a_pinned_or_busy_one(env, hub, oss, tmp_path):
    from agent.testing.models import make_model
    del env["SHOAL_OSS_BUCKET"]
    dirs = {}
    for name in ("a", "b", "c"):  # three models of other weights (the cache keeps shared files once)
        dirs[name] = make_model(tmp_path / f"origin-{name}", weights_bytes=2 * 1024 * 1024 + 12345, seed=name)
        hub.add_model(f"lab/{name}", dirs[name])
    size = sum(p.stat().st_size for p in dirs["a"].rglob("*") if p.is_file())
    env["SHOAL_QUOTA"] = str(int(size * 2.5))  # two models fit, three do not
    run_shoal(["pull", "lab/a"], env, check=True)
    run_shoal(["pin", "lab/a"], env, check=True)
    run_shoal(["pull", "lab/b"], env, check=True)
    proc = run_shoal(["pull", "lab/c", "--json"], env, check=True)
    assert [e for e in events(proc.stdout) if e["event"] == "evicted"][0]["model"] == "lab/b@master"
    held = {m["model"] for m in json.loads(run_shoal(["ls", "--json"], env, check=True).stdout)}
    assert held == {"lab/a", "lab/c"}
    # lab/c in use (a running job holds it), lab/a pinned: nothing may go, so the pull is refused up front.
    from agent.manifest import ModelRef
    from agent.store import Store
    store = Store(env["SHOAL_CACHE_DIR"])
    fd = store.use(ModelRef("lab/c"))
    try:
        proc = run_shoal(["pull", "lab/b"], env)
        assert proc.returncode == 9, proc.stderr
        assert "Cache quota exceeded" in proc.stderr and "pinned or in use" in proc.stderr
    finally:
        store.release(fd)
        store.close()
    assert not (Path(env["SHOAL_CACHE_DIR"]) / "models" / "lab" / "b").exists()
    du = json.loads(run_shoal(["du", "--json"], env, check=True).stdout)
    # Bytes on disk, counted once: lab/a and lab/c share their tokenizer and generation config.
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size
                for name in ("a", "c") for p in dirs[name].rglob("*") if p.is_file()}
    assert du["usage_bytes"] == sum(distinct.values()) < 2 * size and du["quota_bytes"] == int(size * 2.5)


def test_a_capped_pull_stays_near_its_rate(agent_env, oss, model_dir):
    mirror(agent_env, model_dir)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    cap = size // 10  # about ten seconds
    agent_env["SHOAL_DOWNLOAD_RATE"] = str(cap)
    process = AgentProcess(agent_env).start()
    try:
        done = events(run_shoal(["pull", MODEL_ID, "--json"], agent_env, check=True, timeout=60).stdout)[-1]
    finally:
        process.stop()
    rate = sum(done["fetched_by_source"].values()) / done["elapsed_s"]
    assert 0.85 * cap <= rate <= 1.15 * cap, f"rate {rate:.0f} B/s against a cap of {cap} B/s"


def test_the_modelscope_sdk_gets_its_files_through_the_gateway(agent, agent_env, oss, hub, model_dir, tmp_path):
    mirror(agent_env, model_dir)
    gateway = agent.info["gateway"]
    proc = run_sdk_download(MODEL_ID, gateway, tmp_path, tmp_path / "snap")  # the SDK checks SHA-256 itself
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(tmp_path / "snap") == tree_digest(model_dir)
    assert hub.faults.data_requests() == []  # bytes came from the mirror via the agent
    listed = json.loads(run_shoal(["ls", "--json"], agent_env, check=True).stdout)
    assert listed[0]["model"] == MODEL_ID and listed[0]["state"] == "complete"
    # The SDK's own not-found error, as against the real hub (an HTTPError carrying the 404).
    proc = run_sdk_download("lab/no-such-model", gateway, tmp_path, tmp_path / "nope")
    assert proc.returncode == 3
    assert "requests.exceptions.HTTPError" in proc.stderr and "404" in proc.stderr
    assert "no model lab/no-such-model" in proc.stderr
    with urllib.request.urlopen(gateway + "/metrics", timeout=10) as r:
        from prometheus_client.parser import text_string_to_metric_families
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(r.read().decode()) for s in family.samples}
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert samples[("shoal_bytes_fetched_total", (("source", "oss"),))] == size
    assert samples[("shoal_chunks_verified_total", ())] == total_chunks(model_dir)
    assert samples[("shoal_cache_bytes", ())] == size
    assert samples[("shoal_active_pulls", ())] == 0


def test_sigterm_mid_pull_then_restart_resumes_without_refetching(agent_env, oss, model_dir):
    mirror(agent_env, model_dir)
    oss.faults.add(Fault("slow", match="files/", delay=0.05))
    process = AgentProcess(agent_env).start()
    client = popen_shoal(["pull", MODEL_ID], agent_env)
    while len(oss.faults.data_requests()) < 12:
        time.sleep(0.01)
    err = process.stop(signal.SIGTERM)
    assert process.proc.returncode == 0 and "stopped; verified chunks are kept" in err
    client.communicate(timeout=30)
    assert client.returncode != 0
    assert not (Path(agent_env["SHOAL_CACHE_DIR"]) / "agent.sock").exists()
    before = len(oss.faults.data_requests())
    oss.faults.clear()
    process = AgentProcess(agent_env).start()
    try:
        done = events(run_shoal(["pull", MODEL_ID, "--json"], agent_env, check=True).stdout)[-1]
    finally:
        process.stop()
    assert before + done["chunks_fetched"] == total_chunks(model_dir)
    assert tree_digest(Path(agent_env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master") == tree_digest(model_dir)


def test_a_second_agent_on_the_same_store_is_refused(agent, agent_env):
    proc = run_shoal(["agent"], agent_env, timeout=30)
    assert proc.returncode == 8 and "another shoal agent already serves" in proc.stderr


def test_config_show_masks_secrets_and_set_changes_a_limit(agent, agent_env):
    shown = run_shoal(["config", "show"], agent_env, check=True).stdout
    assert "test-key-secret" not in shown and "***" in shown and "SHOAL_QUOTA" in shown
    run_shoal(["config", "set", "download_rate", "5MB"], agent_env, check=True)
    assert json.loads(run_shoal(["status", "--json"], agent_env, check=True).stdout)["download_rate"] == 5_000_000
    proc = run_shoal(["config", "set", "upload_slots", "0"], agent_env)
    assert proc.returncode == 2


def test_the_control_api_lists_and_cancels_jobs(agent, agent_env):
    from agent.launcher.jobs import JobStore
    from agent.rpc import ControlClient
    jobs = JobStore(agent_env["SHOAL_CACHE_DIR"])
    job = jobs.start("run", "lab/x", [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"])
    client = ControlClient(str(Path(agent_env["SHOAL_CACHE_DIR"]) / "agent.sock"))
    deadline = time.monotonic() + 20
    while client.call("jobs")[0]["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    [listed] = client.call("jobs")
    assert listed["id"] == job.id and listed["state"] == "running"
    while "working" not in client.call("job_log", {"job": job.id})["log"] and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.call("job_cancel", {"job": job.id})
    assert cancelled["state"] == "cancelled"
    with pytest.raises(Exception, match="no job"):
        client.call("job_log", {"job": "nope"})


def test_an_embedded_agent_stops_when_the_process_that_started_it_dies(agent_env, tmp_path):
    """As `shoal tui` starts one: the UI killed (a closed terminal, SIGKILL) leaves no agent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(agent_env, PYTHONPATH=os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)]))
    code = ("import os, subprocess, sys, time\n"
            "env = dict(os.environ, SHOAL_EXIT_WITH_PARENT=str(os.getpid()))\n"
            "child = subprocess.Popen([sys.executable, '-m', 'agent.cli', 'agent'], env=env,\n"
            "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    wait_for(lambda: (Path(agent_env["SHOAL_CACHE_DIR"]) / "agent.json").exists(), 30, "the embedded agent")
    parent.kill()
    parent.wait()
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
             15, "the orphaned agent to stop")
    assert not (Path(agent_env["SHOAL_CACHE_DIR"]) / "agent.json").exists()
