"""The scheduler: many chunks in flight, each from the first source that can give it.

Per chunk, sources are tried in order (LAN peers, ``agent.swarm``, then the OSS mirror,
then ModelScope). On one source a transient error (timeout, reset, truncated body, 5xx) is retried
with jittered backoff up to ``settings.retries`` times; a 404, refused credentials, a
server that ignores Range, or a chunk whose BLAKE3 does not match moves the chunk to the
next source at once. A source that fails several chunks in a row is put aside for a
cool-down while another source remains, so a dead mirror does not cost every chunk its
full retry budget. Nothing restarts a whole file.

Each worker owns one chunk-sized buffer, so memory is bounded by concurrency x chunk size;
fetch, BLAKE3 and the write run together in one worker thread per chunk.

Events (``ChunkFetched``, ``FileDone``, ``SourceTrouble``) go to a callback for progress.
"""

from __future__ import annotations

import mmap
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import trio

from agent.config import Settings
from agent.cpu import LEDGER
from agent.errors import (Cancelled, ChunkFailed, ChunkNotHeld, CredentialsRejected, IntegrityError, NotFound,
                          SourceUnavailable, single_error)
from agent.manifest import ModelRef, chunk_span
from agent.ratelimit import TokenBucket
from agent.sources import ChunkRequest, ChunkSource
from agent.hashing import blake3_hash
from agent.store.partial import PartialFile

# Every chunk in flight (default 8) failing at once is a pattern, not a blip.
FAILURES_BEFORE_COOLDOWN = 8
COOLDOWN_START = 2.0
COOLDOWN_MAX = 60.0
BACKOFF_BASE = 0.2
BACKOFF_MAX = 3.0
WRITTEN, LOST, ABANDONED, DEFERRED = "written", "lost", "abandoned", "deferred"


# ------------------------------------------------------------------------------ events

@dataclass(frozen=True)
class ChunkFetched:
    path: str
    index: int
    nbytes: int
    source: str


@dataclass(frozen=True)
class ChunkRejected:
    """A source sent bytes that failed their hash; they were not written."""

    path: str
    index: int
    source: str


@dataclass(frozen=True)
class FileDone:
    path: str
    size: int


@dataclass(frozen=True)
class SourceTrouble:
    """Something a person should know about a source; the pull goes on."""

    source: str
    message: str


Event = ChunkFetched | ChunkRejected | FileDone | SourceTrouble


# ------------------------------------------------------------------------------- state

@dataclass
class SourceState:
    """What this pull has learned about one source."""

    source: ChunkSource
    failures_in_row: int = 0
    cooldown: float = COOLDOWN_START
    down_until: float = 0.0
    disabled: str | None = None  # e.g. credentials refused: never ask again this pull
    lacks: set[str] = field(default_factory=set)  # files this source does not have

    def usable_for(self, path: str) -> bool:
        return self.disabled is None and path not in self.lacks

    def resting(self, now: float) -> bool:
        return now < self.down_until


@dataclass
class FileTask:
    """One file of the pull: its partial file, and how to prove it when complete."""

    file: PartialFile
    expected: tuple[bytes, ...] | None  # trusted BLAKE3 per chunk, or None (origin plan)
    check_sha256: bool
    exclude: set[str] = field(default_factory=set)  # sources not to use for this file
    used: set[str] = field(default_factory=set)
    remaining: int = 0


@dataclass
class Outcome:
    mismatched: list[FileTask]  # files whose SHA-256 did not match after all chunks came


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.5)


def _fetch_verify_write(source: ChunkSource, ref: ModelRef, task: FileTask, index: int,
                        buffer: mmap.mmap, deadline: float, claim: Callable[[], bool]) -> bool:
    """Runs in a worker thread: fetch into ``buffer``, verify (the chunk's one hash), write
    at the chunk's offset. False when another fetch of the same chunk (endgame) wrote it first."""
    pf = task.file
    offset, length = chunk_span(pf.size, pf.chunk_size, index)
    view = memoryview(buffer)[:length]
    started = time.thread_time()
    try:
        token = source.fetch(ref, ChunkRequest(pf.rel, offset, length, pf.size), view, deadline)
    finally:
        fetched = time.thread_time()
        LEDGER.add(recv=fetched - started)
    digest = blake3_hash(view)
    hashed = time.thread_time()
    if task.expected is not None and digest != task.expected[index]:
        LEDGER.add(hash=hashed - fetched)
        reason = f"chunk {index} of {pf.rel} whose BLAKE3 does not match the manifest; it was not written"
        raise IntegrityError(source.rejected(token, reason) or f"{source.label} sent {reason}")
    if not claim():
        LEDGER.add(hash=hashed - fetched)
        return False
    try:
        pf.write_chunk(index, view, digest, source.name)
    finally:
        LEDGER.add(hash=hashed - fetched, write=time.thread_time() - hashed)
    return True


ANY, PEERS, ORIGINS = "any", "peers", "origins"


@dataclass(frozen=True)
class Job:
    """One chunk to fetch, and from where.

    ``route``: ``ANY`` tries every source in order; ``PEERS`` only sources that take a
    chunk back when they fail it (LAN peers: ``ChunkSource.endgame``), and if they all fail
    the job goes back to the picker instead of on to an origin (a chunk a live peer holds
    is never fetched from the origin for its slowness); ``ORIGINS`` skips the peers (the
    picker claimed it for the origin). ``duplicate``: a second fetch of a chunk already in
    flight (the endgame), from peers; the first copy to verify is written, the other fetch
    is cancelled."""

    task: FileTask
    index: int
    duplicate: bool = False
    route: str = ANY

    @property
    def key(self) -> tuple[str, int]:
        return self.task.file.rel, self.index


HUGE_PAGE = 2 * 1024 * 1024
SMALL_CHUNK_KEPT = HUGE_PAGE  # below this, a worker keeps its buffer's pages between chunks


def chunk_buffer(size: int) -> mmap.mmap:
    """A worker's chunk buffer: anonymous memory, mapped at once and touched only as a chunk
    fills it (a ``bytearray`` would zero every page up front, in the event loop's thread,
    for every worker at a pull's start), and handed back to the system when dropped. Private:
    a shared anonymous map (``mmap``'s default) keeps its pages in shmem after
    ``release_pages``, only unmapped.

    Transparent huge pages where the system allows them (``madvise`` mode): a chunk then
    faults in two 2 MiB pages, not a thousand 4 KiB ones, measured at 0.06 against 0.9 CPU
    seconds per GiB for buffers given back between chunks (a virtual machine pays for every
    fresh page)."""
    buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE:
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP here: 4 KiB pages, as before
            pass
    return buffer


def release_pages(buffer: mmap.mmap) -> None:
    """Give a worker's buffer pages back between chunks (they come back zeroed as the next
    chunk fills them): a worker waiting for its next job holds no chunk's worth of memory,
    so the agent's resident size follows the chunks actually in flight."""
    try:
        buffer.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, OSError):  # no madvise here: the pages stay, as before
        pass


class Picker(Protocol):
    """The order chunks are fetched in. Workers ``take`` their next job (None: nothing left
    for this worker) and call ``done`` once the job is over, however it ended; a ``PEERS``
    job that was not written (its peers failed it) is the picker's again, to hand out later."""

    duplicates: int  # endgame jobs handed out

    async def take(self) -> Job | None: ...

    def done(self, job: Job) -> None: ...


class FifoPicker:
    """Chunks in file order: the order without LAN peers (``agent.swarm.picker.SwarmPicker``
    is the one with them). ``wanted``: (path, index) of chunks someone waits for right now
    (a tool reading a file through the gateway, in order; the set is the pull's, changed
    as they read): those first."""

    duplicates = 0

    def __init__(self, jobs: list[Job], workers: int = 1, wanted: set | None = None):
        self.pending = list(reversed(jobs))  # (every worker takes from the one list)
        self.wanted = wanted if wanted is not None else set()
        self._waiting = {job.key: job for job in jobs}  # not taken yet, by key

    async def take(self) -> Job | None:
        for key in list(self.wanted):
            job = self._waiting.pop(key, None)
            if job is not None:
                return job
        while self.pending:
            job = self.pending.pop()
            if self._waiting.pop(job.key, None) is not None:
                return job
        return None

    def done(self, job: Job) -> None:
        pass


class Finisher:
    """Finishes proven files in batches: whoever asks while a batch is being finished joins
    the next one, so a burst of small files costs one sync and one index transaction per
    batch, not a sync of every file and of its folder (``Store.finish_files``)."""

    MAX_BATCH = 256

    def __init__(self, finish: Callable[[list[PartialFile]], None], limiter: trio.CapacityLimiter | None = None):
        self._finish = finish
        self._limiter = limiter
        self._queue: list[tuple[PartialFile, trio.Event, list]] = []
        self._running = False

    async def finish(self, pf: PartialFile) -> None:
        done, outcome = trio.Event(), []
        self._queue.append((pf, done, outcome))
        if not self._running:
            self._running = True
            batch: list = []
            try:
                while self._queue:
                    batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                    try:
                        await trio.to_thread.run_sync(self._finish, [f for f, _, _ in batch], limiter=self._limiter)
                        error = None
                    except Exception as e:  # every file of the batch gets the batch's error
                        error = e
                    for _, event, out in batch:
                        out.append(error)
                        event.set()
                    batch = []
            finally:
                self._running = False
                for _, event, out in batch + self._queue:  # this task was cancelled: nobody is left to
                    out.append(Cancelled("the pull stopped before this file was finished"))  # finish these
                    event.set()
                self._queue = []
        await done.wait()
        if outcome and outcome[0] is not None:
            raise outcome[0]


class Gate:
    """Whether a pull's workers may start new chunks: closed, the chunks in flight finish
    and nothing new starts (no new claims on the room's origin chunks either) until it
    opens again. A room assignment's background pull is paused so while a person's own
    pull runs (``agent.assign.keeper``)."""

    def __init__(self):
        self._open = trio.Event()
        self._open.set()
        self.on_change: list[Callable[[bool], None]] = []  # told True (open) or False (closed)

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()
            for tell in self.on_change:
                tell(False)

    def open(self) -> None:
        if not self._open.is_set():
            self._open.set()
            for tell in self.on_change:
                tell(True)

    async def wait(self) -> None:
        await self._open.wait()


class Scheduler:
    """Fetches the missing chunks of a set of files. One instance per pull round.

    ``picker``: makes the ``Picker`` workers ask for their next chunk (``FifoPicker`` by
    default), from the jobs and how many workers will ask. ``finish``: makes a batch of
    proven files durable and records them (``Store.finish_files``), in a worker thread.
    """

    def __init__(self, ref: ModelRef, sources: list[SourceState], settings: Settings,
                 emit: Callable[[Event], None], rate: TokenBucket | None = None,
                 picker: Callable[[list[Job], int], Picker] = FifoPicker, *,
                 finish: Callable[[list[PartialFile]], None], gate: Gate | None = None):
        self.ref, self.sources, self.settings, self.emit = ref, sources, settings, emit
        self.gate = gate
        self.rate = rate
        self.picker = picker
        self._limiter = trio.CapacityLimiter(settings.concurrency)
        self._finisher = Finisher(finish)
        self.first_request_at: float | None = None  # monotonic time of the first chunk request
        # Endgame: which chunks have been written, and the fetches of each still running.
        self._written: set[tuple[str, int]] = set()
        self._written_lock = threading.Lock()
        self._running: dict[tuple[str, int], list[trio.CancelScope]] = {}

    def _claim(self, key: tuple[str, int]) -> Callable[[], bool]:
        def claim() -> bool:
            with self._written_lock:
                if key in self._written:
                    return False
                self._written.add(key)
                return True
        return claim

    async def run(self, tasks: list[FileTask]) -> Outcome:
        jobs: list[Job] = []
        for task in tasks:
            missing = task.file.missing
            task.remaining = len(missing)
            jobs.extend(Job(task, i) for i in missing)
        chunk_size = max((t.file.chunk_size for t in tasks), default=0)
        outcome = Outcome([])
        workers = min(self.settings.concurrency, len(jobs))
        picker = self.picker(jobs, workers)
        try:
            async with trio.open_nursery() as nursery:
                # Files already complete on entry (all chunks present after a crash) are
                # proven now; the others when their last chunk lands.
                for task in tasks:
                    if task.remaining == 0:
                        nursery.start_soon(self._finish_file, task, outcome)
                for _ in range(workers):
                    nursery.start_soon(self._worker, picker, chunk_buffer(chunk_size), nursery, outcome)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        return outcome

    async def _worker(self, picker: Picker, buffer: mmap.mmap, nursery, outcome: Outcome) -> None:
        while True:
            if self.gate is not None:
                await self.gate.wait()
            job = await picker.take()
            if job is None:
                break
            task = job.task
            try:
                outcome_ = await self._fetch_chunk(task, job.index, buffer, job)
            finally:
                picker.done(job)
            if outcome_ == ABANDONED:
                # The thread of the cancelled fetch may still be filling the old buffer.
                buffer = chunk_buffer(len(buffer))
            elif chunk_span(task.file.size, task.file.chunk_size, job.index)[1] >= SMALL_CHUNK_KEPT:
                release_pages(buffer)
            # A small chunk's pages are kept for the next one: given back, the next small file
            # would fault in (and the kernel zero) a whole 2 MiB huge page again; in a pull of
            # 2,000 small files that zeroing was a tenth of the CPU (perf). A worker so holds at
            # most SMALL_CHUNK_KEPT of touched pages (one huge page) between chunks.
            if outcome_ != WRITTEN:
                continue  # the other fetch of this chunk wrote it
            task.remaining -= 1
            if task.remaining == 0:
                nursery.start_soon(self._finish_file, task, outcome)

    def _pick_order(self, task: FileTask, route: str = ANY) -> list[SourceState]:
        path = task.file.rel
        usable = [s for s in self.sources if s.usable_for(path) and s.source.name not in task.exclude
                  and (route == ANY or s.source.endgame == (route == PEERS))]
        now = time.monotonic()
        awake = [s for s in usable if not s.resting(now)]
        # A resting source is still tried after the others, never skipped outright:
        # it may be the only one that has this file.
        return awake + [s for s in usable if s.resting(now)]

    async def _fetch_chunk(self, task: FileTask, index: int, buffer: mmap.mmap, job: Job) -> str:
        """Fetch one chunk; WRITTEN, LOST (another fetch of it wrote it), ABANDONED (that,
        while this one's thread was still running: its buffer is not ours any more) or
        DEFERRED (its peers failed a ``PEERS`` job: the picker has it again)."""
        key = (task.file.rel, index)
        endgame = job.duplicate
        route = PEERS if endgame else job.route
        with trio.CancelScope() as scope:
            self._running.setdefault(key, []).append(scope)
            try:
                if await self._fetch_chunk_from_sources(task, index, buffer, endgame, route):
                    others = [o for o in self._running.get(key, []) if o is not scope]
                    for other in others:
                        other.cancel()
                    if others:  # unblock their threads too: a fetch in a thread is not cancellable
                        for state in self.sources:
                            state.source.abort(task.file.rel, index)
                    return WRITTEN
                return LOST
            except ChunkFailed:
                with self._written_lock:
                    if key in self._written or endgame:
                        return LOST  # the other fetch has it (or will); an endgame try may fail
                if route == PEERS:
                    return DEFERRED
                raise
            finally:
                scopes = self._running.get(key, [])
                if scope in scopes:
                    scopes.remove(scope)
                if not scopes:
                    self._running.pop(key, None)
        return ABANDONED

    async def _fetch_chunk_from_sources(self, task: FileTask, index: int, buffer: mmap.mmap, endgame: bool,
                                        route: str) -> bool:
        path = task.file.rel
        reasons: list[str] = []
        for state in self._pick_order(task, route):
            source = state.source
            for attempt in range(self.settings.retries + 1):
                if self.rate is not None:  # the LAN is "lan"; the mirror and the origins are outside
                    await self.rate.take(chunk_span(task.file.size, task.file.chunk_size, index)[1],
                                         outside=source.name != "lan")
                deadline = time.monotonic() + self.settings.chunk_timeout
                try:
                    async with self._limiter:
                        if self.first_request_at is None:  # when bytes start moving (timings)
                            self.first_request_at = time.monotonic()
                        # An endgame copy is abandoned when the other fetch wins; a first
                        # fetch is not (SIGTERM lets it finish), its source aborts it instead.
                        written = await trio.to_thread.run_sync(
                            _fetch_verify_write, source, self.ref, task, index, buffer, deadline,
                            self._claim((path, index)), abandon_on_cancel=endgame)
                except NotFound as e:
                    state.lacks.add(path)
                    reasons.append(str(e))
                    break
                except ChunkNotHeld as e:
                    reasons.append(str(e))
                    break
                except CredentialsRejected as e:
                    state.disabled = str(e)
                    self.emit(SourceTrouble(source.name, f"{e}; using the next source"))
                    reasons.append(str(e))
                    break
                except IntegrityError as e:
                    self._failed(state)
                    self.emit(ChunkRejected(path, index, source.name))
                    self.emit(SourceTrouble(source.name, str(e)))
                    reasons.append(str(e))
                    break
                except SourceUnavailable as e:
                    self._failed(state)
                    reasons.append(str(e))
                    if not e.transient:
                        self.emit(SourceTrouble(source.name, str(e)))
                        break
                    if attempt < self.settings.retries:
                        await trio.sleep(_backoff(attempt))
                    continue
                state.failures_in_row = 0
                state.cooldown = COOLDOWN_START
                if not written:
                    return False
                task.used.add(source.name)
                self.emit(ChunkFetched(path, index, chunk_span(task.file.size, task.file.chunk_size, index)[1],
                                       source.name))
                return True
        detail = "; ".join(dict.fromkeys(reasons)) or "no source is configured for it"
        raise ChunkFailed(f"chunk {index} of {path} could not be fetched from any source: {detail}. "
                          "What was verified is kept; run the same pull again when a source is back")

    def _failed(self, state: SourceState) -> None:
        state.failures_in_row += 1
        if state.failures_in_row >= FAILURES_BEFORE_COOLDOWN and not state.resting(time.monotonic()):
            state.down_until = time.monotonic() + state.cooldown
            self.emit(SourceTrouble(state.source.name,
                                    f"{state.source.label} failed {state.failures_in_row} requests in a row; "
                                    f"trying other sources first for {state.cooldown:.0f} s"))
            state.cooldown = min(COOLDOWN_MAX, state.cooldown * 2)

    async def _finish_file(self, task: FileTask, outcome: Outcome) -> None:
        pf = task.file
        if task.check_sha256:
            if pf.sha256_pending:
                ok = await trio.to_thread.run_sync(pf.sha256_matches, limiter=self._limiter)
            else:  # hashed as its chunks landed (a small file: its one chunk): no thread needed
                ok = pf.sha256_matches()
            if not ok:
                outcome.mismatched.append(task)
                return
        await self._finisher.finish(pf)
        self.emit(FileDone(pf.rel, pf.size))
