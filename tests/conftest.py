"""Shared fixtures. Rules for every networked test here: loopback and port 0 only (the
guard below enforces it, in this process and in every subprocess), and a timeout on
every test (pytest-timeout, see pyproject)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.testing.guard import install

install()

from agent.testing.hub_server import HubServer  # noqa: E402
from agent.testing.models import make_model  # noqa: E402
from agent.testing.oss_server import OssServer  # noqa: E402

TESTS = Path(__file__).parent
REPO = TESTS.parent
MODEL_ID = "lab/tiny-model"
CHUNK = 64 * 1024  # small chunks so a 2 MB model has dozens


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A generated model: ~2.1 MB in 5 files; the 2 weight shards are 17 chunks each."""
    return make_model(tmp_path_factory.mktemp("origin") / "tiny", weights_bytes=2 * 1024 * 1024 + 12345,
                      shards=2, seed="tests")


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A real (tiny, random) Qwen2 model ms-swift and transformers load."""
    from agent.testing.tiny_llm import make_tiny_llm
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "model")


@pytest.fixture
def hub(model_dir):
    with HubServer() as server:
        server.add_model(MODEL_ID, model_dir)
        yield server


@pytest.fixture(scope="session")
def _oss_server():
    with OssServer() as server:
        yield server


@pytest.fixture
def oss(_oss_server):
    """The session's OSS server with a fresh bucket (``oss.bucket``) and no faults."""
    _oss_server.reset()
    _oss_server.bucket = f"lab-{uuid.uuid4().hex[:12]}"
    _oss_server.create_bucket(_oss_server.bucket)
    yield _oss_server
    _oss_server.faults.clear()


@pytest.fixture
def env(tmp_path, hub, oss) -> dict[str, str]:
    """Environment for a ``shoal`` run against the local servers."""
    return {
        "SHOAL_CONFIG": str(tmp_path / "no-config.toml"),
        "SHOAL_CACHE_DIR": str(tmp_path / "cache"),
        "OSS_ENDPOINT": oss.url,
        "SHOAL_OSS_BUCKET": oss.bucket,
        "OSS_ACCESS_KEY_ID": "test-key-id",
        "OSS_ACCESS_KEY_SECRET": "test-key-secret",
        "MODELSCOPE_ENDPOINT": hub.url,
        "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
        "MODELSCOPE_HOME": str(tmp_path / "ms-home"),
        "MODELSCOPE_LOG_LEVEL": "40",
        "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false",
        "SHOAL_CHUNK_SIZE": str(CHUNK),
        "SHOAL_CHUNK_TIMEOUT": "3",
        "SHOAL_CONNECT_TIMEOUT": "2",
        "SHOAL_RETRIES": "2",
        "SHOAL_CONCURRENCY": "4",
        "SHOAL_MDNS": "0",  # multicast would leave loopback; the mDNS test runs in its own namespaces
    }


def wait_for(predicate, timeout: float, what: str):
    """``predicate()``'s first truthy value, asked every 0.3 s for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def run_shoal(args: list[str], env: dict[str, str], *, timeout: float = 120,
              check: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``shoal`` command in a subprocess (loopback guard installed there too)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    full_env.update(env)
    full_env["PYTHONPATH"] = full_env.pop("SHOAL_TEST_PYTHONPATH", None) or os.pathsep.join(
        [str(TESTS / "loopback_guard"), str(REPO)])
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"shoal {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _interruptible() -> None:
    """In the child before exec: SIGINT's default action, unblocked, as a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def popen_shoal(args: list[str], env: dict[str, str], *, interruptible: bool = False) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    full_env.update(env)
    full_env["PYTHONPATH"] = full_env.pop("SHOAL_TEST_PYTHONPATH", None) or os.pathsep.join(
        [str(TESTS / "loopback_guard"), str(REPO)])
    return subprocess.Popen([sys.executable, "-m", "agent.cli", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=_interruptible if interruptible else None)


def mirror(env: dict[str, str], model_dir: Path, *, only: set[str] | None = None) -> None:
    """Push ``model_dir`` (or some of its files, manifest still complete) to the env's bucket."""
    from agent.config import load_settings
    from agent.manifest import ModelRef
    from agent.mirror import manifest_from_dir, push_directory
    settings = load_settings(env=env)
    ref = ModelRef(MODEL_ID, "master")
    push_directory(ref, model_dir, settings, manifest_from_dir(ref, model_dir, CHUNK), only=only)


def tree_digest(root: Path) -> dict[str, str]:
    import hashlib
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sdk_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """The environment of an unmodified ModelScope tool (the SDK, ms-swift) in its own
    process, pointed at ``endpoint`` (the SDK keeps its endpoint in process-wide state)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(MODELSCOPE_ENDPOINT=endpoint, MODELSCOPE_CACHE=str(tmp_path / "ms-cache"),
               MODELSCOPE_HOME=str(tmp_path / "ms-home"), MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false",
               MODELSCOPE_LOG_LEVEL="40", PYTHONPATH=str(TESTS / "loopback_guard") + os.pathsep + str(REPO))
    return env


def run_sdk_download(model_id: str, endpoint: str, tmp_path: Path, local_dir: Path) -> subprocess.CompletedProcess:
    """An unmodified tool: the modelscope SDK's snapshot_download in its own process."""
    env = sdk_env(endpoint, tmp_path)
    code = ("import sys\nfrom modelscope.hub.snapshot_download import snapshot_download\n"
            "try:\n    print(snapshot_download(sys.argv[1], local_dir=sys.argv[2]))\n"
            "except Exception as e:\n    print(f'{type(e).__module__}.{type(e).__name__}: {e}', file=sys.stderr)\n"
            "    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, model_id, str(local_dir)], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


class AgentProcess:
    """A real ``shoal agent`` subprocess. Its output goes to a file beside its cache, never
    to a pipe: nobody reads a pipe while the agent runs, and a chatty agent blocked on a
    full one stalls like a stopped process (and its peers rightly give up on it)."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.cache = Path(env["SHOAL_CACHE_DIR"])
        self.log_path = self.cache.parent / f"{self.cache.name}.agent.log"
        self.proc = None
        self.info = None

    def start(self) -> "AgentProcess":
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
        full_env.update(self.env)
        full_env["PYTHONPATH"] = full_env.pop("SHOAL_TEST_PYTHONPATH", None) or os.pathsep.join(
            [str(TESTS / "loopback_guard"), str(REPO)])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent"], env=full_env, stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (self.cache / "agent.json").exists():
                self.info = json.loads((self.cache / "agent.json").read_text())
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise AssertionError("agent did not start in 30 s")

    def log(self) -> str:
        """Everything the agent has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        return self.log()


def scan_terminal_qr(text: str) -> list[str]:
    """What a phone reads from a QR code drawn in a terminal (``agent.room.qr_text``: block
    characters, two modules per cell, light on dark): the text drawn as an image, then
    decoded by zxing-cpp, a real QR reader, asked for QR codes only: a QR's rows of modules
    can read as a linear barcode (one code here decoded as an extra ITF "1269")."""
    import zxingcpp
    from PIL import Image
    cells = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0), "\xa0": (0, 0)}
    rows = [row for row in text.split("\n") if row and set(row) <= set(cells)]
    if not rows:
        return []
    width, pad = max(len(row) for row in rows), 4
    image = Image.new("L", (width + 2 * pad, 2 * len(rows) + 2 * pad), 255)
    for y, row in enumerate(rows):
        for x, ch in enumerate(row.ljust(width)):
            top, bottom = cells[ch]
            image.putpixel((x + pad, 2 * y + pad), 255 if top else 0)
            image.putpixel((x + pad, 2 * y + 1 + pad), 255 if bottom else 0)
    image = image.resize((image.width * 8, image.height * 8), Image.NEAREST)
    return [found.text for found in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)]


class Tmux:
    """A command in a detached tmux terminal (120x40) the test reads as a person sees it."""

    def __init__(self, name: str, command: str):
        self.session = f"{name}-{os.getpid()}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command],
                       check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True,
                              text=True).stdout

    def wait_for(self, *texts: str, timeout: float = 60) -> str:
        """The screen once it shows every one of ``texts`` (or as it is when time is up)."""
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not all(t in screen for t in texts) and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = self.screen()
        return screen

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.session, key], check=True)

    def quit(self, key: str = "q", timeout: float = 10) -> None:
        """Press ``key`` and wait for the program to end its session."""
        self.keys(key)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and subprocess.run(
                ["tmux", "has-session", "-t", self.session], capture_output=True).returncode == 0:
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)
