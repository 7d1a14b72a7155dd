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
from typing import Callable

import trio

from agent.buffers import SMALL_CHUNK_KEPT, chunk_buffer, release_pages
from agent.config import Settings
from agent.cpu import LEDGER
from agent.errors import (Cancelled, ChunkFailed, ChunkNotHeld, CredentialsRejected, IntegrityError, NotFound,
                          SourceUnavailable, single_error)
from agent.manifest import ModelRef, chunk_span
from agent.ratelimit import TokenBucket
from agent.sources import ChunkRequest, ChunkSource
from agent.hashing import blake3_hash
from agent.picking import (ANY, PEERS, SMALL_BATCH_CHUNK, SMALL_BATCH_JOBS, SMALL_BATCH_SECONDS, FifoPicker, Gate, Job,
                           Picker)
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


def _fetch_verify_write(source: ChunkSource, ref: ModelRef, task: FileTask, index: int, buffer: mmap.mmap,
                        deadline: float, claim: Callable[[], bool], *,
                        clock: Callable[[], float] = time.thread_time) -> bool:
    """Runs in a worker thread: fetch into ``buffer``, verify (the chunk's one hash), write
    at the chunk's offset. False when another fetch of the same chunk (endgame) wrote it first.
    ``clock``: what times each part for the CPU ledger (a small batch, which times itself as a
    whole, passes ``_no_clock``: a read of the thread's CPU clock is a system call, ~20 µs
    here, three per chunk)."""
    pf = task.file
    offset, length = chunk_span(pf.size, pf.chunk_size, index)
    view = memoryview(buffer)[:length]
    started = clock()
    try:
        token = source.fetch(ref, ChunkRequest(pf.rel, offset, length, pf.size), view, deadline)
    finally:
        fetched = clock()
        LEDGER.add(recv=fetched - started)
    digest = blake3_hash(view)
    hashed = clock()
    LEDGER.add(hash=hashed - fetched)
    if task.expected is not None and digest != task.expected[index]:
        reason = f"chunk {index} of {pf.rel} whose BLAKE3 does not match the manifest; it was not written"
        raise IntegrityError(source.rejected(token, reason) or f"{source.label} sent {reason}")
    if not claim():
        return False
    try:
        pf.write_chunk(index, view, digest, source.name)
    finally:
        LEDGER.add(write=clock() - hashed)
    return True


def _no_clock() -> float:
    return 0.0


def _fetch_verify_write_many(source: ChunkSource, ref: ModelRef, items: list, buffer: mmap.mmap,
                             timeout: float) -> list[tuple[bool, object]]:
    """Runs in a worker thread: ``_fetch_verify_write`` of several small files' chunks from
    one source, one after the other in the one buffer; (True, written) for each, or
    (False, the exception) for the first that failed, where it stops (the scheduler takes
    that one the ordinary way: retries, the next source). It also stops once it has run
    ``SMALL_BATCH_SECONDS``: a slow source's files are not held back from their finish, nor
    the rest of the batch from the other workers (the scheduler gives those back)."""
    results: list[tuple[bool, object]] = []
    started = time.thread_time()
    until = time.monotonic() + SMALL_BATCH_SECONDS
    try:
        for task, index, claim in items:
            if results and time.monotonic() > until:
                break
            try:
                results.append((True, _fetch_verify_write(source, ref, task, index, buffer,
                                                          time.monotonic() + timeout, claim, clock=_no_clock)))
            except Exception as e:  # noqa: BLE001 - handed back to the scheduler's own handling
                results.append((False, e))
                break
    finally:  # small files' CPU goes to "recv" whole: the request is most of it
        LEDGER.add(recv=time.thread_time() - started)
    return results


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
        self._workers = 1
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
        self._workers = workers
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
            more = []
            if isinstance(picker, FifoPicker) and self._batchable(job):
                share = -(-picker.left // max(1, self._workers))  # what is left, split fairly
                more = picker.take_more(self._batchable, min(SMALL_BATCH_JOBS, share + 1) - 1)
            if more:
                buffer = await self._fetch_small_batch([job, *more], picker, buffer, nursery, outcome)
                continue
            task = job.task
            try:
                outcome_ = await self._fetch_chunk(task, job.index, buffer, job)
            finally:
                picker.done(job)
            buffer = self._after(job, outcome_, buffer, nursery, outcome)

    def _after(self, job: Job, outcome_: str, buffer: mmap.mmap, nursery, outcome: Outcome) -> mmap.mmap:
        """A fetched chunk's bookkeeping: the worker's buffer (a new one after an abandoned
        fetch), and the file's finish once its last chunk is written."""
        task = job.task
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
            return buffer  # the other fetch of this chunk wrote it
        task.remaining -= 1
        if task.remaining == 0:
            nursery.start_soon(self._finish_file, task, outcome)
        return buffer

    def _batchable(self, job: Job) -> bool:
        """A small file's one chunk (a large file's chunks go one at a time, whatever their size)."""
        return (job.route == ANY and not job.duplicate and job.task.file.count == 1
                and job.task.file.size <= SMALL_BATCH_CHUNK)

    async def _fetch_small_batch(self, jobs: list[Job], picker: FifoPicker, buffer: mmap.mmap, nursery,
                                 outcome: Outcome) -> mmap.mmap:
        """Small chunks (many small files) fetched in one thread hop from their first source:
        the event loop's work per chunk (a hop to a thread and back, the limiter, a cancel
        scope) was a third of the CPU a pull of 2,000 small files took in Python (py-spy).
        A chunk that fails, and those after it, go the ordinary way, the failure included
        (``_fetch_chunk``'s ``failed``: the same retries, rejections and next sources)."""
        first_source = {id(j): next(iter(self._pick_order(j.task)), None) for j in jobs}
        state = first_source[id(jobs[0])]
        together = [j for j in jobs if state is not None and first_source[id(j)] is state]
        results: list[tuple[bool, object]] = []
        if together:
            if self.rate is not None:
                await self.rate.take(sum(chunk_span(j.task.file.size, j.task.file.chunk_size, j.index)[1]
                                         for j in together), outside=state.source.name != "lan")
            async with self._limiter:
                if self.first_request_at is None:
                    self.first_request_at = time.monotonic()
                results = await trio.to_thread.run_sync(
                    _fetch_verify_write_many, state.source, self.ref,
                    [(j.task, j.index, self._claim(j.key)) for j in together], buffer, self.settings.chunk_timeout)
        done = {id(j): r for j, r in zip(together, results)}
        untried = together[len(results):]
        if untried:  # cut short by time: the rest are anyone's
            picker.give_back(untried)
            given_back = {id(j) for j in untried}
            jobs = [j for j in jobs if id(j) not in given_back]
        for job in jobs:
            task, result = job.task, done.get(id(job))
            try:
                if result is not None and result[0]:
                    state.failures_in_row = 0
                    state.cooldown = COOLDOWN_START
                    outcome_ = WRITTEN if result[1] else LOST
                    if result[1]:
                        task.used.add(state.source.name)
                        self.emit(ChunkFetched(task.file.rel, job.index, chunk_span(
                            task.file.size, task.file.chunk_size, job.index)[1], state.source.name))
                else:
                    failed = (state, result[1]) if result is not None else None
                    outcome_ = await self._fetch_chunk(task, job.index, buffer, job, failed=failed)
            finally:
                picker.done(job)
            buffer = self._after(job, outcome_, buffer, nursery, outcome)
        return buffer

    def _pick_order(self, task: FileTask, route: str = ANY) -> list[SourceState]:
        path = task.file.rel
        usable = [s for s in self.sources if s.usable_for(path) and s.source.name not in task.exclude
                  and (route == ANY or s.source.endgame == (route == PEERS))]
        now = time.monotonic()
        awake = [s for s in usable if not s.resting(now)]
        # A resting source is still tried after the others, never skipped outright:
        # it may be the only one that has this file.
        return awake + [s for s in usable if s.resting(now)]

    async def _fetch_chunk(self, task: FileTask, index: int, buffer: mmap.mmap, job: Job,
                           failed: tuple[SourceState, BaseException] | None = None) -> str:
        """Fetch one chunk; WRITTEN, LOST (another fetch of it wrote it), ABANDONED (that,
        while this one's thread was still running: its buffer is not ours any more) or
        DEFERRED (its peers failed a ``PEERS`` job: the picker has it again)."""
        key = (task.file.rel, index)
        endgame = job.duplicate
        route = PEERS if endgame else job.route
        with trio.CancelScope() as scope:
            self._running.setdefault(key, []).append(scope)
            try:
                if await self._fetch_chunk_from_sources(task, index, buffer, endgame, route, failed):
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
                                        route: str, failed: tuple[SourceState, BaseException] | None = None) -> bool:
        """``failed``: the first try from that source already happened (a small batch's) and
        raised this: it is handled as if this loop's own first try had."""
        path = task.file.rel
        reasons: list[str] = []
        for state in self._pick_order(task, route):
            source = state.source
            for attempt in range(self.settings.retries + 1):
                already = failed[1] if failed is not None and failed[0] is state and attempt == 0 else None
                failed = None
                if self.rate is not None and already is None:  # the LAN is "lan"; the rest is outside
                    await self.rate.take(chunk_span(task.file.size, task.file.chunk_size, index)[1],
                                         outside=source.name != "lan")
                deadline = time.monotonic() + self.settings.chunk_timeout
                try:
                    if already is not None:
                        raise already
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
