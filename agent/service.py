"""``shoal agent``: the long-lived service every workstation runs.

It owns one store, one set of sources and one download rate limit for the machine, and
serves:
- the **control API** on a Unix socket (``agent.rpc`` framing), used by the CLI and the
  TUI: pull (with progress events), cancel, list, remove, pin/unpin, gc, du, status,
  config, sources, peers;
- the **ModelScope-compatible gateway** and **Prometheus metrics** on 127.0.0.1
  (``agent.gateway``);
- with ``SHOAL_SWARM=1``, the **LAN swarm** (``agent.swarm.membership.Swarm``): peers find
  it, fetch what it holds, and every pull asks them first.

Pulls are shared: a second request for a model already being pulled joins it, so two
people (or a person and a tool through the gateway) on one machine download it once.
A pull is cancelled by ``cancel`` or when its last client goes away.

Resource handling: ``serve_agent`` holds ``agent.lock`` in the cache directory for its
whole life (two agents never share a store), removes its socket on the way out, and
SIGTERM/SIGINT cancel it like any trio task: chunks being written finish, verified
chunks are kept, the next start resumes.
Error handling: a bad call gets an error frame and the connection is closed; nothing a
client sends can stop the agent.
"""

from __future__ import annotations

import contextvars
import fcntl
import grp
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent import __version__
from agent.access import refusal, uid_allowed, unix_peer_uid
from agent.config import Settings, describe, parse_size
from agent.cpu import snapshot as cpu_snapshot
from agent.errors import AgentRunning, Cancelled, NotFound, ShoalError, StoreLocked, UsageError
from agent.manifest import ModelRef, is_manifest_id
from agent.swarm.trust import TrustPolicy
from agent.metrics import Metrics
from agent.pull import event_to_wire, pull, result_to_wire
from agent.sources import make_sources
from agent.ratelimit import TokenBucket
from agent.logs import escape
from agent.errors import ProtocolError
from agent.rpc import FrameDecoder, check_call, encode_frame, error_frame
from agent.safefs import SafeDir
from agent.store import Store, model_row

log = logging.getLogger("shoal.agent")

READ_TIMEOUT = 10.0  # seconds a client has to send its call
SEND_TIMEOUT = 5.0  # seconds a client has to take an answer
EVENT_TIMEOUT = 60.0  # seconds a client following a pull may leave a progress frame unread
SUBSCRIBER_BUFFER = 512  # events queued per client before progress events are dropped
MAX_CONNECTIONS = 256  # control connections at once; one more is told so and closed
MAX_CALLS = 64  # calls being worked on at once (not counting answers waiting to be read)
MAX_DRAIN = 1024 * 1024  # bytes read and dropped from a refused caller


# The uid of the control-API caller being served (each connection runs in its own task).
CALLER_UID: contextvars.ContextVar[int] = contextvars.ContextVar("caller_uid")


@dataclass
class ActivePull:
    """A pull the agent runs; any number of clients follow its events."""

    ref: ModelRef
    directory: Path | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    subscribers: set = field(default_factory=set)
    holders: int = 0
    plan: dict | None = None
    fetched: int = 0
    by_source: dict = field(default_factory=dict)
    result: dict | None = None
    error: ShoalError | None = None
    cancelled_by: str | None = None

    def emit(self, event: dict) -> None:
        if event["type"] == "plan":
            self.plan = event
        elif event["type"] == "chunk":
            self.fetched += event["nbytes"]
            self.by_source[event["source"]] = self.by_source.get(event["source"], 0) + event["nbytes"]
        for channel in list(self.subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                # A slow client loses progress ticks, never the outcome (sent separately).
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(channel)

    def snapshot(self) -> dict:
        total = self.plan["total_bytes"] if self.plan else 0
        done = (self.plan["already_bytes"] if self.plan else 0) + self.fetched
        return {"model": str(self.ref), "done_bytes": min(done, total), "total_bytes": total,
                "clients": self.holders, "by_source": dict(self.by_source)}


class Agent:
    """State shared by the control API, the gateway and the pulls. One per process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.cache_dir)
        self.sources = make_sources(settings)
        self.download = TokenBucket(settings.download_rate)
        self.upload = TokenBucket(settings.upload_rate)
        self.upload_slots = trio.CapacityLimiter(settings.upload_slots)
        self.pulls: dict[str, ActivePull] = {}
        self.metrics = Metrics(self)
        self.started = time.time()
        from agent.launcher.jobs import JobStore
        from agent.launcher.sessions import ChatSessions
        self.jobs = JobStore(settings.cache_dir)
        self.chats = ChatSessions(self.jobs)
        self._devices: dict | None = None
        self.swarm = None  # agent.swarm.membership.Swarm when settings.swarm
        from agent.swarm.trust import parse_publishers
        self.trust = TrustPolicy(parse_publishers(settings.trusted_publishers))
        self.gateway_url: str | None = None
        self._nursery: trio.Nursery | None = None
        # Bounded: a flood of connections waits here instead of growing tasks without end.
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._calls = trio.CapacityLimiter(MAX_CALLS)

    def close(self) -> None:
        self.chats.close_all()
        for source in self.sources:
            source.close()
        self.store.close()

    # ------------------------------------------------------------------ pulls

    def start_pull(self, ref: ModelRef, directory: Path | None) -> ActivePull:
        """The running pull of ``ref``, or a new one. Caller must ``hold``/``release`` it."""
        key = str(ref)
        active = self.pulls.get(key)
        if active is not None:
            if directory is not None and active.directory is not None and directory != active.directory:
                raise StoreLocked(f"{ref} is being pulled into {active.directory} already; "
                                  "wait for it, or cancel it with `shoal cancel`")
            return active
        active = ActivePull(ref, directory)
        self.pulls[key] = active
        self._nursery.start_soon(self._run_pull, active)
        return active

    async def _run_pull(self, active: ActivePull) -> None:
        key = str(active.ref)
        try:
            with active.scope:
                def emit(event) -> None:
                    wire = event_to_wire(event)
                    self.metrics.observe(wire)
                    active.emit(wire)
                session = None
                if self.swarm is not None:
                    asked = time.monotonic()
                    session = self.swarm.session(active.ref, await self.swarm.offers(active.ref))
                    log.info("pull %s: %d offers in %.2f s", key, len(session.offers), time.monotonic() - asked)
                trust = self.trust
                if is_manifest_id(active.ref.revision):  # MODEL@<manifest-id>: the person vouches for it
                    trust = TrustPolicy(trust.publishers, frozenset({active.ref.revision}))
                result = await pull(active.ref, self.settings, to=active.directory, emit=emit,
                                    sources=self.sources, rate=self.download, swarm=session, trust=trust)
                active.result = result_to_wire(result)
                self.metrics.pulls_done.inc()
            if active.scope.cancelled_caught:
                active.error = Cancelled(f"the pull of {active.ref} was cancelled "
                                             f"({active.cancelled_by or 'no client left'}); verified "
                                             "chunks are kept, pull again to resume")
        except ShoalError as e:
            active.error = e
        except Exception as e:  # a bug must not take the agent down with it
            log.exception("pull of %s failed", key)
            active.error = ShoalError(f"internal error in the pull of {key}: {type(e).__name__}: {e}")
        finally:
            self.pulls.pop(key, None)
            active.done.set()
            for channel in list(active.subscribers):
                channel.close()
            log.info("pull %s finished: %s", key, "ok" if active.result else active.error)

    def release(self, active: ActivePull) -> None:
        active.holders -= 1
        if active.holders <= 0 and not active.done.is_set():
            active.cancelled_by = "its last client went away"
            active.scope.cancel()

    async def follow(self, active: ActivePull, on_event) -> dict:
        """Hold ``active`` until it ends, passing its events to ``on_event``; return its result."""
        send, recv = trio.open_memory_channel(SUBSCRIBER_BUFFER)
        active.holders += 1
        try:
            if active.plan is not None:  # a late joiner sees the plan with progress so far
                await on_event({**active.plan, "already_bytes": active.plan["already_bytes"] + active.fetched})
            active.subscribers.add(send)
            if active.done.is_set():  # it ended before we subscribed
                send.close()
            async with recv:
                async for event in recv:
                    await on_event(event)
            await active.done.wait()
        finally:
            active.subscribers.discard(send)
            self.release(active)
        if active.error is not None:
            raise active.error
        return active.result

    # -------------------------------------------------------------- serving

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lock_fd = _take_agent_lock(Path(self.settings.cache_dir))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                from agent.gateway import serve_gateway
                port = await nursery.start(serve_gateway, self, self.settings.gateway_port)
                if self.settings.swarm:
                    await self._start_swarm(nursery)
                self.gateway_url = f"http://127.0.0.1:{port}"
                listener = await _unix_listener(self.settings.socket_path, self.settings.control_group)
                await nursery.start(trio.serve_listeners, self._handle_control, [listener])
                info = {"pid": os.getpid(), "socket": str(self.settings.socket_path),
                        "gateway": self.gateway_url, "version": __version__}
                self.store.root_dir.write_atomic("agent.json", json.dumps(info).encode())
                log.info("agent ready: %s", info)
                task_status.started(info)
        finally:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
            if self.store.root_dir.fd >= 0:
                self.store.root_dir.unlink("agent.json", missing_ok=True)
            os.close(lock_fd)

    # ---------------------------------------------------------- control API

    async def _handle_control(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self._connections.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_after(1):
                    await _try_send(stream, error_frame(ShoalError(
                        f"the agent has {MAX_CONNECTIONS} control connections open; try again shortly")))
                return
            try:
                await self._serve_call(stream)
            finally:
                self._connections.release()

    async def _serve_call(self, stream: trio.SocketStream) -> None:
        """One call: who is calling, the call, the work (under ``MAX_CALLS``), the answer.
        An answer the client does not read within ``SEND_TIMEOUT`` is dropped with the
        connection: it holds no call slot meanwhile, so it delays nobody else."""
        try:
            uid = unix_peer_uid(stream.socket)
            if not uid_allowed(uid, self.settings.control_group):
                await self._refuse(stream, uid)
                return
            CALLER_UID.set(uid)
            async with self._calls:
                with trio.fail_after(READ_TIMEOUT):
                    message = await _read_one(stream)
                method, params = check_call(message)
                model = params.get("model")
                log.log(logging.DEBUG if method in ("status", "list") else logging.INFO,
                        "call %s %s from uid %d", method, escape(model[:300]) if isinstance(model, str) else "", uid)
                handler = getattr(self, f"rpc_{method}", None)
                if handler is None:
                    raise ProtocolError(f"unknown method {method!r}")

                async def send_event(event: dict) -> None:
                    # A client that stops reading this long loses its call, never the agent's time.
                    with trio.fail_after(EVENT_TIMEOUT):
                        await stream.send_all(encode_frame({"event": event}))
                answer = encode_frame({"result": await handler(params, send_event)})
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(answer)
        except trio.TooSlowError:
            with trio.move_on_after(SEND_TIMEOUT):
                await _try_send(stream, error_frame(ProtocolError("no call arrived in time, or the answer "
                                                                  "was not read in time")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; a pull it followed is released by `follow`
        except ShoalError as e:
            with trio.move_on_after(SEND_TIMEOUT):
                await _try_send(stream, error_frame(e))
        except Exception as e:
            log.exception("control call failed")
            with trio.move_on_after(SEND_TIMEOUT):
                await _try_send(stream, error_frame(e))

    async def _refuse(self, stream: trio.SocketStream, uid: int) -> None:
        """Tell another user no, without acting on (or parsing) anything they send."""
        log.warning("control socket: refused uid %d", uid)
        with trio.move_on_after(SEND_TIMEOUT):
            await _try_send(stream, error_frame(ProtocolError(refusal(uid, self.settings.control_group))))
        # Drain (bounded) what they sent, so closing does not reset the connection and
        # destroy the answer before they read it.
        with trio.move_on_after(1):
            drained = 0
            while drained < MAX_DRAIN:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)

    def _ref(self, params: dict) -> ModelRef:
        model = params.get("model")
        if not isinstance(model, str):
            raise UsageError("'model' (OWNER/NAME[@REVISION]) is required")
        return ModelRef.parse(model)

    async def rpc_pull(self, params, send_event):
        ref = self._ref(params)
        to = params.get("to")
        if to is not None:
            # Where the agent writes is its own business and root's: anyone else (the
            # control group) gets the cache's own model folder. See agent.safefs for how
            # the folder itself is then opened.
            if CALLER_UID.get() not in (os.getuid(), 0):
                raise UsageError(f"only the agent's own user (uid {os.getuid()}) or root may pull into a folder "
                                 "of their choosing (--to); leave --to out and use the cache's folder "
                                 "(`shoal ls` shows it)")
            if not isinstance(to, str) or not os.path.isabs(to) or "\0" in to:
                raise UsageError("'to' must be an absolute directory path")
            from agent.pull import check_target
            to = check_target(Path(to), self.settings.cache_dir)
        active = self.start_pull(ref, to)
        return await self.follow(active, send_event)

    async def rpc_cancel(self, params, send_event):
        ref = self._ref(params)
        active = self.pulls.get(str(ref))
        if active is None:
            raise NotFound(f"no pull of {ref} is running")
        active.cancelled_by = "cancelled on request"
        active.scope.cancel()
        await active.done.wait()
        return {"cancelled": str(ref)}

    async def rpc_status(self, params, send_event):
        usage = await trio.to_thread.run_sync(self.store.usage)
        return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - self.started, 1),
                "cache_dir": str(self.settings.cache_dir), "socket": str(self.settings.socket_path),
                "gateway": self.gateway_url, "usage_bytes": usage, "quota_bytes": self.settings.quota,
                "download_rate": self.download.rate, "upload_rate": self.upload.rate,
                "upload_slots": self.upload_slots.total_tokens, "cpu": cpu_snapshot(),
                "pulls": [p.snapshot() for p in self.pulls.values()],
                "sources": [s.label for s in self.sources],
                "swarm": None if self.swarm is None else {
                    "peer_id": self.swarm.self_id, "addrs": self.swarm.node.addrs,
                    "data": list(self.swarm.node.data.address), "tag": self.swarm.access.tag,
                    "open": self.swarm.access.open, "mdns": self.settings.mdns, "dht": self.settings.dht,
                    "asked": {"hello": self.swarm.node.hellos_answered, **self.swarm.node.data.asked}},
                "peers": [] if self.swarm is None else self.swarm.snapshot()}

    async def rpc_list(self, params, send_event):
        models = await trio.to_thread.run_sync(self.store.models)
        return [model_row(m, str(m.ref) in self.pulls) for m in models]

    async def rpc_remove(self, params, send_event):
        ref = self._ref(params)
        if str(ref) in self.pulls:
            raise StoreLocked(f"{ref} is being pulled; `shoal cancel {ref}` first")

        def remove():
            self.store.lock(ref)
            try:
                return self.store.remove(ref)
            finally:
                self.store.unlock(ref)
        return model_row(await trio.to_thread.run_sync(remove), False)

    async def rpc_pin(self, params, send_event):
        return model_row(await trio.to_thread.run_sync(self.store.set_pinned, self._ref(params), True), False)

    async def rpc_unpin(self, params, send_event):
        return model_row(await trio.to_thread.run_sync(self.store.set_pinned, self._ref(params), False), False)

    async def rpc_gc(self, params, send_event):
        evicted = await trio.to_thread.run_sync(self.store.gc, self.settings.quota, self.settings.quota_low)
        return [model_row(m, False) for m in evicted]

    async def rpc_du(self, params, send_event):
        models = await trio.to_thread.run_sync(self.store.models)
        return {"usage_bytes": sum(m.total_size for m in models), "quota_bytes": self.settings.quota,
                "models": [model_row(m, str(m.ref) in self.pulls) for m in models]}

    async def rpc_config_show(self, params, send_event):
        rows = describe(self.settings)
        live = {"download_rate": self.download.rate, "upload_rate": self.upload.rate,
                "upload_slots": self.upload_slots.total_tokens}
        return [[name, str(live[name]) if name in live and live[name] is not None else
                 ("" if name in live else value), env, key] for name, value, env, key in rows]

    async def rpc_config_set(self, params, send_event):
        key, value = params.get("key"), params.get("value")
        try:
            if key == "download_rate":
                self.download.set_rate(parse_size(value))
            elif key == "upload_rate":
                self.upload.set_rate(parse_size(value))
                if self.swarm is not None:
                    self.swarm.node.data.rate.set_rate(parse_size(value))
            elif key == "upload_slots":
                slots = int(value)
                if not 1 <= slots <= 256:
                    raise ValueError(value)
                self.upload_slots.total_tokens = slots
                if self.swarm is not None:
                    self.swarm.node.data.slots = slots
            else:
                raise UsageError(f"{key!r} cannot be changed at run time; the agent takes download_rate, "
                                 "upload_rate and upload_slots (others: edit the config file and restart)")
        except (TypeError, ValueError):
            raise UsageError(f"{value!r} is not a valid value for {key}") from None
        return await self.rpc_config_show({}, send_event)

    async def rpc_sources(self, params, send_event):
        return [{"name": s.name, "label": s.label} for s in self.sources]

    async def rpc_jobs(self, params, send_event):
        from dataclasses import asdict
        return [asdict(j) for j in await trio.to_thread.run_sync(self.jobs.list)]

    async def rpc_job_cancel(self, params, send_event):
        from dataclasses import asdict
        job_id = params.get("job")
        if not isinstance(job_id, str):
            raise UsageError("'job' (a job id) is required")
        if job_id in self.chats.sessions:
            self.chats.close(job_id)
            return asdict(self.jobs.record(job_id))
        return asdict(await trio.to_thread.run_sync(self.jobs.cancel, job_id))

    async def rpc_job_log(self, params, send_event):
        job_id, limit = params.get("job"), params.get("bytes", 64 * 1024)
        if not isinstance(job_id, str) or not isinstance(limit, int) or not 0 < limit <= 512 * 1024:
            raise UsageError("'job' (a job id) is required; 'bytes' is at most 512 KiB")
        path = self.jobs.log_path(job_id)

        def tail() -> str:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - limit))
                return f.read().decode(errors="replace")
        try:
            return {"job": job_id, "log": await trio.to_thread.run_sync(tail)}
        except FileNotFoundError:
            raise NotFound(f"no job {job_id!r}") from None

    async def rpc_model_detail(self, params, send_event):
        ref = self._ref(params)
        info = await trio.to_thread.run_sync(self.store.find, ref)
        files = await trio.to_thread.run_sync(self.store.chunk_map, ref)
        return {**model_row(info, str(ref) in self.pulls), "files": files, "peers": []}

    async def rpc_mirror_models(self, params, send_event):
        oss = next((s for s in self.sources if s.name == "oss"), None)
        if oss is None:
            return []
        found = await trio.to_thread.run_sync(oss.list_models)
        return [{"model": m, "revision": r} for m, r in found]

    async def _devices_report(self) -> dict:
        # Detection imports torch: done once, in a child process, so the agent never loads it.
        if self._devices is None:
            import sys
            from agent.launcher.jobs import job_environment
            result = await trio.run_process([sys.executable, "-m", "agent.cli", "doctor", "--json"],
                                            capture_stdout=True, capture_stderr=True, check=False,
                                            env=job_environment())
            if result.returncode != 0:
                raise ShoalError(f"device detection failed: {result.stderr.decode(errors='replace')[-500:]}")
            self._devices = json.loads(result.stdout)
        return self._devices

    async def _engine(self, command: str, requested: str | None) -> tuple[str, str]:
        from agent.launcher.devices import DeviceReport
        from agent.launcher.launch import choose_engine
        report = await self._devices_report()
        device = DeviceReport(report["device"], report["names"], report["memory"], report["backends"])
        return choose_engine(command, device, requested), device.kind

    async def _ensure_model(self, ref: ModelRef, send_event) -> Path:
        info = None
        try:
            info = await trio.to_thread.run_sync(self.store.find, ref)
        except NotFound:
            pass
        if info is None or info.state != "complete":
            result = await self.follow(self.start_pull(ref, None), send_event)
            return Path(result["directory"])
        return info.dir

    async def rpc_chat_open(self, params, send_event):
        from agent.launcher.launch import chat_argv, resolve_adapter
        ref = self._ref(params)
        engine, device = await self._engine("run", params.get("engine"))
        adapter = None
        if params.get("adapter"):
            adapter = await trio.to_thread.run_sync(resolve_adapter, self.settings, ref, str(params["adapter"]))
        model_dir = await self._ensure_model(ref, send_event)
        argv = chat_argv(model_dir, adapter_dir=adapter, prompt=None, engine=engine, device=device,
                         max_new_tokens=int(params.get("max_new_tokens", 128)), jsonl=True,
                         model_type=params.get("model_type"), template=params.get("template"))
        session = await self.chats.open(str(ref), argv, {"engine": engine, "device": device,
                                                           "adapter": params.get("adapter")})
        return {"session": session.job.id, "engine": engine, "device": device}

    async def rpc_chat_send(self, params, send_event):
        session = self.chats.get(str(params.get("session")))
        content = params.get("content")
        if not isinstance(content, str) or not content.strip():
            raise UsageError("'content' (the message) is required")

        async def delta(text: str) -> None:
            await send_event({"type": "delta", "text": text})
        return {"reply": await session.send(content, delta)}

    async def rpc_chat_close(self, params, send_event):
        self.chats.close(str(params.get("session")))
        return {"closed": params.get("session")}

    async def rpc_train_start(self, params, send_event):
        from dataclasses import asdict
        from agent.launcher.launch import TRAIN_KEYS, check_adapter_free, start_training, train_spec
        ref = self._ref(params)
        spec = await trio.to_thread.run_sync(train_spec, {k: params[k] for k in TRAIN_KEYS if k in params})
        check_adapter_free(self.settings.cache_dir, ref, spec.name)
        engine, device = await self._engine("train", params.get("engine"))
        model_dir = await self._ensure_model(ref, send_event)
        job = await trio.to_thread.run_sync(lambda: start_training(
            self.jobs, self.settings.cache_dir, ref, spec, model_dir, engine=engine, device=device,
            model_type=params.get("model_type"), template=params.get("template")))
        return asdict(job)

    async def rpc_job_progress(self, params, send_event):
        from dataclasses import asdict
        from agent.launcher.launch import read_progress
        job = await trio.to_thread.run_sync(self.jobs.get, str(params.get("job")))
        steps, final = await trio.to_thread.run_sync(read_progress, self.jobs.dir(job.id) / "output")
        return {"job": asdict(job), "steps": steps, "final": final}

    async def rpc_peers(self, params, send_event):
        return [] if self.swarm is None else self.swarm.snapshot()

    # ------------------------------------------------------------------ swarm

    async def _start_swarm(self, nursery) -> None:
        from agent.swarm.membership import Swarm
        self.swarm = Swarm(self.settings, self.store, pulls=lambda: self.pulls)
        await nursery.start(self.swarm.run)



async def _read_one(stream: trio.SocketStream) -> dict:
    decoder = FrameDecoder()
    while True:
        data = await stream.receive_some(64 * 1024)
        if not data:
            raise ProtocolError("connection closed before a whole call arrived")
        messages = decoder.feed(data)
        if messages:
            return messages[0]


async def _try_send(stream, message: dict) -> None:
    try:
        await stream.send_all(encode_frame(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


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


async def _unix_listener(path: Path, group: str | None) -> trio.SocketListener:
    """A listening Unix socket only the owner (and ``group``) can open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.unlink()  # stale: we hold the agent lock, so nobody else serves it
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    sock.listen(MAX_CONNECTIONS)
    return trio.SocketListener(sock)


async def serve_agent(settings: Settings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the agent until cancelled. See module docstring."""
    agent = Agent(settings)
    try:
        await agent.serve(task_status=task_status)
    finally:
        agent.close()
