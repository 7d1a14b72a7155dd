"""The ModelScope-compatible gateway: existing tools get their files through shoal.

With ``MODELSCOPE_ENDPOINT=http://127.0.0.1:PORT`` (the agent prints PORT; default 8790),
unmodified ``modelscope download``, ``snapshot_download`` and ms-swift's ``--model``
fetch through the agent; so do datasets (``MsDataset.load``, ``snapshot_download(...,
repo_type="dataset")``, ms-swift's ``--dataset``) through the dataset endpoints the SDK
calls: ``/api/v1/datasets/{o}/{n}`` (info: ``Id`` and ``Type``, ``compat/hub_api.py:
get_dataset_id_and_type``), ``.../revisions``, ``.../repo/tree`` (paged,
``agent.hubtree``) and ``.../repo?FilePath=`` (bytes). A listing comes from the cached
manifest (or, for one not cached yet, from the same plan a pull would use: a trusted LAN
peer's manifest, the OSS manifest or the hub's listing), and file content is served from
the cache, with Range. A file that is not cached yet starts (or joins) a pull of the
whole revision and is served once it is verified, so the tool only ever receives proven
bytes. Also serves Prometheus metrics at ``/metrics``.

Who may use it: the same people as the control socket (``agent.access``): the agent's
user, root and the control group. The caller's uid is read from the kernel (the owner of
the other end of the loopback connection) before a byte of the request is read; anyone
else gets 403 and nothing starts. A request whose ``Host`` is not 127.0.0.1/localhost
(DNS rebinding) or that carries an ``Origin`` (a web page in a browser) is refused too.

Bounded: connections in all and per uid (one more is answered 503 at once), the size of
a request head, the time to the first byte of a request (``IDLE_TIMEOUT``) and from it
to the end of the head (``HEADER_TIMEOUT``). ``HEAD`` never starts a pull; a pull that a
``GET`` started or joined is let go when that client hangs up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, OrderedDict
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from agent.access import refusal, tcp_peer_uid, uid_allowed
from agent.errors import NotFound, ShoalError, SourceUnavailable, UnsafePath, UsageError, single_error
from agent.hubtree import dataset_info, tree_page
from agent.httprange import parse_range
from agent.manifest import ModelRef, check_relpath
from agent.metrics import CONTENT_TYPE as METRICS_TYPE
from agent.store.folders import open_model_file

log = logging.getLogger("shoal.gateway")

IDLE_TIMEOUT = 30.0  # for the first byte of the next request on a connection
HEADER_TIMEOUT = 10.0  # from that byte to the end of the request head
SEND_TIMEOUT = 30.0  # for a client to take each block of an answer
MAX_HEADER = 16 * 1024
MAX_CONNECTIONS = 128
MAX_PER_UID = 16
MAX_PIPELINED = 64 * 1024  # bytes of a next request buffered while a pull is awaited
BLOCK = 1024 * 1024
PLAN_TTL = 60.0  # seconds a resolved listing of an uncached model is reused
MANIFEST_CACHE = 16
NOT_FOUND_CODE = 10010205001  # what ModelScope answers for a missing model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class _Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes = b"", stream=None,
                 ref: ModelRef | None = None):
        self.status, self.headers, self.body = status, headers, body
        self.stream = stream  # (fd, start, end): a file the gateway opened, closed once sent
        self.ref = ref  # the model a streamed file belongs to: held "in use" while it is sent


class ClientGone(Exception):
    """The HTTP client hung up while its request waited for a pull."""


def _json(status: int, payload: object) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(status, [("Content-Type", "application/json")], body)


def _error(status: int, message: str, code: int | None = None) -> _Response:
    return _json(status, {"Code": code or status, "Message": message, "Success": False,
                          "RequestId": "shoal-gateway"})


async def serve_gateway(gateway: "Gateway", port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``gateway`` on 127.0.0.1:``port`` (0: any) until cancelled;
    ``task_status.started(port)`` once listening."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = gateway.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, gateway.handle, listeners)
        task_status.started(bound)


def parse_target(target: bytes) -> tuple[str, list[str], dict[str, list[str]]]:
    """A request target as the routes read it: (path, its decoded segments, the query). Pure."""
    url = urlsplit(target.decode("latin-1"))
    return url.path, [unquote(p) for p in url.path.split("/") if p], parse_qs(url.query)


class Gateway:
    """The gateway's state; it sees the settings, the store, the sources (to resolve a
    listing it lacks), the pulls (to start or join one) and the metrics' renderer."""

    def __init__(self, settings, store, sources, pulls, render_metrics):
        self.settings, self.store, self.sources, self.pulls = settings, store, sources, pulls
        self.render_metrics = render_metrics
        self.port = 0  # set once listening
        self._plans: dict[str, tuple[float, list[dict]]] = {}
        self._manifests: OrderedDict[str, set[str]] = OrderedDict()  # manifest id -> its paths
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
            finally:
                self._open -= 1
                self._per_uid[uid] -= 1
                if self._per_uid[uid] <= 0:
                    del self._per_uid[uid]

    async def _serve_connection(self, stream: trio.SocketStream, uid: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        try:
            while True:
                request = await self._next_request(conn, stream)
                if request is None:
                    return
                try:
                    response = await self.route(request, uid, conn, stream)
                except ShoalError as e:
                    response = _error(502 if isinstance(e, SourceUnavailable) else 500, str(e))
                await self._send(conn, stream, request, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, trio.TooSlowError,
                ClientGone):
            return

    async def _refuse(self, stream: trio.SocketStream, status: int, reason: str, message: str) -> None:
        """Answer without reading the request, then drain briefly so the close does not
        reset the answer away before the client reads it."""
        body = json.dumps({"Code": status, "Message": message, "Success": False}).encode()
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
        request = None
        deadline = trio.current_time() + IDLE_TIMEOUT
        head_started = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_at(deadline):
                    data = await stream.receive_some(64 * 1024)
                if data and not head_started:  # the request has begun: its head gets HEADER_TIMEOUT
                    head_started = True
                    deadline = trio.current_time() + HEADER_TIMEOUT
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _send(self, conn, stream, request, response: _Response) -> None:
        headers = list(response.headers) + [("Server", "shoal-gateway")]
        if not any(k.lower() == "content-length" for k, _ in headers):  # a HEAD may say the file's size
            length = response.stream[2] - response.stream[1] + 1 if response.stream else len(response.body)
            headers.append(("Content-Length", str(length)))
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
            if request.method == b"HEAD":
                conn.send(h11.EndOfMessage())  # h11 wants it; no body on the wire for HEAD
                return
            if response.stream:
                await self._send_file(conn, stream, response)
            elif response.body:
                with trio.fail_after(SEND_TIMEOUT):
                    await stream.send_all(conn.send(h11.Data(data=response.body)))
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(conn.send(h11.EndOfMessage()))
        finally:
            if response.stream:
                os.close(response.stream[0])

    async def _send_file(self, conn, stream, response: _Response) -> None:
        fd, start, end = response.stream
        store = self.store
        in_use = await trio.to_thread.run_sync(store.use, response.ref)  # no eviction mid-send
        try:
            pos = start
            while pos <= end:
                data = await trio.to_thread.run_sync(os.pread, fd, min(BLOCK, end - pos + 1), pos)
                if not data:
                    raise trio.BrokenResourceError("file shrank while being served")
                with trio.fail_after(SEND_TIMEOUT):
                    await stream.send_all(conn.send(h11.Data(data=data)))
                pos += len(data)
        finally:
            store.release(in_use)

    # ------------------------------------------------------------------ routes

    def _refused_origin(self, request: h11.Request) -> _Response | None:
        headers = {k: v.decode("latin-1") for k, v in request.headers}
        host = headers.get(b"host", "")
        allowed = {h for name in LOCAL_HOSTS for h in (name, f"{name}:{self.port}")}
        if host.lower() not in allowed:
            return _error(403, f"Host {host[:100]!r} is not this gateway; tools reach it as "
                               f"http://127.0.0.1:{self.port} (requests through other names are refused)")
        if b"origin" in headers:
            return _error(403, "requests from web pages (with an Origin header) are refused; point a "
                               "ModelScope tool at MODELSCOPE_ENDPOINT instead")
        return None

    async def route(self, request: h11.Request, uid: int, conn=None, stream=None) -> _Response:
        refused = self._refused_origin(request)
        if refused is not None:
            return refused
        path, parts, query = parse_target(request.target)
        if request.method not in (b"GET", b"HEAD"):
            return _error(405, "the shoal gateway is read-only")
        if parts == ["metrics"]:
            body = await trio.to_thread.run_sync(self.render_metrics)
            return _Response(200, [("Content-Type", METRICS_TYPE)], body)
        if parts == ["api", "v1", "repos", "internalAccelerationInfo"]:
            return _error(404, "no intra-cloud acceleration behind the shoal gateway")
        if len(parts) < 5 or parts[0] not in ("api", "openapi") or parts[1] != "v1" \
                or parts[2] not in ("models", "datasets"):
            return _error(404, f"{path} is not an endpoint of the shoal gateway")
        dataset = parts[2] == "datasets"
        try:
            ref = ModelRef.parse(f"{parts[3]}/{parts[4]}@{(query.get('Revision') or ['master'])[0]}",
                                 dataset=dataset)
        except UsageError as e:
            return _error(400, str(e))
        rest = parts[5:]
        try:
            if rest == []:
                await self.listing(ref)
                if dataset:
                    return _json(200, {"Code": 200, "Success": True,
                                       "Data": dataset_info(parts[3], parts[4], ref.revision)})
                return _json(200, {"Code": 200, "Success": True, "Data": {
                    "Id": ref.model_id, "ModelId": ref.model_id, "Name": parts[4], "Path": parts[3],
                    "Revision": ref.revision}})
            if rest == ["revisions"]:
                revisions = sorted({m.revision for m in await trio.to_thread.run_sync(self.store.models)
                                    if m.model_id == ref.model_id} | {"master"})
                return _json(200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                    "Branches": [{"Revision": r} for r in revisions], "Tags": []}}})
            if rest == ["repo", "files"] and not dataset:
                return _json(200, {"Code": 200, "Success": True, "Data": {"Files": await self.listing(ref)}})
            if rest == ["repo", "tree"] and dataset:
                return _json(200, {"Code": 200, "Success": True,
                                   "Data": {"Files": tree_page(await self.listing(ref), query)}})
            if rest == ["repo"]:
                path = (query.get("FilePath") or [""])[0]
                return await self.file(ref, path, request, uid, conn, stream)
        except NotFound as e:
            return _error(404, str(e), NOT_FOUND_CODE)
        return _error(404, f"{path} is not an endpoint of the shoal gateway")

    async def listing(self, ref: ModelRef) -> list[dict]:
        info = await self._complete(ref)
        if info is not None:
            manifest = await trio.to_thread.run_sync(self.store.manifest, info.manifest_id)
            files = [(f.path, f.size, f.sha256) for f in manifest.files]
        else:
            cached = self._plans.get(str(ref))
            if cached and time.monotonic() - cached[0] < PLAN_TTL:
                return cached[1]
            from agent.plan import resolve
            # The room first (a trusted peer's manifest: an offline classroom), then the sources.
            plan = await self.pulls.room_plan(ref) or await resolve(ref, self.sources, lambda event: None,
                                                                     self.settings.chunk_size)
            files = [(f.path, f.size, f.sha256) for f in plan.files]
        entries = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": s, "Sha256": h.hex(),
                    "Revision": ref.revision} for p, s, h in files]
        if info is None:
            self._plans[str(ref)] = (time.monotonic(), entries)
            while len(self._plans) > MANIFEST_CACHE:
                self._plans.pop(next(iter(self._plans)))
        return entries

    async def _complete(self, ref: ModelRef):
        try:
            info = await trio.to_thread.run_sync(self.store.find, ref)
        except NotFound:
            return None
        return info if info.state == "complete" else None

    async def _paths(self, manifest_id: str) -> set[str]:
        paths = self._manifests.get(manifest_id)
        if paths is None:
            manifest = await trio.to_thread.run_sync(self.store.manifest, manifest_id)
            paths = self._manifests[manifest_id] = {f.path for f in manifest.files}
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return paths

    async def _await_pull(self, ref: ModelRef, uid: int, conn, stream) -> None:
        """Start or join the pull of ``ref`` for this client and wait for it; if the client
        hangs up meanwhile, let go of the pull (it stops when nobody else holds it)."""
        active = self.pulls.start(ref, None)
        log.info("gateway: uid %d %s the pull of %s", uid, "joined" if active.holders else "started", ref)

        async def ignore(event):
            pass

        gone = False
        try:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    nonlocal gone
                    buffered = 0
                    while True:
                        try:
                            data = await stream.receive_some(4096)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        if not data:
                            gone = True
                            nursery.cancel_scope.cancel()
                            return
                        buffered += len(data)
                        if buffered > MAX_PIPELINED:
                            gone = True
                            nursery.cancel_scope.cancel()
                            return
                        conn.receive_data(data)  # a pipelined next request: h11 keeps it for later
                if stream is not None:
                    nursery.start_soon(watch)
                await self.pulls.follow(active, ignore)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        if gone:
            log.info("gateway: uid %d went away while %s was pulled; let go of it", uid, ref)
            raise ClientGone(str(ref))

    async def file(self, ref: ModelRef, path: str, request: h11.Request, uid: int, conn=None,
                   stream=None) -> _Response:
        try:
            check_relpath(path)
        except ShoalError as e:
            return _error(400, str(e))
        info = await self._complete(ref)
        if info is None:
            if request.method == b"HEAD":  # answered from the listing; a HEAD never starts a pull
                entry = next((f for f in await self.listing(ref) if f["Path"] == path), None)
                if entry is None:
                    raise NotFound(f"{path} is not a file of {ref}")
                return _Response(200, [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                                       ("Content-Length", str(entry["Size"]))])
            # Pull (or join the pull of) the whole revision, then serve what it proved.
            await self._await_pull(ref, uid, conn, stream)
            info = await self._complete(ref)
            if info is None:
                raise NotFound(f"{ref} could not be pulled")
        if path not in await self._paths(info.manifest_id):
            raise NotFound(f"{path} is not a file of {ref}")
        try:
            fd = await trio.to_thread.run_sync(lambda: open_model_file(self.store, info.dir, path))
        except FileNotFoundError:
            raise NotFound(f"{path} of {ref} is missing from the cache; `shoal verify {ref}` repairs it") from None
        except UnsafePath as e:
            log.warning("gateway: refusing to serve %s of %s: %s", path, ref, e)
            raise NotFound(f"{path} of {ref} cannot be served: {e}") from None
        try:
            size = os.fstat(fd).st_size
            range_header = next((v.decode("latin-1") for k, v in request.headers if k == b"range"), None)
            try:
                span = parse_range(range_header, size) if size else None
            except ValueError:
                os.close(fd)
                return _Response(416, [("Content-Range", f"bytes */{size}")])
            await trio.to_thread.run_sync(self.store.touch, ref)
        except BaseException:
            os.close(fd)
            raise
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")]
        if not size:
            os.close(fd)
            return _Response(200, headers)
        start, end = span if span else (0, size - 1)
        if span:
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        return _Response(206 if span else 200, headers, stream=(fd, start, end), ref=ref)
