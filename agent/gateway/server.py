"""The gateway's HTTP side: connections, who may use them, and sending answers.

Who may use it: the same people as the control socket (``agent.access``): the agent's
user, root and the control group. The caller's uid is read from the kernel (the owner of
the other end of the loopback connection) before a byte of the request is read; anyone
else gets 403 and nothing starts. A request whose ``Host`` is not 127.0.0.1/localhost
(DNS rebinding) or that carries an ``Origin`` (a web page in a browser) is refused too, and
so is one that an agent's own origin source sent (its User-Agent names ``AGENT_UA``: an
agent whose ``HF_ENDPOINT`` or ``MODELSCOPE_ENDPOINT`` points at a gateway would otherwise
ask itself in a loop).

Bounded: connections in all and per uid (one more is answered 503 at once), the size of
a request head and body, the time to the first byte of a request (``IDLE_TIMEOUT``) and
from it to the end of the request (``HEADER_TIMEOUT``), the time a client may take to
accept each part of an answer (``SEND_TIMEOUT``). File bytes go out with ``sendfile`` from
a worker thread, in slices.

Routes: ``/metrics``, then each face in turn (``agent.gateway.faces``); the first that
knows the path answers.
"""

from __future__ import annotations

import json
import logging
import os
import select
from collections import Counter
from contextlib import aclosing
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

import h11
import trio

from agent.access import refusal, tcp_peer_uid, uid_allowed
from agent.errors import ShoalError, SourceUnavailable
from agent.gateway.serve import Call, ClientGone, FileSpan, Library, Response
from agent.metrics import CONTENT_TYPE as METRICS_TYPE

log = logging.getLogger("shoal.gateway")

IDLE_TIMEOUT = 30.0  # for the first byte of the next request on a connection
HEADER_TIMEOUT = 10.0  # from that byte to the end of the request
SEND_TIMEOUT = 30.0  # for a client to take each block of an answer
MAX_HEADER = 16 * 1024
MAX_BODY = 64 * 1024  # a request body (the Hub's paths-info POST), at most
MAX_CONNECTIONS = 128
MAX_PER_UID = 16
SLICE = 16 * 1024 * 1024  # bytes sent per worker-thread hop
SEND_THREADS = 16  # worker threads sending file bytes at once (not trio's shared pool)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
AGENT_UA = "shoal-agent/"  # in the User-Agent of shoal's own origin requests (agent.sources.http)


async def serve_gateway(gateway: "Gateway", port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``gateway`` on 127.0.0.1:``port`` (0: any) until cancelled;
    ``task_status.started(port)`` once listening."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = gateway.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        gateway.library.nursery = nursery
        await nursery.start(trio.serve_listeners, gateway.handle, listeners)
        task_status.started(bound)


def parse_target(target: bytes) -> tuple[str, list[str], dict[str, list[str]]]:
    """A request target as the routes read it: (path, its decoded segments, the query). Pure;
    never raises. Split by hand, not with ``urlsplit``: a target is a path (origin-form), and
    ``urlsplit`` reads one starting ``//`` as a host (``//v[/x`` raised "Invalid IPv6 URL",
    which the fuzzer found: it took the gateway's connection task down)."""
    text = target.decode("latin-1").partition("#")[0]
    path, _, query = text.partition("?")
    return path, [unquote(p) for p in path.split("/") if p], parse_qs(query)


def json_response(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [("Content-Type", "application/json")] + (headers or []), json.dumps(payload).encode())


class Gateway:
    """The gateway: its faces over one ``Library`` (the settings, the store, the sources to
    resolve a listing it lacks, the pulls to start or join one) and the metrics' renderer."""

    def __init__(self, settings, store, sources, pulls, render_metrics):
        from agent.gateway.faces import make_faces
        self.settings = settings
        self.library = Library(settings, store, sources, pulls)
        self.faces = make_faces(self.library, settings)
        self.render_metrics = render_metrics
        self.port = 0  # set once listening
        self._senders = trio.CapacityLimiter(SEND_THREADS)
        self._open = 0
        self._per_uid: Counter = Counter()

    # -------------------------------------------------------------- connections

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                uid = await trio.to_thread.run_sync(tcp_peer_uid, stream.socket)
            except OSError:
                uid = None
            group = self.settings.control_group
            if uid is None or not uid_allowed(uid, group):
                log.warning("gateway: refused a connection from %s", f"uid {uid}" if uid is not None else "an unknown uid")
                await self._refuse(stream, 403, "Forbidden", refusal(uid, group))
                return
            if self._open >= MAX_CONNECTIONS or self._per_uid[uid] >= MAX_PER_UID:
                await self._refuse(stream, 503, "Service Unavailable",
                                   f"too many connections (uid {uid} has {self._per_uid[uid]}); close some and retry")
                return
            self._open += 1
            self._per_uid[uid] += 1
            try:
                await self._serve_connection(stream, uid)
            except Exception:  # a bug in one request must not take the gateway (and the agent) down
                log.exception("gateway: a request of uid %d failed; its connection is closed", uid)
            finally:
                self._open -= 1
                self._per_uid[uid] -= 1
                if self._per_uid[uid] <= 0:
                    del self._per_uid[uid]

    async def _serve_connection(self, stream: trio.SocketStream, uid: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        try:
            while True:
                got = await self._next_request(conn, stream)
                if got is None:
                    return
                request, body = got
                if body is None:
                    response = json_response(413, {"error": f"a request body is {MAX_BODY} bytes at most"})
                else:
                    path, parts, query = parse_target(request.target)
                    call = Call(request.method.decode("latin-1"), path, parts, query,
                                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers},
                                uid, body, conn, stream)
                    try:
                        response = await self.route(call)
                    except ShoalError as e:
                        status = 502 if isinstance(e, SourceUnavailable) else 500
                        log.warning("gateway: %s %s answered %d: %s", call.method, call.path[:200], status, e)
                        response = json_response(status, {"Code": status, "Message": str(e), "Success": False,
                                                          "error": str(e)})
                await self._send(conn, stream, request, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, trio.TooSlowError,
                ClientGone, BrokenPipeError, ConnectionResetError):
            return

    async def _refuse(self, stream: trio.SocketStream, status: int, reason: str, message: str) -> None:
        """Answer without reading the request, then drain briefly so the close does not
        reset the answer away before the client reads it."""
        body = json.dumps({"Code": status, "Message": message, "Success": False, "error": message}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\nServer: shoal-gateway\r\n\r\n").encode()
        try:
            with trio.move_on_after(1):
                await stream.send_all(head + body)
                drained = 0
                while drained < MAX_HEADER:
                    data = await stream.receive_some(MAX_HEADER)
                    if not data:
                        break
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _next_request(self, conn: h11.Connection, stream: trio.SocketStream):
        """(the request, its body) — the body None if it was too long — or None at the end."""
        request, body = None, bytearray()
        deadline = trio.current_time() + IDLE_TIMEOUT
        head_started = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_at(deadline):
                    data = await stream.receive_some(64 * 1024)
                if data and not head_started:  # the request has begun: it gets HEADER_TIMEOUT
                    head_started = True
                    deadline = trio.current_time() + HEADER_TIMEOUT
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data) and body is not None:
                body = None if len(body) + len(event.data) > MAX_BODY else body + event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, (bytes(body) if body is not None else None)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    # ------------------------------------------------------------------ routes

    def _refused(self, call: Call) -> Response | None:
        host = call.headers.get("host", "")
        allowed = {h for name in LOCAL_HOSTS for h in (name, f"{name}:{self.port}")}
        if host.lower() not in allowed:
            message = (f"Host {host[:100]!r} is not this gateway; tools reach it as "
                       f"http://127.0.0.1:{self.port} (requests through other names are refused)")
            return json_response(403, {"Code": 403, "Message": message, "Success": False, "error": message})
        if "origin" in call.headers:
            message = ("requests from web pages (with an Origin header) are refused; point a hub tool at "
                       "MODELSCOPE_ENDPOINT or HF_ENDPOINT instead")
            return json_response(403, {"Code": 403, "Message": message, "Success": False, "error": message})
        if AGENT_UA in call.headers.get("user-agent", ""):
            message = ("this request came from a shoal agent's own origin source: its HF_ENDPOINT or "
                       "MODELSCOPE_ENDPOINT points at a shoal gateway, so it would ask itself; set the "
                       "agent's origins to the hubs (tools, not agents, use the gateway)")
            return json_response(508, {"Code": 508, "Message": message, "Success": False, "error": message})
        return None

    async def route(self, call: Call) -> Response:
        refused = self._refused(call)
        if refused is not None:
            return refused
        if call.method not in ("GET", "HEAD", "POST"):
            return json_response(405, {"error": "the shoal gateway is read-only"})
        if call.parts == ["metrics"] and call.method != "POST":
            body = await trio.to_thread.run_sync(self.render_metrics)
            return Response(200, [("Content-Type", METRICS_TYPE)], body)
        for face in self.faces:
            response = await face.route(call)
            if response is not None:
                return response
        return json_response(404, {"Code": 404, "Message": f"{call.path} is not an endpoint of the shoal gateway",
                                   "Success": False, "error": f"{call.path} is not an endpoint of the shoal gateway"})

    # ------------------------------------------------------------------ sending

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request,
                    response: Response) -> None:
        try:
            headers = list(response.headers) + [("Server", "shoal-gateway")]
            if not any(k.lower() == "content-length" for k, _ in headers):  # a HEAD may say the file's size
                length = response.length if response.spans else len(response.body)
                headers.append(("Content-Length", str(length)))
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers,
                                                             reason=_reason(response.status))))
            if request.method == b"HEAD":
                conn.send(h11.EndOfMessage())  # h11 wants it; no body on the wire for HEAD
                return
            if response.spans:
                async with aclosing(response.spans()) as spans:
                    async for span in spans:
                        conn.send_with_data_passthrough(h11.Data(data=span))  # h11 counts it; the bytes go below
                        await _send_span(stream, span, self._senders)
            elif response.body:
                with trio.fail_after(SEND_TIMEOUT):
                    await stream.send_all(conn.send(h11.Data(data=response.body)))
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(conn.send(h11.EndOfMessage()))
        except ShoalError as e:  # the pull behind a body stopped midway: the client sees a short body
            log.info("gateway: %s stopped while being sent: %s", request.target.decode("latin-1")[:200], e)
            raise trio.BrokenResourceError(str(e)) from e
        finally:
            response.close()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _send_span(stream: trio.SocketStream, span: FileSpan, limiter: trio.CapacityLimiter) -> None:
    """``span``'s bytes on ``stream``'s socket with ``sendfile`` (kernel-side), from a worker
    thread a ``SLICE`` at a time, so a disk read never blocks the event loop."""
    sock = stream.socket.fileno()
    offset, left = span.offset, span.length
    while left:
        sent = await trio.to_thread.run_sync(_sendfile, sock, span.fd, offset, min(left, SLICE), limiter=limiter)
        offset += sent
        left -= sent


def _sendfile(sock: int, fd: int, offset: int, count: int) -> int:
    """Send ``count`` bytes of ``fd`` from ``offset`` on the non-blocking socket ``sock``,
    waiting up to ``SEND_TIMEOUT`` each time it is full."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock, fd, offset + sent, count - sent)
        except BlockingIOError:
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise trio.TooSlowError(f"the client took no bytes for {SEND_TIMEOUT:.0f} s") from None
            continue
        if n == 0:
            raise trio.BrokenResourceError("the file ended before its listed size")
        sent += n
    return sent
