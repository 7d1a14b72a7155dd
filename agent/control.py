"""The control socket: who may call, one call per connection, the answer.

A connection's peer uid comes from the kernel (``SO_PEERCRED``); only the agent's own
user, root and ``agent.control_group`` are served (``agent.access``), anyone else is told
so without a byte of theirs being parsed. A call is looked up in the control API table
(``agent.api``), its parameters are checked against the method's record, and its handler
runs with the agent. Bounded everywhere: connections (``MAX_CONNECTIONS``), calls being
worked on (``MAX_CALLS``), time to send a call (``READ_TIMEOUT``), to take a progress
event (``EVENT_TIMEOUT``) and the answer (``SEND_TIMEOUT``), frame size (``agent.rpc``).
Error handling: a bad call gets an error frame (its class crosses the socket) and the
connection is closed; nothing a client sends can stop the agent.
"""

from __future__ import annotations

import grp
import logging
import os
from pathlib import Path

import trio

from agent import api
from agent.access import refusal, uid_allowed, unix_peer_uid
from agent.errors import ProtocolError, ShoalError
from agent.logs import escape
from agent.rpc import FrameDecoder, check_call, encode_frame, error_frame

log = logging.getLogger("shoal.agent")

READ_TIMEOUT = 10.0  # seconds a client has to send its call
SEND_TIMEOUT = 5.0  # seconds a client has to take an answer
EVENT_TIMEOUT = 60.0  # seconds a client following a pull may leave a progress frame unread
MAX_CONNECTIONS = 256  # control connections at once; one more is told so and closed
MAX_CALLS = 64  # calls being worked on at once (not counting answers waiting to be read)
MAX_DRAIN = 1024 * 1024  # bytes read and dropped from a refused caller
QUIET = {m.name for m in api.METHODS.values() if m.quiet}


class ControlServer:
    """Serves the control API for ``agent`` (what handlers get) to allowed callers."""

    def __init__(self, agent, control_group: str | None):
        self.agent, self.control_group = agent, control_group
        # Bounded: a flood of connections waits here instead of growing tasks without end.
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._calls = trio.CapacityLimiter(MAX_CALLS)

    async def serve(self, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the Unix socket ``path`` until cancelled; removes it on the way out."""
        listener = await unix_listener(path, self.control_group)
        try:
            await trio.serve_listeners(self.handle, [listener], task_status=task_status)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def handle(self, stream: trio.SocketStream) -> None:
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
            if not uid_allowed(uid, self.control_group):
                await self._refuse(stream, uid)
                return
            async with self._calls:
                with trio.fail_after(READ_TIMEOUT):
                    message = await _read_one(stream)
                name, raw = check_call(message)
                model = raw.get("model")
                log.log(logging.DEBUG if name in QUIET else logging.INFO,
                        "call %s %s from uid %d", escape(name), escape(model[:300]) if isinstance(model, str) else "", uid)
                method = api.lookup(name)
                params = api.parse_params(method.params, raw)

                async def send_event(event: dict) -> None:
                    # A client that stops reading this long loses its call, never the agent's time.
                    with trio.fail_after(EVENT_TIMEOUT):
                        await stream.send_all(encode_frame({"event": event}))
                result = await method.handler(self.agent, params, api.Call(uid, send_event))
                answer = encode_frame({"result": result})
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
            await _try_send(stream, error_frame(ProtocolError(refusal(uid, self.control_group))))
        # Drain (bounded) what they sent, so closing does not reset the connection and
        # destroy the answer before they read it.
        with trio.move_on_after(1):
            drained = 0
            while drained < MAX_DRAIN:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)


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


async def unix_listener(path: Path, group: str | None) -> trio.SocketListener:
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
