"""The order a pull's chunks are fetched in, without LAN peers: the ``Job`` a worker takes
(one chunk, and from where), the ``Picker`` protocol the scheduler's workers ask,
``FifoPicker`` (file order, small and large chunks in step), and the ``Gate`` that lets
workers take jobs or holds them. The picker with peers is
``agent.swarm.picker.SwarmPicker``; the scheduler is ``agent.scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import trio

from agent.manifest import chunk_span

if TYPE_CHECKING:
    from agent.scheduler import FileTask

ANY, PEERS, ORIGINS = "any", "peers", "origins"
SMALL_BATCH_CHUNK = 256 * 1024  # files of one chunk up to this size are fetched several at a time:
SMALL_BATCH_JOBS = 16           # at most this many, a fair share of what is left for each worker,
SMALL_BATCH_SECONDS = 0.25      # and for about this long


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


class Picker(Protocol):
    """The order chunks are fetched in. Workers ``take`` their next job (None: nothing left
    for this worker) and call ``done`` once the job is over, however it ended; a ``PEERS``
    job that was not written (its peers failed it) is the picker's again, to hand out later."""

    duplicates: int  # endgame jobs handed out

    async def take(self) -> Job | None: ...

    def done(self, job: Job) -> None: ...


def job_bytes(job: Job) -> int:
    return chunk_span(job.task.file.size, job.task.file.chunk_size, job.index)[1]


def interleave_by_bytes(jobs: list[Job]) -> list[Job]:
    """The small chunks (up to ``SMALL_BATCH_CHUNK``: small files) and the large ones, each in
    file order, merged so that both advance at the same pace in bytes. Small files cost the
    CPU (a request, a record, a finish each), large chunks the link; taken in file order, a
    repository of many small files and one large one did all of the first and then the
    second, one after the other (benchmarks/small_files.py)."""
    small = [j for j in jobs if job_bytes(j) <= SMALL_BATCH_CHUNK]
    large = [j for j in jobs if job_bytes(j) > SMALL_BATCH_CHUNK]
    if not small or not large:
        return jobs
    small_total, large_total = sum(map(job_bytes, small)), sum(map(job_bytes, large))
    merged: list[Job] = []
    i = j = small_done = large_done = 0
    while i < len(small) or j < len(large):
        if j >= len(large) or (i < len(small) and small_done * large_total <= large_done * small_total):
            merged.append(small[i])
            small_done += job_bytes(small[i])
            i += 1
        else:
            merged.append(large[j])
            large_done += job_bytes(large[j])
            j += 1
    return merged


class FifoPicker:
    """Chunks in file order, small and large ones interleaved (``interleave_by_bytes``): the
    order without LAN peers (``agent.swarm.picker.SwarmPicker`` is the one with them).
    ``wanted``: (path, index) of chunks someone waits for right now (a tool reading a file
    through the gateway, in order; the set is the pull's, changed as they read): those first."""

    duplicates = 0

    def __init__(self, jobs: list[Job], workers: int = 1, wanted: set | None = None):
        jobs = interleave_by_bytes(jobs)
        self.pending = list(reversed(jobs))  # (every worker takes from the one list)
        self.wanted = wanted if wanted is not None else set()
        self._waiting = {job.key: job for job in jobs}  # not taken yet, by key

    async def take(self) -> Job | None:
        return self.take_now()

    def take_now(self) -> Job | None:
        for key in list(self.wanted):
            job = self._waiting.pop(key, None)
            if job is not None:
                return job
        while self.pending:
            job = self.pending.pop()
            if self._waiting.pop(job.key, None) is not None:
                return job
        return None

    @property
    def left(self) -> int:
        """Jobs not handed out yet."""
        return len(self._waiting)

    def give_back(self, jobs: list[Job]) -> None:
        """Jobs a worker took and did not start (a small batch cut short): next in line again."""
        for job in reversed(jobs):
            self._waiting[job.key] = job
            self.pending.append(job)

    def take_more(self, fits: Callable[[Job], bool], limit: int) -> list[Job]:
        """Up to ``limit`` more jobs that ``fits`` accepts, next in order, taken now (the
        small chunks a worker fetches in one go); none while someone waits for chunks."""
        taken: list[Job] = []
        while len(taken) < limit and self.pending and not self.wanted:
            job = self.pending[-1]
            if job.key not in self._waiting:
                self.pending.pop()  # taken already (a wanted chunk)
                continue
            if not fits(job):
                break
            self.pending.pop()
            del self._waiting[job.key]
            taken.append(job)
        return taken

    def done(self, job: Job) -> None:
        pass


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
