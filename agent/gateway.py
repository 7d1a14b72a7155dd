"""The ModelScope-compatible gateway: existing tools get their files through shoal.

With ``MODELSCOPE_ENDPOINT=http://127.0.0.1:PORT`` (the agent prints PORT; default 8790),
unmodified ``modelscope download``, ``snapshot_download`` and ms-swift's ``--model``
fetch through the agent: a listing comes from the cached manifest (or, for a model not
cached yet, from the same plan a pull would use: the OSS manifest or the hub's listing),
and file content is served from the cache, with Range. A file that is not cached yet
starts (or joins) a pull of the whole revision and is served once it is verified, so
the tool only ever receives proven bytes.

Also serves Prometheus metrics at ``/metrics``. Binds 127.0.0.1 only; HTTP/1.1 through
h11, keep-alive, bounded header size and idle time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from agent.errors import NotFound, ShoalError, SourceUnavailable, UsageError
from agent.httprange import parse_range
from agent.manifest import ModelRef, check_relpath
from agent.metrics import CONTENT_TYPE as METRICS_TYPE

log = logging.getLogger("shoal.gateway")

IDLE_TIMEOUT = 60.0
MAX_HEADER = 16 * 1024
MAX_CONNECTIONS = 64
BLOCK = 1024 * 1024
PLAN_TTL = 60.0  # seconds a resolved listing of an uncached model is reused
NOT_FOUND_CODE = 10010205001  # what ModelScope answers for a missing model


class _Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes = b"", stream=None,
                 ref: ModelRef | None = None):
        self.status, self.headers, self.body, self.stream = status, headers, body, stream
        self.ref = ref  # the model a streamed file belongs to: held "in use" while it is sent


def _json(status: int, payload: object) -> _Response:
    body = json.dumps(payload).encode()
    return _Response(status, [("Content-Type", "application/json")], body)


def _error(status: int, message: str, code: int | None = None) -> _Response:
    return _json(status, {"Code": code or status, "Message": message, "Success": False,
                          "RequestId": "shoal-gateway"})


async def serve_gateway(agent, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started(port)`` once listening."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    gateway = Gateway(agent)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, gateway.handle, listeners)
        task_status.started(bound)


class Gateway:
    def __init__(self, agent):
        self.agent = agent
        self._plans: dict[str, tuple[float, list[dict]]] = {}
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        try:
            async with self._slots, stream:
                while True:
                    request = await self._next_request(conn, stream)
                    if request is None:
                        return
                    try:
                        response = await self.route(request)
                    except ShoalError as e:
                        response = _error(502 if isinstance(e, SourceUnavailable) else 500, str(e))
                    await self._send(conn, stream, request, response)
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, trio.TooSlowError):
            return

    async def _next_request(self, conn, stream):
        request = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(64 * 1024)
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
        length = response.stream[2] - response.stream[1] + 1 if response.stream else len(response.body)
        headers.append(("Content-Length", str(length)))
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
        if request.method == b"HEAD":
            conn.send(h11.EndOfMessage())  # h11 wants it; no body on the wire for HEAD
            return
        if response.stream:
            path, start, end = response.stream
            store = self.agent.store
            in_use = await trio.to_thread.run_sync(store.use, response.ref)  # no eviction mid-send
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = start
                while pos <= end:
                    data = await trio.to_thread.run_sync(os.pread, fd, min(BLOCK, end - pos + 1), pos)
                    if not data:
                        raise trio.BrokenResourceError("file shrank while being served")
                    await stream.send_all(conn.send(h11.Data(data=data)))
                    pos += len(data)
            finally:
                os.close(fd)
                store.release(in_use)
        elif response.body:
            await stream.send_all(conn.send(h11.Data(data=response.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    # ------------------------------------------------------------------ routes

    async def route(self, request: h11.Request) -> _Response:
        url = urlsplit(request.target.decode("latin-1"))
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if request.method not in (b"GET", b"HEAD"):
            return _error(405, "the shoal gateway is read-only")
        if parts == ["metrics"]:
            body = await trio.to_thread.run_sync(self.agent.metrics.render)
            return _Response(200, [("Content-Type", METRICS_TYPE)], body)
        if parts == ["api", "v1", "repos", "internalAccelerationInfo"]:
            return _error(404, "no intra-cloud acceleration behind the shoal gateway")
        if len(parts) < 5 or parts[:3] not in (["api", "v1", "models"], ["openapi", "v1", "models"]):
            return _error(404, f"{url.path} is not an endpoint of the shoal gateway")
        try:
            ref = ModelRef.parse(f"{parts[3]}/{parts[4]}@{(query.get('Revision') or ['master'])[0]}")
        except UsageError as e:
            return _error(400, str(e))
        rest = parts[5:]
        try:
            if rest == []:
                await self.listing(ref)
                return _json(200, {"Code": 200, "Success": True, "Data": {
                    "Id": ref.model_id, "ModelId": ref.model_id, "Name": parts[4], "Path": parts[3],
                    "Revision": ref.revision}})
            if rest == ["revisions"]:
                revisions = sorted({m.revision for m in await trio.to_thread.run_sync(self.agent.store.models)
                                    if m.model_id == ref.model_id} | {"master"})
                return _json(200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                    "Branches": [{"Revision": r} for r in revisions], "Tags": []}}})
            if rest == ["repo", "files"]:
                return _json(200, {"Code": 200, "Success": True, "Data": {"Files": await self.listing(ref)}})
            if rest == ["repo"]:
                path = (query.get("FilePath") or [""])[0]
                return await self.file(ref, path, request)
        except NotFound as e:
            return _error(404, str(e), NOT_FOUND_CODE)
        return _error(404, f"{url.path} is not an endpoint of the shoal gateway")

    async def listing(self, ref: ModelRef) -> list[dict]:
        info = await self._complete(ref)
        if info is not None:
            manifest = await trio.to_thread.run_sync(self.agent.store.manifest, info.manifest_id)
            files = [(f.path, f.size, f.sha256) for f in manifest.files]
        else:
            cached = self._plans.get(str(ref))
            if cached and time.monotonic() - cached[0] < PLAN_TTL:
                return cached[1]
            from agent.pull import resolve
            plan = await resolve(ref, self.agent.sources, lambda event: None, self.agent.settings.chunk_size)
            files = [(p, s, h) for p, s, h, _ in plan.files]
        entries = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": s, "Sha256": h.hex(),
                    "Revision": ref.revision} for p, s, h in files]
        if info is None:
            self._plans[str(ref)] = (time.monotonic(), entries)
        return entries

    async def _complete(self, ref: ModelRef):
        models = await trio.to_thread.run_sync(self.agent.store.models)
        for m in models:
            if m.model_id == ref.model_id and m.revision == ref.revision and m.state == "complete":
                return m
        return None

    async def file(self, ref: ModelRef, path: str, request: h11.Request) -> _Response:
        try:
            check_relpath(path)
        except ShoalError as e:
            return _error(400, str(e))
        info = await self._complete(ref)
        if info is None:
            # Pull (or join the pull of) the whole revision, then serve what it proved.
            active = self.agent.start_pull(ref, None)

            async def ignore(event):
                pass
            await self.agent.follow(active, ignore)
            info = await self._complete(ref)
            if info is None:
                raise NotFound(f"{ref} could not be pulled")
        target = info.dir / path
        if not target.is_file():
            raise NotFound(f"{path} is not a file of {ref}")
        size = target.stat().st_size
        range_header = next((v.decode("latin-1") for k, v in request.headers if k == b"range"), None)
        try:
            span = parse_range(range_header, size) if size else None
        except ValueError:
            return _Response(416, [("Content-Range", f"bytes */{size}")])
        await trio.to_thread.run_sync(self.agent.store.touch, ref)
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")]
        if not size:
            return _Response(200, headers)
        start, end = span if span else (0, size - 1)
        if span:
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        return _Response(206 if span else 200, headers, stream=(str(target), start, end), ref=ref)

