"""The agent tried as another local user and as a hostile client would: real agent
processes running as root (the agent's own user here), attackers as uid 65534 (nobody) in
their own processes, real sockets and real files. Each test is one defect of the review
(see the README's threat model): it failed before the fix and passes after.

Needs root (to act as another user) and the system Python for the attacker's processes;
skipped otherwise (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.testing.faults import Fault
from conftest import MODEL_ID, REPO, AgentProcess, mirror, run_shoal, tree_digest

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                                 reason="needs root (to act as another user) and the system python3")]
NOBODY = 65534


@pytest.fixture(scope="module")
def attacker_path():
    """A folder every user can read with what an attacker's script imports: our control-API
    client and msgpack (copied: the venv lies under /root, which nobody may enter)."""
    root = Path(tempfile.mkdtemp(prefix="shoal-attacker-"))
    import msgpack
    shutil.copytree(Path(msgpack.__file__).parent, root / "msgpack")
    shutil.copytree(REPO / "agent", root / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(code: str, *args: str, attacker_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", "-c", code, *args], user=NOBODY, group=NOBODY, cwd="/",
                          env={"PYTHONPATH": str(attacker_path), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_socket_dir():
    """A folder nobody can enter for the control socket (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def group_env(env, shared_socket_dir):
    """An agent whose control group (nogroup) holds uid 65534."""
    return {**env, "SHOAL_GATEWAY_PORT": "0", "SHOAL_SOCKET": str(shared_socket_dir / "agent.sock"),
            "SHOAL_CONTROL_GROUP": "nogroup"}


CALL = """
import json, sys
from agent.rpc import ControlClient
try:
    print(json.dumps({"result": ControlClient(sys.argv[1], timeout=30).call(sys.argv[2], json.loads(sys.argv[3]))}))
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def call_as_nobody(sock: str, method: str, params: dict, attacker_path: Path) -> dict:
    proc = as_nobody(CALL, sock, method, json.dumps(params), attacker_path=attacker_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def model_dir_of(env) -> Path:
    return Path(env["SHOAL_CACHE_DIR"]) / "models" / MODEL_ID / "master"


# ------------------------------------------------------------------ 1. where pulls write

def test_a_control_group_member_may_not_assign_to_the_room_nor_have_a_folder_read(group_env, attacker_path,
                                                                                 tmp_path):
    """The room's assignments are signed with the agent's key: only its own user and root may
    make them; a bundle is a folder the agent reads: only they may name one."""
    agent = AgentProcess(group_env).start()
    try:
        stick = Path(tempfile.mkdtemp(prefix="shoal-stick-"))
        stick.chmod(0o777)
        for method, params in (("room_push", {"items": [{"ref": MODEL_ID, "kind": "model"}]}),
                               ("room_retract", {"refs": [MODEL_ID]}), ("bundle_import", {"dir": str(stick)})):
            answer = call_as_nobody(group_env["SHOAL_SOCKET"], method, params, attacker_path)
            assert "only the agent's own user" in answer.get("error", ""), (method, answer)
        shutil.rmtree(stick)
    finally:
        agent.stop()
    assert not (Path(group_env["SHOAL_CACHE_DIR"]) / "room").exists()  # nothing was recorded



def test_a_control_group_member_may_not_choose_where_the_agent_writes(group_env, oss, model_dir, attacker_path,
                                                                       tmp_path):
    mirror(group_env, model_dir)
    agent = AgentProcess(group_env).start()
    try:
        target = Path(tempfile.mkdtemp(prefix="shoal-to-"))
        target.chmod(0o777)
        answer = call_as_nobody(group_env["SHOAL_SOCKET"], "pull", {"model": MODEL_ID, "to": str(target)},
                                attacker_path)
        assert "only the agent's own user" in answer["error"], answer
        assert list(target.iterdir()) == [] and oss.faults.data_requests() == []
        # Without `to`, the member may pull: into the cache's own folder.
        answer = call_as_nobody(group_env["SHOAL_SOCKET"], "pull", {"model": MODEL_ID}, attacker_path)
        assert answer["result"]["directory"] == str(model_dir_of(group_env).resolve()), answer
        shutil.rmtree(target)
    finally:
        agent.stop()


def test_a_pull_into_another_models_folder_is_refused_and_the_victim_is_untouched(env, oss, hub, model_dir):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    mirror(env, model_dir)
    for name in ("lab/intruder", "lab/third"):
        hub.add_model(name, model_dir)
    agent = AgentProcess(env).start()
    try:
        run_shoal(["pull", MODEL_ID], env, check=True)
        victim = model_dir_of(env)
        before = tree_digest(victim)
        for target in (victim, victim.parent, Path(env["SHOAL_CACHE_DIR"]), Path(env["SHOAL_CACHE_DIR"]) / "x"):
            proc = run_shoal(["pull", "lab/intruder", "--to", str(target)], env)
            assert proc.returncode == 5 and "overlaps the cache" in proc.stderr, proc.stderr
        assert tree_digest(victim) == before
        # `shoal rm` of a model removes its listed files only, never a neighbour's.
        outside = Path(tempfile.mkdtemp(prefix="shoal-out-"))
        try:
            run_shoal(["pull", "lab/intruder", "--to", str(outside / "m")], env, check=True)
            for inside in (outside / "m" / "sub", outside / "m", outside):
                proc = run_shoal(["pull", "lab/third", "--to", str(inside)], env)
                assert proc.returncode == 5 and "overlaps the folder of lab/intruder" in proc.stderr, proc.stderr
            (outside / "m" / "notes.txt").write_text("mine")
            run_shoal(["rm", "lab/intruder"], env, check=True)
            assert [p.name for p in (outside / "m").iterdir()] == ["notes.txt"]
        finally:
            shutil.rmtree(outside, ignore_errors=True)
        assert tree_digest(victim) == before
    finally:
        agent.stop()


def test_a_link_planted_in_a_shared_folder_is_never_followed(env, oss, model_dir, attacker_path):
    """The owner pulls into a world-writable folder where another user planted
    ``config.json.partial -> CACHE/identity.key``: the agent refuses, its key is untouched."""
    env = {**env, "SHOAL_GATEWAY_PORT": "0", "SHOAL_SWARM": "1", "SHOAL_SWARM_HOST": "127.0.0.1",
           "SHOAL_SWARM_SECRET": "room"}
    mirror(env, model_dir)
    agent = AgentProcess(env).start()
    shared = Path(tempfile.mkdtemp(prefix="shoal-shared-"))
    try:
        shared.chmod(0o1777)
        key = Path(env["SHOAL_CACHE_DIR"]) / "identity.key"
        key_before = key.read_bytes()
        peer_before = json.loads(run_shoal(["status", "--json"], env, check=True).stdout)["swarm"]["peer_id"]
        plant = ("import os, sys; os.mkdir(sys.argv[1]); os.chmod(sys.argv[1], 0o777); "
                 "os.symlink(sys.argv[2], os.path.join(sys.argv[1], 'config.json.partial'))")
        proc = as_nobody(plant, str(shared / "model"), str(key), attacker_path=attacker_path)
        assert proc.returncode == 0, proc.stderr
        pulled = run_shoal(["pull", MODEL_ID, "--to", str(shared / "model")], env)
        assert pulled.returncode == 5 and "Unsafe path" in pulled.stderr, pulled.stderr
        assert "belongs to uid 65534" in pulled.stderr or "symbolic link" in pulled.stderr
        assert key.read_bytes() == key_before
        # A folder of our own with the same planted link: refused as a link.
        (shared / "mine").mkdir()
        os.symlink(key, shared / "mine" / "config.json.partial")
        pulled = run_shoal(["pull", MODEL_ID, "--to", str(shared / "mine")], env)
        assert pulled.returncode == 5 and "symbolic link" in pulled.stderr, pulled.stderr
        assert key.read_bytes() == key_before
        agent.stop()
        agent = AgentProcess(env).start()
        assert json.loads(run_shoal(["status", "--json"], env, check=True).stdout)["swarm"]["peer_id"] == peer_before
    finally:
        agent.stop()
        shutil.rmtree(shared, ignore_errors=True)


def test_a_served_file_swapped_for_a_link_is_not_served(env, oss, model_dir, attacker_path):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    mirror(env, model_dir)
    agent = AgentProcess(env).start()
    shared = Path(tempfile.mkdtemp(prefix="shoal-shared-"))
    try:
        shared.chmod(0o755)
        target = shared / "model"
        run_shoal(["pull", MODEL_ID, "--to", str(target)], env, check=True)
        target.chmod(0o777)  # a careless owner: others may now replace files in it
        swap = ("import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.old'); os.symlink(sys.argv[2], sys.argv[1])")
        proc = as_nobody(swap, str(target / "config.json"), str(Path(env["SHOAL_CACHE_DIR"]) / "identity.key"),
                         attacker_path=attacker_path)
        assert proc.returncode == 0, proc.stderr
        url = f"{agent.info['gateway']}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 404 and "cannot be served" in refused.value.read().decode()
    finally:
        agent.stop()
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------------- 2. the gateway

GET = """
import sys, urllib.request, urllib.error
request = urllib.request.Request(sys.argv[1], method=sys.argv[2] if len(sys.argv) > 2 else "GET")
try:
    with urllib.request.urlopen(request, timeout=10) as r:
        print(r.status, len(r.read()))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode()[:300])
"""


def test_the_gateway_admits_only_the_agents_users(env, oss, hub, model_dir, attacker_path, shared_socket_dir):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    mirror(env, model_dir)
    run_shoal(["pull", MODEL_ID], env, check=True)
    hub.add_model("lab/uncached", model_dir)
    hub.add_dataset("lab/uncached-data", model_dir)
    agent = AgentProcess(env).start()
    try:
        gateway = agent.info["gateway"]
        cached = f"{gateway}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json"
        uncached = f"{gateway}/api/v1/models/lab/uncached/repo?Revision=master&FilePath=config.json"
        data = f"{gateway}/api/v1/datasets/lab/uncached-data"
        oss.faults.clear_log()
        hub.faults.clear_log()
        hf = (f"{gateway}/{MODEL_ID}/resolve/main/config.json", f"{gateway}/lab/uncached/resolve/main/config.json",
              f"{gateway}/api/models/lab/uncached", f"{gateway}/api/models/lab/uncached/tree/main",
              f"{gateway}/datasets/lab/uncached-data/resolve/main/config.json")
        for url, method in ((cached, "GET"), (f"{gateway}/metrics", "GET"), (uncached, "HEAD"), (uncached, "GET"),
                            (data, "GET"), (f"{data}/repo/tree?Revision=master", "GET"),
                            (f"{data}/repo?Revision=master&FilePath=config.json", "GET"),
                            (hf[0], "GET"), (hf[1], "HEAD"), (hf[1], "GET"), (hf[2], "GET"), (hf[3], "GET"),
                            (hf[4], "GET")):
            out = as_nobody(GET, url, method, attacker_path=attacker_path).stdout
            assert out.startswith("403") and (method == "HEAD" or "uid 65534 may not use this agent" in out), out
        status = json.loads(run_shoal(["status", "--json"], env, check=True).stdout)
        assert status["pulls"] == [] and oss.faults.log() == [] and hub.faults.log() == []
        # The owner gets in.
        with urllib.request.urlopen(cached, timeout=10) as r:
            assert r.read() == (model_dir / "config.json").read_bytes()
    finally:
        err = agent.stop()
    assert "refused a connection from uid 65534" in err
    # A member of the control group gets in too.
    group = {**env, "SHOAL_SOCKET": str(shared_socket_dir / "agent.sock"), "SHOAL_CONTROL_GROUP": "nogroup"}
    agent = AgentProcess(group).start()
    try:
        out = as_nobody(GET, cached.replace(gateway, agent.info["gateway"]), attacker_path=attacker_path).stdout
        assert out.startswith("200"), out
    finally:
        agent.stop()


def test_the_gateway_refuses_other_host_names_and_web_pages(env, oss, model_dir):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    mirror(env, model_dir)
    run_shoal(["pull", MODEL_ID], env, check=True)
    agent = AgentProcess(env).start()
    try:
        for url in (f"{agent.info['gateway']}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json",
                    f"{agent.info['gateway']}/{MODEL_ID}/resolve/main/config.json"):  # ModelScope's and the Hub's
            for headers in ({"Host": "evil.example"}, {"Host": "evil.example:8790"}, {"Origin": "http://evil.example"},
                            {"Host": "127.0.0.1.nip.io"}):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
                assert refused.value.code == 403
            port = agent.info["gateway"].rsplit(":", 1)[1]
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
                with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=10) as r:
                    assert r.status == 200 and r.read() == (model_dir / "config.json").read_bytes()
    finally:
        agent.stop()


def test_head_starts_nothing_and_a_client_that_hangs_up_releases_its_pull(env, oss, model_dir):
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    mirror(env, model_dir)
    oss.faults.add(Fault("slow", match="/files/", delay=3.0))  # no proven byte before the client gives up
    agent = AgentProcess(env).start()
    try:
        url = f"{agent.info['gateway']}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath=config.json"
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == (model_dir / "config.json").stat().st_size
        hf_url = f"{agent.info['gateway']}/{MODEL_ID}/resolve/main/config.json"  # the Hub's HEAD, as hf_hub_download
        with urllib.request.urlopen(urllib.request.Request(hf_url, method="HEAD"), timeout=10) as r:
            assert r.status == 200 and int(r.headers["X-Linked-Size"]) == (model_dir / "config.json").stat().st_size
            assert len(r.headers["X-Repo-Commit"]) == 40 and len(r.headers["ETag"].strip('"')) == 64
        time.sleep(0.5)
        assert json.loads(run_shoal(["status", "--json"], env, check=True).stdout)["pulls"] == []
        assert oss.faults.data_requests() == []
        # A GET that gives up after 2 s: the pull it started stops when it hangs up.
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2).read()
        deadline = time.monotonic() + 10
        while json.loads(run_shoal(["status", "--json"], env, check=True).stdout)["pulls"]:
            assert time.monotonic() < deadline, "the pull outlived its only client"
            time.sleep(0.2)
        asked = len(oss.faults.data_requests())
        time.sleep(1.5)
        assert len(oss.faults.data_requests()) <= asked + 4  # at most what was in flight
    finally:
        err = agent.stop()
    assert "gateway: uid 0 started the pull of lab/tiny-model@master" in err
    assert "went away while lab/tiny-model@master was pulled" in err


SLOWLORIS = """
import socket, sys, time
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"G")
    conns.append(s)
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
alive = 0
for s in conns:
    s.settimeout(0.5)
    try:
        s.sendall(b"E")
        while s.recv(4096):  # an answer (503 for those over the cap), then the close
            pass
    except (socket.timeout, TimeoutError):
        alive += 1  # still open, still waiting for the rest of a request
    except OSError:
        pass  # reset: closed
print("alive", alive, flush=True)
"""


def test_slow_clients_do_not_starve_the_gateway(group_env, attacker_path):
    agent = AgentProcess(group_env).start()
    try:
        port = agent.info["gateway"].rsplit(":", 1)[1]
        attack = subprocess.Popen(["/usr/bin/python3", "-c", SLOWLORIS, port, "64", "12"], user=NOBODY, group=NOBODY,
                                  cwd="/", env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)
        assert attack.stdout.readline().startswith("ready")
        started = time.monotonic()
        with urllib.request.urlopen(agent.info["gateway"] + "/metrics", timeout=5) as r:
            assert r.status == 200
        assert time.monotonic() - started < 1.0
        out, _ = attack.communicate(timeout=60)
        # Past the header deadline every one of the 64 was closed.
        assert out.strip().endswith("alive 0"), out
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def gateway_agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    env = {"SHOAL_CONFIG": str(root / "none.toml"), "SHOAL_CACHE_DIR": str(root / "cache"),
           "SHOAL_GATEWAY_PORT": "0", "SHOAL_USE_MODELSCOPE": "1", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}
    agent = AgentProcess(env).start()
    yield agent
    agent.stop()


def test_garbage_request_heads_get_an_answer_or_a_close_and_the_gateway_stays_up(gateway_agent):
    from hypothesis import given, settings, strategies as st
    port = int(gateway_agent.info["gateway"].rsplit(":", 1)[1])
    # Targets that once took the gateway down (tests/fuzz_corpus/gateway_request/): answered.
    for target in ("//v[/1dpi/", "//[::1/x", "//host/api/models/a/b", "/%ff%00/..//?a=%zz#x"):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            conn.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("latin-1"))
            assert conn.recv(64).startswith(b"HTTP/1.1 4"), target
    token = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)

    @settings(max_examples=80, deadline=None)
    @given(method=st.sampled_from(["GET", "HEAD", "POST", "G\x00T", ""]) | token, target=token,
           headers=st.lists(st.tuples(token, token), max_size=6), raw=st.binary(max_size=120))
    def one(method, target, headers, raw):
        head = f"{method} /{target} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            try:
                conn.sendall(head.encode("latin-1") + raw + b"\r\n\r\n")
                reply = conn.recv(64)
            except OSError:  # closed on us: an answer of sorts
                return
        assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply
    one()
    with urllib.request.urlopen(gateway_agent.info["gateway"] + "/metrics", timeout=10) as r:
        assert r.status == 200


# ----------------------------------------------------------------------- the control API

def test_clients_that_never_read_their_answer_do_not_block_the_agent(env):
    from agent.launcher.jobs import JobStore
    from agent.rpc import encode_frame
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    agent = AgentProcess(env).start()
    conns = []
    try:
        jobs = JobStore(env["SHOAL_CACHE_DIR"])
        job = jobs.new_record("run", MODEL_ID, ["true"], {})
        jobs.save(job)
        jobs.log_path(job.id).write_bytes(b"x" * (600 * 1024))
        for _ in range(64):
            conn = socket.socket(socket.AF_UNIX)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.connect(str(Path(env["SHOAL_CACHE_DIR"]) / "agent.sock"))
            conn.sendall(encode_frame({"method": "job_log", "params": {"job": job.id, "bytes": 512 * 1024}}))
            conns.append(conn)
        time.sleep(1)
        started = time.monotonic()
        status = json.loads(run_shoal(["status", "--json"], env, check=True, timeout=30).stdout)
        assert status["pid"] == agent.info["pid"] and time.monotonic() - started < 9
    finally:
        for conn in conns:
            conn.close()
        agent.stop()


def test_a_model_name_cannot_forge_a_log_line(env):
    from agent.rpc import ControlClient
    env = {**env, "SHOAL_GATEWAY_PORT": "0"}
    agent = AgentProcess(env).start()
    forged = "lab/x\n2026-01-01 00:00:00 INFO shoal.agent: pull lab/tiny-model@master finished: ok"
    try:
        with pytest.raises(Exception, match="is not of the form"):
            ControlClient(str(Path(env["SHOAL_CACHE_DIR"]) / "agent.sock")).call("pull", {"model": forged})
    finally:
        err = agent.stop()
    assert "finished: ok" not in "".join(line for line in err.splitlines() if line.startswith("2026-01-01"))
    assert "lab/x\\n2026-01-01" in err  # logged, escaped, on one line


# ------------------------------------------------------------------ locks, jobs, the unit

def test_lock_names_are_one_to_one():
    from agent.manifest import ModelRef
    from agent.store.folders import lock_name
    refs = [ModelRef("a--b/c"), ModelRef("a/b--c"), ModelRef("a/b", "c--d"), ModelRef("a/b--c", "d"),
            ModelRef("a/b+lora/c"), ModelRef("a/b-lora-c"), ModelRef("a/b", "master")]
    names = [lock_name(r) for r in refs]
    assert len(set(names)) == len(names) and all("/" not in n for n in names)


def test_two_models_whose_old_lock_names_collided_can_be_pulled_at_once(tmp_path):
    from agent.manifest import ModelRef
    from agent.store import Store
    store = Store(tmp_path / "cache")
    try:
        store.lock(ModelRef("a--b/c"))
        store.lock(ModelRef("a/b--c"))  # raised StoreLocked before
    finally:
        store.close()


def test_jobs_do_not_inherit_the_agents_credentials(tmp_path):
    from agent.launcher.jobs import JobStore
    jobs = JobStore(tmp_path / "cache")
    env = {**os.environ, "OSS_ACCESS_KEY_ID": "LTAI-key", "OSS_ACCESS_KEY_SECRET": "s3cret",
           "OSS_SESSION_TOKEN": "sts", "SHOAL_SWARM_SECRET": "room-101", "MODELSCOPE_API_TOKEN": "ms",
           "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "ak", "PYTHONPATH": str(REPO)}
    job = jobs.start("run", MODEL_ID, [sys.executable, "-c", "import os, json; print(json.dumps(dict(os.environ)))"],
                     env=env)
    deadline = time.monotonic() + 30
    while not jobs.get(job.id).final:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    seen = json.loads(next(line for line in jobs.log_path(job.id).read_text().splitlines() if line.startswith("{")))
    assert not {"OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN", "SHOAL_SWARM_SECRET",
                "MODELSCOPE_API_TOKEN", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"} & set(seen)
    assert "s3cret" not in json.dumps(seen) and seen["PATH"] == os.environ["PATH"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_systemd_unit_is_hardened():
    unit = REPO / "bootstrap" / "shoal-agent.service"
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "Overall exposure level" in proc.stdout and ("OK" in proc.stdout or "SAFE" in proc.stdout)


def test_an_open_swarm_on_a_lan_address_is_refused(env):
    proc = run_shoal(["agent"], {**env, "SHOAL_GATEWAY_PORT": "0", "SHOAL_SWARM": "1", "SHOAL_SWARM_HOST": "0.0.0.0"},
                     timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "open to anyone" in proc.stderr and "SHOAL_SWARM_SECRET" in proc.stderr and "swarm.open" in proc.stderr


def test_the_identity_key_is_refused_when_others_may_read_it(env):
    from agent.swarm.trust import Identity
    key = Path(env["SHOAL_CACHE_DIR"]) / "identity.key"
    Identity.load_or_create(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)
    proc = run_shoal(["id"], env)
    assert proc.returncode == 2 and "chmod 600" in proc.stderr
