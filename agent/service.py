"""``shoal agent``: the long-lived service every workstation runs. ``Agent`` is its
composition root: it builds each part once and hands each only what it uses.

Parts (one per process):
- the **store** (``agent.store``) and the **sources** a pull tries (``agent.sources``),
  with one download rate limit for the machine;
- the **pulls** (``agent.pulls.PullCoordinator``): one per model, shared by every client;
- the **control API** on a Unix socket (``agent.control`` serving ``agent.api``'s table),
  used by the CLI and the TUI;
- the **ModelScope-compatible gateway** and **Prometheus metrics** on 127.0.0.1
  (``agent.gateway``, ``agent.metrics``);
- with ``SHOAL_SWARM=1``, the **LAN swarm** (``agent.swarm.membership.Swarm``): peers find
  it, fetch what it holds, and every pull asks them first;
- **jobs** and **chat sessions** (``agent.launcher``), with the device probe.

Control API handlers get the agent and read these attributes: ``settings``, ``store``,
``sources``, ``pulls``, ``download``, ``upload``, ``upload_slots``, ``swarm``, ``jobs``,
``chats``, ``devices``, ``gateway_url``, ``started``.

Reload: SIGHUP (``systemctl reload shoal-agent``) or the control API's ``reload`` ends
``serve``; ``shoal agent`` then starts again in the same process (same pid) with the
settings read afresh, e.g. after ``shoal room join``.

Resource handling: ``serve`` holds ``agent.lock`` in the cache directory for its whole
life (two agents never share a store), removes its socket and ``agent.json`` on the way
out, and SIGTERM/SIGINT cancel it like any trio task: chunks being written finish,
verified chunks are kept, the next start resumes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path

import trio

from agent import __version__
from agent.config import Settings, points_at_gateway
from agent.errors import AgentRunning
from agent.metrics import Metrics
from agent.pulls import PullCoordinator
from agent.ratelimit import DownloadRates, TokenBucket
from agent.schedule import parse as parse_schedule
from agent.safefs import SafeDir
from agent.sources import make_sources
from agent.store import Store
from agent.swarm.trust import TrustPolicy, parse_publishers

log = logging.getLogger("shoal.agent")

LAG_TICK = 0.25
LAG_WINDOW = 10.0


class Agent:
    """See module docstring."""

    def __init__(self, settings: Settings):
        from agent.api.jobs import DeviceProbe
        from agent.launcher.jobs import JobStore
        from agent.launcher.sessions import ChatSessions
        self.settings = settings
        self.started = time.time()
        self.store = Store(settings.cache_dir)
        self.sources = make_sources(settings)
        self.download = DownloadRates(settings.download_rate, settings.outside_download_rate)
        self.upload = TokenBucket(settings.upload_rate)
        # The caps as set (the settings, `shoal config set`); a rule of the rate schedule
        # overrides them in its hours (agent.schedule); ``caps_hours``: the rule in force.
        self.base_caps = {"download_rate": settings.download_rate,
                          "outside_download_rate": settings.outside_download_rate,
                          "upload_rate": settings.upload_rate}
        self.rate_rules = parse_schedule(settings.rate_schedule)
        self.caps_hours: str | None = None
        self.upload_slots = trio.CapacityLimiter(settings.upload_slots)
        self.swarm = None  # agent.swarm.membership.Swarm once serving, when settings.swarm
        self.room = None  # agent.assign.keeper.RoomWork with the swarm: the room's assignments
        self.metrics = Metrics(cache_bytes=self.store.usage, quota_bytes=lambda: settings.quota or 0,
                               active_pulls=lambda: len(self.pulls),
                               peers=lambda: 0 if self.swarm is None else self.swarm.connected_count())
        self.pulls = PullCoordinator(settings, sources=self.sources, rate=self.download,
                                     trust=TrustPolicy(parse_publishers(settings.trusted_publishers)),
                                     observe=self.metrics.observe, completed=self.metrics.pulls_done.inc,
                                     swarm=lambda: self.swarm)
        self.jobs = JobStore(settings.cache_dir)
        self.chats = ChatSessions(self.jobs)
        self.devices = DeviceProbe()
        self.gateway_url: str | None = None
        self.reload_requested = False  # serve ends, and `shoal agent` starts again with fresh settings
        self.loop_lag_s = 0.0  # the event loop's worst lateness over the last LAG_WINDOW (status, the soak run)
        self._nursery: trio.Nursery | None = None

    def request_reload(self, why: str, *, after: float = 0.0) -> None:
        """Stop serving (pulls are cancelled, verified chunks kept) so that ``shoal agent``
        starts again in this process with the settings as they are now (a room joined)."""
        async def reload() -> None:
            await trio.sleep(after)  # the caller's answer goes out first
            log.warning("reloading the agent's settings (%s): running pulls stop, pull again to resume", why)
            self.reload_requested = True
            self._nursery.cancel_scope.cancel()
        self._nursery.start_soon(reload)

    def apply_caps(self, caps: dict, hours: str | None) -> None:
        """Put ``caps`` in force (the rate schedule's rule of ``hours``, or the base caps)."""
        self.download.total.set_rate(caps["download_rate"])
        self.download.outside.set_rate(caps["outside_download_rate"])
        self.upload.set_rate(caps["upload_rate"])
        if self.swarm is not None:
            self.swarm.set_upload_rate(caps["upload_rate"])
        if hours != self.caps_hours:
            log.info("rate caps: %s (%s)", ", ".join(f"{k} {v or 'unlimited'}" for k, v in caps.items()),
                     f"the schedule's rule {hours}" if hours else "the settings")
        self.caps_hours = hours

    def caps_now(self) -> dict:
        """The caps in force and whence (`shoal status`, `shoal config show`, the TUI)."""
        return {"download_rate": self.download.total.rate, "outside_download_rate": self.download.outside.rate,
                "upload_rate": self.upload.rate, "rule": self.caps_hours}

    async def _watch_loop_lag(self) -> None:
        """How late the event loop wakes a sleeper (blocking work on it shows here): the
        worst over the last ``LAG_WINDOW`` seconds, for `shoal status` and the soak run."""
        worst, window = 0.0, trio.current_time()
        while True:
            asked = trio.current_time()
            await trio.sleep(LAG_TICK)
            worst = max(worst, trio.current_time() - asked - LAG_TICK)
            if trio.current_time() - window >= LAG_WINDOW:
                self.loop_lag_s, worst, window = worst, 0.0, trio.current_time()

    async def _reload_on_sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                self.request_reload("SIGHUP")
                return

    async def _exit_with_parent(self, parent: int) -> None:
        """An embedded agent (``shoal tui`` started it) stops when its parent is gone, however
        the parent ended (a closed terminal, an ssh drop, SIGKILL): it is reparented, so its
        ppid changes. Checked from the first moment, a reload's re-exec included: an agent
        that finds its parent gone already (it died while this one started) stops at once."""
        while os.getppid() == parent:
            await trio.sleep(1.0)
        log.warning("the process that started this embedded agent (pid %d) is gone: stopping", parent)
        self.reload_requested = False
        self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        self.chats.close_all()
        for source in self.sources:
            source.close()
        self.store.close()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from agent.control import ControlServer
        from agent.gateway import Gateway, serve_gateway
        lock_fd = _take_agent_lock(Path(self.settings.cache_dir))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reload_on_sighup)
                nursery.start_soon(self._watch_loop_lag)
                from agent import memory, memtrace
                nursery.start_soon(memory.trim_forever)  # resident size: what is in use (agent.memory)
                if memtrace.requested():  # a long run's memory report (benchmarks/soak.py --tracemalloc)
                    nursery.start_soon(memtrace.follow, memtrace.requested())
                if self.rate_rules:
                    from agent.schedule import follow
                    nursery.start_soon(follow, self.rate_rules, lambda: self.base_caps, self.apply_caps, time.time)
                parent = os.environ.get("SHOAL_EXIT_WITH_PARENT", "")
                if parent.isdigit():
                    nursery.start_soon(self._exit_with_parent, int(parent))
                # What a kill left half-done (a file linked but not recorded, a blob no model
                # links, a name being made): set right before anything is served.
                for var in ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT"):
                    if points_at_gateway(os.environ.get(var), self.settings.gateway_port):
                        log.info("%s points at this machine's shoal gateway (a tool's setting, e.g. from `shoal env`): "
                                 "not used as an origin; set the agent's origins in its config file "
                                 "(huggingface.endpoint, modelscope.endpoint)", var)
                swept = await trio.to_thread.run_sync(self.store.sweep)
                if any(swept.values()):
                    log.info("the cache after the last stop: %s", swept)
                await nursery.start(self.pulls.run)
                gateway = Gateway(self.settings, self.store, self.sources, self.pulls, self.metrics.render)
                port = await nursery.start(serve_gateway, gateway, self.settings.gateway_port)
                self.gateway_url = f"http://127.0.0.1:{port}"
                if self.settings.swarm:
                    from agent.assign.keeper import RoomWork
                    from agent.swarm.membership import Swarm
                    self.swarm = Swarm(self.settings, self.store, pulls=lambda: self.pulls)
                    await nursery.start(self.swarm.run)
                    self.room = RoomWork(self.settings, self.store, self.pulls, lambda: self.swarm)
                    await nursery.start(self.room.run)
                    self.swarm.answers.room = self.room.answer
                control = ControlServer(self, self.settings.control_group)
                await nursery.start(control.serve, self.settings.socket_path)
                info = {"pid": os.getpid(), "socket": str(self.settings.socket_path),
                        "gateway": self.gateway_url, "version": __version__}
                self.store.root_dir.write_atomic("agent.json", json.dumps(info).encode())
                log.info("agent ready: %s", info)
                task_status.started(info)
        finally:
            if self.store.root_dir.fd >= 0:
                self.store.root_dir.unlink("agent.json", missing_ok=True)
            os.close(lock_fd)


def _take_agent_lock(cache_dir: Path) -> int:
    with SafeDir.open(cache_dir, create=True) as root:
        fd = root.open_file("agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentRunning(f"another shoal agent already serves {cache_dir}; stop it first "
                           "(systemctl stop shoal-agent) or use another SHOAL_CACHE_DIR") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def serve_agent(settings: Settings, *, task_status=trio.TASK_STATUS_IGNORED) -> bool:
    """Run the agent until cancelled (False) or asked to reload its settings (True: SIGHUP,
    or the control API's ``reload``). See module docstring."""
    agent = Agent(settings)
    try:
        await agent.serve(task_status=task_status)
    finally:
        agent.close()
    return agent.reload_requested
