"""The gateway's one resolve-and-serve path, shared by every API face.

A face (``ms_models``, ``ms_datasets``, ``hub``) turns its hub's URL into a ``ModelRef``
and a file path, and the answer back into that hub's JSON and headers. Everything between
is here, once:

- ``Library.revision(ref)``: what a revision is made of (path, size, SHA-256 per file) and
  its **commit id**: a complete model's manifest, else the plan a pull would use (a
  trusted LAN peer's manifest first, so an offline room works; then the mirror's manifest
  or an origin's listing), kept ``PLAN_TTL`` seconds. The commit id is the first 40 hex
  digits of the files' fingerprint (``manifest.files_fingerprint``): stable for the same
  content whichever source listed it, so a tool that caches by commit (the Hugging Face
  client's ``snapshots/{commit}``) finds its copy again, and a new revision gets a new id.
- ``Library.file(ref, path, call)``: a file's bytes with ``Range``. A complete model's file
  is served from its folder. Otherwise a ``GET`` starts or joins the pull of the revision
  (``lease.PullLease``) and is answered with **proven bytes only**, as soon as they are:
  under a trusted manifest every chunk is proven by its BLAKE3 when it lands, so the body
  streams chunk by chunk in file order as they verify; under an origin's listing a file is
  proven by its SHA-256 only once whole, so it is sent when the pull has finished it. A
  ``HEAD`` never starts a pull: it is answered from the listing.

Errors: ``NotFound`` (no such repository or revision at any source), ``MissingFile`` (the
revision has no such file), ``UsageError`` (a path or revision no hub could hold);
``ShoalError`` otherwise. Faces answer each in their hub's words.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import h11
import trio

from agent.errors import NotFound, UnsafePath, single_error
from agent.gateway.lease import PullLease
from agent.httprange import parse_range
from agent.manifest import ModelRef, chunk_span, check_relpath, files_fingerprint
from agent.store.folders import open_model_file

PLAN_TTL = 60.0  # seconds a resolved listing of an uncached revision is reused
CACHED_LISTINGS = 64  # listings and commit ids kept in memory
MAX_PIPELINED = 64 * 1024  # bytes of a next request buffered while a pull is awaited


class MissingFile(NotFound):
    """The revision exists but holds no such file."""


class ClientGone(Exception):
    """The HTTP client hung up while its request waited for a pull."""


# ------------------------------------------------------------------------- answers

@dataclass
class FileSpan:
    """Bytes of an open file, sent with ``sendfile`` by the server (``len`` is what h11
    counts against the Content-Length)."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class Response:
    """What a face answers: a status, headers, and a body of bytes or of file spans
    (``spans``, an async iterator; ``close`` releases what it holds, once)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    length: int | None = None  # of the spans, when there are spans
    spans: Callable[[], AsyncIterator[FileSpan]] | None = None
    close: Callable[[], None] = lambda: None

    def header(self, name: str, value: str) -> "Response":
        self.headers.append((name, value))
        return self


@dataclass
class Call:
    """A request as a face sees it, and a way to wait on a pull that notices the client
    hanging up (it reads the connection meanwhile: a pipelined next request is kept for h11)."""

    method: str
    path: str
    parts: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    uid: int
    body: bytes = b""
    conn: h11.Connection | None = None
    stream: trio.abc.Stream | None = None
    _buffered: int = field(default=0, repr=False)

    def arg(self, name: str, default: str | None = None) -> str | None:
        return (self.query.get(name) or [default])[0]

    async def until(self, wait: Callable[[], Awaitable[object]]):
        """``await wait()``, unless the client hangs up first (``ClientGone``)."""
        if self.stream is None:
            return await wait()
        result, gone = [], False
        try:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    nonlocal gone
                    while True:
                        try:
                            data = await self.stream.receive_some(4096)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        self._buffered += len(data)
                        if not data or self._buffered > MAX_PIPELINED:
                            gone = True
                            nursery.cancel_scope.cancel()
                            return
                        self.conn.receive_data(data)  # a pipelined next request: h11 keeps it
                nursery.start_soon(watch)
                result.append(await wait())
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        if gone:
            raise ClientGone(self.path)
        return result[0]


@dataclass(frozen=True)
class Revision:
    """What a revision is made of: (path, size, SHA-256) per file, its commit id, and
    whether the cache holds it whole."""

    ref: ModelRef
    files: tuple[tuple[str, int, bytes], ...]
    commit: str
    cached: bool

    def entry(self, path: str) -> tuple[str, int, bytes]:
        for f in self.files:
            if f[0] == path:
                return f
        raise MissingFile(f"{path} is not a file of {self.ref}")


def commit_of(files) -> str:
    """The commit id the gateway gives a revision: 40 hex digits of its content's fingerprint."""
    return files_fingerprint(files)[:40]


# ------------------------------------------------------------------------- the library

class Library:
    """Listings, commit ids and files of the cache, through the pull coordinator (see module
    docstring). ``nursery`` (set by the server) runs the leases."""

    def __init__(self, settings, store, sources, pulls):
        self.settings, self.store, self.sources, self.pulls = settings, store, sources, pulls
        self.nursery: trio.Nursery | None = None
        self._plans: OrderedDict[str, tuple[float, Revision]] = OrderedDict()
        self._by_manifest: OrderedDict[str, Revision] = OrderedDict()
        self._commits: OrderedDict[tuple[str, str], ModelRef] = OrderedDict()
        self._leases: dict[str, PullLease] = {}

    # ------------------------------------------------------------------ listings

    async def revision(self, ref: ModelRef) -> Revision:
        """``ref``'s files and commit id (see module docstring); ``NotFound`` if no source has it."""
        info = await self.complete(ref)
        if info is not None:
            return await self._cached_revision(ref, info.manifest_id)
        cached = self._plans.get(str(ref))
        if cached and time.monotonic() - cached[0] < PLAN_TTL:
            return cached[1]
        from agent.plan import resolve
        plan = await self.pulls.room_plan(ref) or await resolve(ref, self.sources, lambda event: None,
                                                                 self.settings.chunk_size)
        files = tuple((f.path, f.size, f.sha256) for f in plan.files)
        revision = Revision(ref, files, commit_of(plan.files), cached=False)
        self._remember(self._plans, str(ref), (time.monotonic(), revision))
        self._remember(self._commits, (ref.model_id, revision.commit), ref)
        return revision

    async def _cached_revision(self, ref: ModelRef, manifest_id: str) -> Revision:
        known = self._by_manifest.get(manifest_id)
        if known is None or known.ref != ref:
            manifest = await trio.to_thread.run_sync(self.store.manifest, manifest_id)
            known = Revision(ref, tuple((f.path, f.size, f.sha256) for f in manifest.files),
                             commit_of(manifest.files), cached=True)
            self._remember(self._by_manifest, manifest_id, known)
            self._remember(self._commits, (ref.model_id, known.commit), ref)
        return known

    async def cached_revisions(self, model_id: str) -> list[str]:
        """The revisions of ``model_id`` the cache holds (complete or not)."""
        return sorted({m.revision for m in await trio.to_thread.run_sync(self.store.models)
                       if m.model_id == model_id})

    async def find_commit(self, model_id: str, commit: str) -> ModelRef | None:
        """The revision of ``model_id`` whose commit id is ``commit``: one listed lately, or
        one the cache holds whole; None if none is known."""
        known = self._commits.get((model_id, commit))
        if known is not None:
            return known
        for m in await trio.to_thread.run_sync(self.store.models):
            if m.model_id == model_id and m.state == "complete" and m.manifest_id:
                if (await self._cached_revision(m.ref, m.manifest_id)).commit == commit:
                    return m.ref
        return None

    async def complete(self, ref: ModelRef):
        """The cache's ``ModelInfo`` of ``ref`` if it holds it whole, else None."""
        try:
            info = await trio.to_thread.run_sync(self.store.find, ref)
        except NotFound:
            return None
        return info if info.state == "complete" else None

    @staticmethod
    def _remember(table: OrderedDict, key, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > CACHED_LISTINGS:
            table.popitem(last=False)

    # ------------------------------------------------------------------ files

    async def file(self, ref: ModelRef, path: str, call: Call) -> Response:
        """The answer to a ``GET``/``HEAD`` of ``path`` of ``ref`` (see module docstring)."""
        check_relpath(path)
        revision = await self.revision(ref)
        _, size, _ = revision.entry(path)
        if call.method == "HEAD":  # from the listing: a HEAD never starts a pull
            return Response(200, [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                                  ("Content-Length", str(size))])
        try:
            span = parse_range(call.headers.get("range"), size) if size else None
        except ValueError:
            return Response(416, [("Content-Range", f"bytes */{size}")])
        if revision.cached:
            info = await self.complete(ref)
            if info is not None:
                return await self._from_folder(ref, info.dir, path, size, span)
        return await self._from_pull(ref, path, size, span, call)

    async def _from_folder(self, ref: ModelRef, directory, path: str, size: int, span) -> Response:
        def open_it() -> tuple[int, int]:
            fd = open_model_file(self.store, directory, path)
            try:
                if os.fstat(fd).st_size != size:
                    raise FileNotFoundError(path)
                in_use = self.store.use(ref)  # no eviction while it is sent
            except BaseException:
                os.close(fd)
                raise
            self.store.touch(ref)
            return fd, in_use
        try:
            fd, in_use = await trio.to_thread.run_sync(open_it)
        except FileNotFoundError:
            raise NotFound(f"{path} of {ref} is missing from the cache; `shoal verify {ref}` repairs it") from None
        except UnsafePath as e:
            raise NotFound(f"{path} of {ref} cannot be served: {e}") from None

        def close() -> None:
            os.close(fd)
            self.store.release(in_use)
        return _file_response(size, span, lambda start, end: _one_span(fd, start, end), close)

    async def _from_pull(self, ref: ModelRef, path: str, size: int, span, call: Call) -> Response:
        lease = await self._lease(ref, call.uid)
        lease.acquire()
        try:
            start = span[0] if span else 0
            streaming = await call.until(lambda: self._first_ready(lease, path, size, start))
            directory = await self._directory(lease)
        except ClientGone:
            lease.release(gone=True)
            raise
        except BaseException:
            lease.release()
            raise
        finally:
            if lease.plan is not None and size:
                lease.want(path, (span[0] if span else 0) // lease.plan.plan.chunk_size, False)
        lease.served = True
        if not streaming:  # the file is proven whole: from its folder, the lease is done with
            lease.release()
            return await self._from_folder(ref, directory, path, size, span)
        try:
            fd = await trio.to_thread.run_sync(
                lambda: open_model_file(self.store, directory, path, partial_ok=True))
        except BaseException:
            lease.release()
            raise
        closed = []

        def close() -> None:
            if not closed:
                closed.append(True)
                os.close(fd)
                lease.release()

        def spans(first: int, last: int) -> AsyncIterator[FileSpan]:
            return self._growing(lease, call, fd, path, size, first, last)
        return _file_response(size, span, spans, close)

    async def _lease(self, ref: ModelRef, uid: int) -> PullLease:
        lease = self._leases.get(str(ref))
        if lease is None or lease.ended or lease.scope.cancel_called:  # (a lease let go is not joined)
            lease = self._leases[str(ref)] = PullLease(ref, self.pulls, uid)
            await self.nursery.start(self._run_lease, lease)
        return lease

    async def _run_lease(self, lease: PullLease, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await lease.run(task_status=task_status)
        finally:
            if self._leases.get(str(lease.ref)) is lease:
                del self._leases[str(lease.ref)]

    async def _directory(self, lease: PullLease):
        if lease.plan is not None:
            return lease.plan.directory
        info = await self.complete(lease.ref)  # a pull that ended before this request followed it
        if info is None:
            raise NotFound(f"{lease.ref} could not be pulled")
        return info.dir

    async def _proven_whole(self, lease: PullLease, path: str, size: int) -> bool:
        """Whether ``path`` is in its folder under its own name: only proven files are
        (finished by the pull, or linked from a blob the cache proved)."""
        try:
            directory = await self._directory(lease)
        except NotFound:
            return False

        def check() -> bool:
            try:
                fd = open_model_file(self.store, directory, path)
            except (FileNotFoundError, UnsafePath):
                return False
            try:
                return os.fstat(fd).st_size == size
            finally:
                os.close(fd)
        return await trio.to_thread.run_sync(check)

    async def _verified(self, lease: PullLease, path: str) -> set[int]:
        """Chunks of ``path`` verified against the trusted manifest: the events' and the store's."""
        expected = lease.expected(path) or ()
        held = await trio.to_thread.run_sync(self.store.chunk_hashes, lease.ref, path)
        have = lease.verified.setdefault(path, set())
        have.update(i for i, digest in held.items() if i < len(expected) and expected[i] == digest)
        return have

    async def _first_ready(self, lease: PullLease, path: str, size: int, start: int) -> bool:
        """Wait until ``path`` can be answered: False once proven whole (serve the file),
        True once the chunk holding byte ``start`` is verified under a trusted manifest
        (stream it). The store is read when the plan comes, when the file is said to be
        finished, and whenever ``POLL`` passed without an event (events may be dropped)."""
        recheck, had_plan = True, False
        while True:
            change = lease.change()
            if recheck or path in lease.finished or lease.completed:
                if (lease.plan is not None or lease.completed) and await self._proven_whole(lease, path, size):
                    return False
                if lease.completed:
                    raise NotFound(f"{path} of {lease.ref} is not in the cache after its pull")
            if lease.trusted and size:
                index = start // lease.plan.plan.chunk_size
                if index in lease.verified.get(path, ()) or (recheck and index in await self._verified(lease, path)):
                    lease.want(path, index, False)
                    return True
                lease.want(path, index)  # the pull fetches what a reader waits for first
            changed = await lease.wait_change(change)
            recheck = not changed or (lease.plan is not None and not had_plan)  # the plan came: read the store
            had_plan = lease.plan is not None

    async def _growing(self, lease: PullLease, call: Call, fd: int, path: str, size: int, first: int,
                       last: int) -> AsyncIterator[FileSpan]:
        """Spans of ``fd`` (the file or its ``.partial``: one inode) from byte ``first`` to
        ``last``, each chunk once it is verified, in order."""
        chunk_size = lease.plan.plan.chunk_size
        for index in range(first // chunk_size, last // chunk_size + 1):
            recheck = False
            try:
                while True:
                    change = lease.change()
                    if index in lease.verified.get(path, ()) or lease.completed or path in lease.finished:
                        break
                    if recheck and index in await self._verified(lease, path):
                        break
                    lease.want(path, index)  # the pull fetches what a reader waits for first
                    recheck = not await call.until(lambda: lease.wait_change(change))
            finally:
                lease.want(path, index, False)
            offset, length = chunk_span(size, chunk_size, index)
            begin, end = max(offset, first), min(offset + length - 1, last)
            yield FileSpan(fd, begin, end - begin + 1)


async def _one_span(fd: int, start: int, end: int) -> AsyncIterator[FileSpan]:
    yield FileSpan(fd, start, end - start + 1)


def _file_response(size: int, span, spans: Callable[[int, int], AsyncIterator[FileSpan]],
                   close: Callable[[], None]) -> Response:
    headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")]
    if not size:
        close()
        return Response(200, headers)
    start, end = span if span else (0, size - 1)
    if span:
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    return Response(206 if span else 200, headers, length=end - start + 1, spans=lambda: spans(start, end),
                    close=close)

