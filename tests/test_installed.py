"""shoal as a lab installs it, not as the checkout runs it.

The sdist and the wheel are built from the files git tracks (the wheel from the sdist, as
``python -m build`` does), ``twine check`` reads their metadata, and the wheel is installed
into a fresh virtual environment with nothing of the checkout on ``sys.path``. From there,
the first run of every command a new user types: ``shoal --version``, ``doctor``, ``demo``,
``tui`` (in tmux: the Models tab, no traceback) and ``run`` on the tiny model.

Then ``bootstrap/install-agent`` for real, into a scratch root (``--root``) with a
throwaway service user (``--user``): the agent starts from the installed files as that
user, a lab user in its group pulls through it and a user outside it is refused, an
upgrade in place keeps the cache, the identity and the room, ``--uninstall`` leaves the
cache and the settings only, and ``--purge`` leaves nothing (the user and group gone too).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from agent.testing.tiny_llm import make_tiny_llm
from conftest import MODEL_ID, REPO, TESTS, Tmux, run_shoal, tree_digest

pytestmark = pytest.mark.timeout(600)

TINY = "lab/tiny-chat"
VERSION = "0.1.0"


def tracked_files() -> list[str]:
    """What a clean clone holds: tracked files plus new ones not ignored (so a file added
    but not yet committed is built too, as it will be after the commit)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """An sdist and a wheel built from a copy of the tracked files, without the network
    (``--no-isolation``: the build backend is the test environment's setuptools)."""
    base = tmp_path_factory.mktemp("dist")
    src = base / "src"
    for name in tracked_files():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    out = base / "out"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sdist] = out.glob("shoal-*.tar.gz")
    [wheel] = out.glob("shoal-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_the_sdist_and_the_wheel_build_and_pass_twine_check(dist):
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dist["sdist"]), str(dist["wheel"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    assert "tui/app.tcss" in names  # read at run time by `shoal tui`
    assert {n.split("/")[0] for n in names} == {"agent", "tui", f"shoal-{VERSION}.dist-info"}, sorted(
        {n.split("/")[0] for n in names})
    metadata = zipfile.ZipFile(dist["wheel"]).read(f"shoal-{VERSION}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Provides-Extra: run" in metadata
    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "LICENSE", "tui/app.tcss"} <= members
    assert not any(name.endswith(".whl") for name in members)


# -------------------------------------------------------------------- the wheel, installed


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and the extras a lab adds for the demo
    (``servers``) and for launching (``run``), from the package index as a lab has it.
    ``--no-compile``: pip's byte-compiling of torch, transformers and ms-swift was 60 % of
    this install (368 s against 144 s here) and tests nothing of ours; Python compiles what
    is imported when it is imported."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
                           "--disable-pip-version-check", f"shoal[servers,run] @ {dist['wheel'].as_uri()}"],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


def installed_env(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: the installed ``shoal`` first on PATH, a home of its own, and
    nothing of the checkout importable (only the loopback guard, which imports the
    installed ``agent.testing.guard``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_", "PYTHON", "VIRTUAL_ENV"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", HOME=str(home),
               PYTHONPATH=str(TESTS / "loopback_guard"), SHOAL_CONFIG=str(home / "no-config.toml"),
               SHOAL_CACHE_DIR=str(home / "cache"), MODELSCOPE_CACHE=str(home / "ms-cache"),
               SHOAL_GATEWAY_PORT="0", **extra)
    return env


def shoal(venv: Path, args: list[str], env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "shoal"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    env = installed_env(installed, tmp_path / "home")
    proc = subprocess.run([str(installed / "bin" / "python"), "-c",
                           "import agent, tui, sys; print(agent.__file__); print(tui.__file__)"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    for path in proc.stdout.split():
        assert Path(path).is_relative_to(installed) and not Path(path).is_relative_to(REPO), path


def test_version_and_doctor_as_installed(installed, tmp_path):
    env = installed_env(installed, tmp_path / "home")
    proc = shoal(installed, ["--version"], env, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"shoal {VERSION}", proc.stdout + proc.stderr
    proc = shoal(installed, ["doctor", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["device"] in ("cpu", "cuda", "npu", "mps")
    assert report["backends"]["torch"].startswith("2.13.0") and report["backends"]["ms-swift"] == "4.6.0"
    assert "Traceback" not in proc.stderr


def test_demo_as_installed(installed, tmp_path):
    env = installed_env(installed, tmp_path / "home")
    proc = shoal(installed, ["demo", "--size-mb", "8", "--workdir", str(tmp_path / "demo")], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verified" in (proc.stdout + proc.stderr).lower() and "Traceback" not in proc.stderr


@pytest.fixture
def tiny_hub(hub, tmp_path_factory):
    hub.add_model(TINY, make_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "model"))
    return hub


def test_run_on_the_tiny_model_as_installed(installed, tiny_hub, tmp_path):
    env = installed_env(installed, tmp_path / "home", MODELSCOPE_ENDPOINT=tiny_hub.url,
                        SHOAL_CHUNK_SIZE=str(64 * 1024), MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false")
    proc = shoal(installed, ["run", TINY, "--prompt", "hello", "--max-new-tokens", "8", "--json",
                             "--model-type", "qwen2", "--template", "qwen"], env, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(reply["reply"], str) and reply["reply"]
    assert tiny_hub.faults.data_requests()  # the weights came from the hub, through shoal


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_tui_as_installed_shows_the_models_tab(installed, hub, tmp_path):
    env = installed_env(installed, tmp_path / "home", MODELSCOPE_ENDPOINT=hub.url, TERM="xterm-256color",
                        MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false")
    proc = shoal(installed, ["pull", MODEL_ID], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    exports = " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()
                       if k.startswith(("SHOAL_", "MODELSCOPE_", "PYTHONPATH", "TERM", "HOME", "PATH")))
    # Textual draws on stderr: the pane shows a traceback if there is one.
    term = Tmux("shoal-installed", f"cd {tmp_path} && env -i {exports} {installed / 'bin' / 'shoal'} tui")
    try:
        screen = term.wait_for(MODEL_ID)
        assert "Models" in screen and MODEL_ID in screen, screen
        assert "Traceback" not in screen and "Error" not in screen, screen
        term.quit()
    finally:
        term.close()


# ------------------------------------------------------------- install-agent, for real


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def scratch_root():
    """A directory every user may traverse (pytest's own tmp is 0700 root's), and a
    throwaway service user name; both gone afterwards whatever happens."""
    root = Path(tempfile.mkdtemp(prefix="shoal-root-", dir="/tmp"))
    root.chmod(0o755)
    user = f"shoalci{os.getpid() % 100000}"
    yield root, user
    subprocess.run(["userdel", f"{user}lab"], capture_output=True)
    subprocess.run(["userdel", user], capture_output=True)
    subprocess.run(["groupdel", user], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def install_agent(root: Path, user: str, *args: str, wheel: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "PYTHON", "VIRTUAL_ENV"))}
    if wheel is not None:
        env["SHOAL_WHEEL"] = str(wheel)
    proc = subprocess.run([str(REPO / "bootstrap" / "install-agent"), "--root", str(root), "--user", user, *args],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_installed_agent(root: Path, user: str, hub_url: str) -> subprocess.Popen:
    """As the unit runs it: the service user, the installed command, the installed settings
    (the gateway on a free port: 8790 may be taken on a test machine)."""
    env = {"PATH": "/usr/bin:/bin", "SHOAL_CONFIG": str(root / "etc/shoal/config.toml"),
           "MODELSCOPE_ENDPOINT": hub_url, "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false", "SHOAL_GATEWAY_PORT": "0",
           "PYTHONPATH": str(TESTS / "loopback_guard"), "HOME": str(root / "var/cache/shoal"),
           # In a room the swarm listens on loopback only here, and asks nobody by multicast.
           "SHOAL_SWARM_HOST": "127.0.0.1", "SHOAL_SWARM_PORT": "0", "SHOAL_MDNS": "0"}
    log = open(root / "agent.log", "ab")
    agent = subprocess.Popen([str(root / "usr/local/bin/shoal"), "agent"], env=env, user=user, group=user,
                             extra_groups=[], cwd="/", stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    info = root / "var/cache/shoal/agent.json"
    deadline = time.monotonic() + 60
    while not info.exists():
        assert agent.poll() is None, (root / "agent.log").read_text()
        assert time.monotonic() < deadline, "the installed agent did not start in 60 s"
        time.sleep(0.1)
    return agent


def as_user(root: Path, user: str | int, args: list[str]) -> subprocess.CompletedProcess:
    """``shoal ARGS`` as ``user``, with that user's groups (as a login gives them)."""
    entry = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "SHOAL_CONFIG": str(root / "etc/shoal/config.toml"), "HOME": "/nonexistent",
           "PYTHONPATH": str(TESTS / "loopback_guard")}
    return subprocess.run([str(root / "usr/local/bin/shoal"), *args], env=env, user=entry.pw_uid,
                          group=entry.pw_gid, extra_groups=groups, cwd="/", capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0, reason="install-agent creates a system user: run the suite as root")
def test_install_agent_into_a_scratch_root_then_upgrade_and_uninstall(dist, hub, scratch_root, model_dir, tmp_path):
    root, user = scratch_root
    proc = install_agent(root, user, wheel=dist["wheel"])
    assert "systemd is not driven here" in proc.stdout
    gid = grp.getgrnam(user).gr_gid
    assert pwd.getpwnam(user).pw_shell == "/usr/sbin/nologin"
    config = (root / "etc/shoal/config.toml").read_text()
    assert f'cache_dir = "{root}/var/cache/shoal"' in config and f'control_group = "{user}"' in config
    unit = (root / "etc/systemd/system/shoal-agent.service").read_text()
    assert f"User={user}" in unit and f"ExecStart={root}/opt/shoal/venv/bin/shoal agent" in unit
    credentials = (root / "etc/shoal/credentials.env").stat()
    assert credentials.st_mode & 0o777 == 0o600 and credentials.st_uid == pwd.getpwnam(user).pw_uid
    assert (root / "usr/local/bin/shoal").resolve() == root / "opt/shoal/venv/bin/shoal"

    # The installed agent, as its user; a lab user the admin added to the group pulls through it.
    lab_user = f"{user}lab"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", user, lab_user],
                   check=True)
    agent = start_installed_agent(root, user, hub.url)
    try:
        pulled = as_user(root, lab_user, ["pull", MODEL_ID, "--json"])
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr + (root / "agent.log").read_text()
        model = root / "var/cache/shoal/models" / MODEL_ID / "master"
        assert tree_digest(model) == tree_digest(model_dir)
        assert all(p.stat().st_uid == pwd.getpwnam(user).pw_uid for p in model.rglob("*"))
        # A user outside the group: refused, told why and what to do.
        outsider = as_user(root, 65534, ["ls"])
        assert outsider.returncode != 0 and user in outsider.stderr and "group" in outsider.stderr, outsider.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    # Upgrade in place, joining a room on the way: the cache and the lab's edits kept.
    with open(root / "etc/shoal/config.toml", "a") as f:
        f.write("# edited by the lab\n")
    teacher = {"SHOAL_CONFIG": str(tmp_path / "teacher.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "teacher")}
    code = run_shoal(["room", "create", "Lab 3", "--addr", "127.0.0.1"], teacher, check=True).stdout
    code = next(word for word in code.split() if word.startswith("SHOAL-"))
    proc = install_agent(root, user, "--join", code, wheel=dist["wheel"])
    assert code not in proc.stdout + proc.stderr  # the code is a secret: never echoed
    assert (root / "etc/shoal/config.toml").read_text().endswith("# edited by the lab\n")
    assert tree_digest(root / "var/cache/shoal/models" / MODEL_ID / "master") == tree_digest(model_dir)
    room = root / "etc/shoal/room.toml"
    assert room.stat().st_mode & 0o777 == 0o640 and room.stat().st_gid == gid
    agent = start_installed_agent(root, user, hub.url)  # the service user reads its room: the swarm is on
    try:
        status = json.loads(as_user(root, lab_user, ["status", "--json"]).stdout)
        assert status["swarm"] is not None and status["swarm"]["open"] is False, status["swarm"]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    (root / "agent.log").unlink()

    # Upgrade again: the agent's identity (its swarm key) and the room kept as well.
    identity, room_text = (root / "var/cache/shoal/identity.key").read_bytes(), room.read_text()
    install_agent(root, user, wheel=dist["wheel"])
    assert (root / "var/cache/shoal/identity.key").read_bytes() == identity and room.read_text() == room_text

    # Uninstall: the cache and the settings stay; the program, command and unit go.
    install_agent(root, user, "--uninstall")
    left = _files_under(root)
    assert left and all(name.startswith(("var/cache/shoal/", "etc/shoal/")) for name in left), sorted(left)
    assert not (root / "opt/shoal").exists() and not (root / "usr/local/bin/shoal").exists()
    # Purge: nothing, and no user or group.
    subprocess.run(["userdel", lab_user], check=True)
    install_agent(root, user, "--purge")
    assert _files_under(root) == set()
    assert subprocess.run(["id", user], capture_output=True).returncode != 0
    assert subprocess.run(["getent", "group", user], capture_output=True).returncode != 0
