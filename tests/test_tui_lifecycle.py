"""`shoal tui`'s embedded agent never outlives its UI, however the UI ends: a closed
terminal (tmux kill-session: SIGHUP to the terminal's processes), an ssh drop (the
terminal's other end vanishes: the tmux server killed), SIGHUP or SIGKILL to the UI, and
after the agent reloaded its settings (a re-exec) in between. A real `shoal tui` in a
real terminal (tmux); the agent is whatever process `agent.json` names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, TESTS

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Terminal:
    """A tmux server of its own (so killing it kills nothing else) running one command."""

    def __init__(self, command: str):
        self.socket = f"shoal-life-{uuid.uuid4().hex[:8]}"
        self.tmux(["new-session", "-d", "-s", "ui", "-x", "100", "-y", "30", command])

    def tmux(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p", "-t", "ui"]).stdout

    def pane_pid(self) -> int:
        return int(self.tmux(["display-message", "-p", "-t", "ui", "#{pane_pid}"]).stdout.strip())

    def server_pid(self) -> int:
        return int(self.tmux(["display-message", "-p", "#{pid}"]).stdout.strip())

    def close(self) -> None:
        self.tmux(["kill-server"])


@pytest.fixture
def ui(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(SHOAL_CONFIG=str(tmp_path / "none.toml"), SHOAL_CACHE_DIR=str(cache), SHOAL_GATEWAY_PORT="0",
               SHOAL_USE_MODELSCOPE="0", SHOAL_SWARM="1", SHOAL_SWARM_HOST="127.0.0.1", SHOAL_MDNS="0",
               SHOAL_DHT="0", TERM="xterm-256color",
               PYTHONPATH=os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)]))
    exports = " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()
                       if k.startswith(("SHOAL_", "PYTHONPATH", "TERM")))
    # As a person's terminal runs it: a shell, and the UI as its job.
    term = Terminal(f"bash --norc -c 'env {exports} {sys.executable} -m agent.cli tui; sleep 600'")
    try:
        info = wait(lambda: json.loads((cache / "agent.json").read_text()) if (cache / "agent.json").exists()
                    else None, 60, "the embedded agent")
        wait(lambda: "agent embedded" in term.screen(), 60, "the UI to show its agent")
        yield term, info["pid"], cache, env
    finally:
        term.close()


def ui_pid(term: Terminal) -> int:
    """The `shoal tui` process: the shell's child in the pane."""
    shell = term.pane_pid()
    children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
    return int(children[0])


@pytest.mark.parametrize("how", ["closed-terminal", "ssh-drop", "sighup", "sigkill"])
def test_the_embedded_agent_stops_with_its_ui(ui, how):
    term, agent, cache, _ = ui
    assert alive(agent)
    if how == "closed-terminal":
        term.tmux(["kill-session", "-t", "ui"])
    elif how == "ssh-drop":  # the terminal's far end vanishes with no goodbye
        os.kill(term.server_pid(), signal.SIGKILL)
    else:
        os.kill(ui_pid(term), signal.SIGHUP if how == "sighup" else signal.SIGKILL)
    wait(lambda: not alive(agent), 20, f"the embedded agent to stop after {how}")
    assert not (cache / "agent.json").exists()  # it stopped cleanly: its lock and socket are gone too
    assert not (cache / "agent.sock").exists()


def test_a_reloaded_embedded_agent_still_stops_with_its_ui(ui):
    from agent.rpc import ControlClient
    term, agent, cache, env = ui
    ControlClient(str(cache / "agent.sock"), timeout=10).call("reload")  # what `shoal room join` asks
    wait(lambda: "reloading" in (cache / "tui-agent.log").read_text(), 20, "the reload")

    def answering():
        try:
            return ControlClient(str(cache / "agent.sock"), timeout=5).call("ping")
        except OSError:
            return None
    wait(answering, 30, "the agent to answer again after its reload")
    assert alive(agent)  # the same process, re-executed
    term.tmux(["kill-session", "-t", "ui"])
    wait(lambda: not alive(agent), 20, "the reloaded agent to stop with its UI")


def test_an_idle_ui_does_not_fill_its_agents_log(ui):
    """The UI polls the agent every second; those calls are not worth a line each."""
    term, agent, cache, _ = ui
    time.sleep(6)
    lines = (cache / "tui-agent.log").read_text().splitlines()
    polls = [line for line in lines if "call " in line and "from uid" in line]
    assert len(polls) <= 2, polls[-5:]
