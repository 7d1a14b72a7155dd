"""The UI's only way to the agent: an ``agent.client.AgentBackend``, run off the UI thread.

``AgentLink.connect`` finds the agent of the configured cache, or starts an embedded one
(``shoal agent`` as a child process, stopped when the UI exits). Every call is blocking
underneath and is made from Textual thread workers; events of a streaming call come back
through a callback the caller marshals onto the UI thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from agent.client import AgentBackend
from agent.config import Settings
from agent.errors import ShoalError
from agent.rpc import ControlClient

START_TIMEOUT = 30.0
LOG_KEEP = 4 * 1024 * 1024  # the embedded agent's log is rotated past this, one old copy kept


def _open_log(path: Path):
    """The embedded agent's log, appended to; rotated (``.1``) when it has grown past ``LOG_KEEP``."""
    try:
        if path.stat().st_size > LOG_KEEP:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    return open(path, "ab")


class AgentLink:
    def __init__(self, settings: Settings, env: dict[str, str] | None = None):
        """``env``: the environment the settings came from, for an embedded agent (default: ours)."""
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        # Always the agent's backend: the UI starts an embedded agent rather than work in-process.
        self.backend = AgentBackend(settings, ControlClient(str(settings.socket_path), timeout=30))
        self.embedded: subprocess.Popen | None = None

    def connect(self) -> str:
        """'running' if an agent was there, 'embedded' if we started one. Blocking."""
        try:
            self.backend.call("ping")
            return "running"
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        log = _open_log(Path(self.settings.cache_dir) / "tui-agent.log") if Path(
            self.settings.cache_dir).is_dir() else subprocess.DEVNULL
        # The agent stops by itself if the UI dies without closing it (agent.service). It runs
        # in a session of its own: a closed terminal's SIGHUP (and a Ctrl-C) is the UI's,
        # not a "reload" of the agent's settings; the UI's end is what stops it.
        env = {**self.env, "SHOAL_SOCKET": str(self.settings.socket_path), "SHOAL_EXIT_WITH_PARENT": str(os.getpid())}
        self.embedded = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--cache-dir", str(self.settings.cache_dir), "agent"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.embedded.poll() is not None:
                raise ShoalError(f"the embedded agent exited ({self.embedded.returncode}); "
                                 f"see {self.settings.cache_dir}/tui-agent.log")
            try:
                self.backend.call("ping")
                return "embedded"
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        raise ShoalError("the embedded agent did not start in 30 s")

    def call(self, method: str, params: dict | None = None, on_event=None, timeout: float | None = None):
        return self.backend.call(method, params, on_event=on_event, timeout=timeout)

    def close(self) -> None:
        if self.embedded is not None and self.embedded.poll() is None:
            self.embedded.terminate()
            try:
                self.embedded.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.embedded.kill()
        self.embedded = None
