"""One pull, end to end: resolve what the revision is, plan, fetch, prove, record.

1. Resolve (``agent.plan``): a trusted LAN peer's manifest, else the mirror's manifest,
   else the origin's listing (paths, sizes, SHA-256; chunk hashes computed on arrival).
2. Plan: lock the revision in the store, check free space, open a ``.partial`` per file
   (re-verifying what an earlier run left), list the missing chunks.
3. Fetch with the scheduler; each file is proven when its last chunk lands — by every
   chunk's BLAKE3 against a trusted manifest, or by the origin's SHA-256 — then renamed
   into place. A file whose SHA-256 does not match (origin plan) is fetched again from
   sources that did not supply it, and only what agrees is kept.
4. Record the manifest (built from the verified chunks on an origin plan), so the next
   pull, ``shoal verify``, the mirror and LAN peers can use it.

With the LAN swarm and a trusted plan, LAN peers come first (``agent.swarm.source``), the
swarm's chunk order and origin policy apply (``agent.swarm.picker``), the session follows
peers' HAVE streams (``agent.swarm.session``) and this pull's board tells them what it
holds and claims as it goes (``agent.swarm.board``).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from agent.config import Settings
from agent.errors import DiskFull, IntegrityError, NotFound, SourceUnavailable, UnsafePath, single_error
from agent.manifest import PARTIAL_SUFFIX, Manifest, ModelRef, chunk_span, is_manifest_id
from agent.mirrorage import MirrorAge
from agent.plan import Plan, plan_from_offers, plan_manifest, resolve
from agent.ratelimit import TokenBucket
from agent.safefs import SafeDir, overlaps
from agent.picking import FifoPicker, Job, Picker
from agent.scheduler import ChunkFetched, ChunkRejected, FileDone, FileTask, Scheduler, SourceState, SourceTrouble
from agent.sources import ChunkSource, make_sources
from agent.store import Store

MAX_ROUNDS = 3  # first fetch plus re-fetches of files whose SHA-256 did not match


@dataclass(frozen=True)
class PlanReady:
    """Event: the pull knows what it will fetch."""

    plan: Plan
    directory: Path
    already: int  # bytes verified before this run (those taken from the cache included)
    reused: int = 0  # of those, bytes the cache held under another model or revision: no fetch


@dataclass(frozen=True)
class Imported:
    """Event: files of a folder being imported (``shoal import``) that matched the plan and
    are the cache's now, and those that did not (fetched instead)."""

    kept: int
    kept_bytes: int
    refused: dict[str, str]


@dataclass(frozen=True)
class Evicted:
    """Event: a least recently used model was removed to make room under the quota."""

    model: str
    size: int


@dataclass
class PullResult:
    ref: ModelRef
    directory: Path
    manifest_id: str
    total_size: int
    reused_bytes: int = 0  # held by content under another model or revision: linked or copied, not fetched
    imported_bytes: int = 0  # of those, what a folder being imported held (shoal import)
    fetched_by_source: dict[str, int] = field(default_factory=dict)
    chunks_fetched: int = 0
    endgame_duplicates: int = 0  # chunks fetched a second time from another peer at the end
    origin_duplicate_chunks: int = 0  # chunks this pull fetched from the origin that a peer also did
    first_byte_s: float | None = None  # from the pull's start to its first verified chunk
    # plan_s, room_s, first_request_s (bytes start moving), first_chunk_s: when each was ready
    timings: dict[str, float] = field(default_factory=dict)
    first_request_at: float | None = None  # monotonic time of the first chunk request
    elapsed: float = 0.0
    troubles: list[str] = field(default_factory=list)
    mirror: dict | None = None  # the mirror copy's age and whether upstream moved (agent.mirrorage)


MIRROR_AGE_GRACE = 1.0  # how long a finished pull waits for the upstream check's answer


async def _check_mirror_age(plan: Plan, sources: list[ChunkSource], emit, checked: trio.Event) -> None:
    """When the plan is the OSS mirror's manifest and ModelScope is a source: ask upstream
    (one listing) beside the pull, and say how the mirror's copy compares."""
    try:
        oss = next((s for s in sources if s.name == "oss"), None)
        modelscope = next((s for s in sources if s.name == "modelscope"), None)
        if oss is None or modelscope is None or plan.origin != f"{oss.label} manifest":
            return
        from agent.mirrorage import check_mirror_age
        age = await trio.to_thread.run_sync(check_mirror_age, plan, oss, modelscope, abandon_on_cancel=True)
        if age is not None:
            emit(age)
    finally:
        checked.set()


class SwarmPart:
    """The LAN side of one pull with a trusted manifest: the view of the peers, the LAN
    source, this pull's board, the pickers, and what it fetched from the origin."""

    def __init__(self, session, manifest: Manifest, settings: Settings, wanted: set | None = None):
        from agent.swarm.source import LanPeerSource
        from agent.swarm.view import LanView
        self.session, self.settings, self.wanted = session, settings, wanted
        self.view = LanView(manifest, session.self_id, location=session.location)
        self.source = LanPeerSource(self.view)
        self.board = None  # set once the pull is recorded (it starts from what the store holds)
        self.pickers: list[Picker] = []
        self.from_origin: set[int] = set()
        # SHOAL_TRACE=FILE (benchmarks): when each chunk arrived and from where, written at the end.
        self.trace_to = os.environ.get("SHOAL_TRACE")
        self.arrivals: list[tuple[float, int, str]] = []

    def picker(self, jobs: list[Job], workers: int) -> Picker:
        from agent.swarm.picker import SwarmPicker
        self.pickers.append(SwarmPicker(self.view, self.board, jobs, origin_streams=self.settings.origin_streams,
                                        workers=workers, wanted=self.wanted))
        return self.pickers[-1]

    def on_event(self, event) -> None:
        if isinstance(event, ChunkFetched) and self.board is not None:
            ordinal = self.view.ordinals.of(event.path, event.index)
            from_origin = event.source != self.source.name
            if from_origin:
                self.from_origin.add(ordinal)
            self.board.add_have(ordinal, from_origin)
            if self.trace_to:
                self.arrivals.append((time.time(), ordinal, event.source))

    async def run(self, fetch):
        """Follow the peers while ``fetch()`` runs; its result."""
        # The board starts from what the store holds (SQLite): off the event loop.
        self.board = await trio.to_thread.run_sync(self.session.board_for, self.view.manifest)
        try:
            async with trio.open_nursery() as nursery:
                # The peers' first answers (and stream frames) come before any chunk is chosen.
                await nursery.start(self.session.follow, self.view, self.board)
                result = await fetch()
                result.origin_duplicate_chunks = self.view.origin_duplicates(self.from_origin)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        return result

    def close(self) -> None:
        self.source.close()
        if self.trace_to and self.arrivals:
            with open(self.trace_to, "w") as f:
                f.writelines(f"{t:.3f} {ordinal} {source}\n" for t, ordinal, source in self.arrivals)


def _first_line(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 160 else text[:157] + "..."


def cached_plan(store: Store, ref: ModelRef, partial_ok: bool = False) -> tuple[Plan, bool] | None:
    """The plan of ``ref`` from the cache's own manifest, and whether it needs no origin at
    all (True: pinned by manifest id; False: a complete model that a reachable origin may
    still update, for a branch or tag; with ``partial_ok`` also one partly pulled under a
    trusted manifest, which an offline pull finishes from the room). None when the cache
    cannot say what ``ref`` is."""
    if is_manifest_id(ref.revision):
        try:
            manifest = store.manifest(ref.revision)
        except (FileNotFoundError, NotFound, UnsafePath):
            return None
        if manifest.model_id != ref.model_id:
            return None
        return Plan(ref, manifest.chunk_size, manifest.files, trusted=True,
                    origin="the cache's manifest (pinned by id)", revision=manifest.revision), True
    found = store.holding(model_id=ref.model_id, revision=ref.revision)
    if found is None:
        return None
    try:
        info = store.find(ref)
        manifest = store.manifest(found[1])
    except (FileNotFoundError, NotFound, UnsafePath):
        return None
    if info.state != "complete" and not partial_ok:
        return None
    where = "the cache (complete)" if info.state == "complete" else "the cache's manifest"
    return Plan(ref, manifest.chunk_size, manifest.files, trusted=True, origin=where), False


def _free_bytes(directory: Path) -> int:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _bytes_needed(store: Store, directory: Path, plan: Plan, held=frozenset()) -> tuple[int, int]:
    """(bytes the pull still has to allocate in ``directory``: files not complete nor
    ``held`` by content, less the space their partials already hold; the full size of those
    files, what the cache grows by)."""
    try:
        model = store.open_dir(directory)
    except FileNotFoundError:
        grow = sum(f.size for f in plan.files if f.path not in held)
        return grow, grow
    need = grow = 0
    with model:
        for f in plan.files:
            if f.path in held:
                continue
            try:
                parent, name = model.parent_of(f.path)
            except FileNotFoundError:
                need += f.size
                grow += f.size
                continue
            with parent:
                if parent.is_own_file(name, f.size):
                    continue
                partial = parent.stat(name + PARTIAL_SUFFIX)
                need += max(0, f.size - (partial.st_blocks * 512 if partial is not None else 0))
                grow += f.size
    return need, grow


def check_target(to: Path, cache_dir: Path) -> Path:
    """The resolved ``--to`` folder, refused when it is, holds or lies inside the cache: the
    cache's own layout must stay what its index says."""
    target = Path(os.path.realpath(to))
    if overlaps(target, Path(cache_dir)):
        raise UnsafePath(f"--to {target} overlaps the cache {Path(cache_dir).resolve()}; pull into a folder "
                         "outside the cache, or leave --to out to use the cache's own model folder")
    return target


async def pull(ref: ModelRef, settings: Settings, *, to: Path | None = None,
               emit: Callable[[object], None] = lambda event: None,
               sources: list[ChunkSource] | None = None,
               rate: TokenBucket | None = None, swarm=None, trust=None, fresh: bool = False,
               adopt_from: Path | None = None, move: bool = False, offers: tuple = (),
               gate=None, wanted: set | None = None) -> PullResult:
    """Pull ``ref`` into the store (or ``to``); see module docstring. Raises ``ShoalError``s.

    ``swarm``: the agent's LAN swarm for this pull (an ``agent.swarm.session.PullSession``):
    what peers answered before the pull (``offers``), this agent's peer id, its boards and
    the HAVE streams. A peer's manifest becomes the plan only if ``trust`` accepts it (a
    trusted publisher's signature or a pinned id).

    ``fresh``: upstream's current files, not the mirror's copy (nor peers' manifests):
    the plan comes from the origin's listing and the OSS mirror is left out. Otherwise a
    plan from the mirror is checked against upstream beside the pull (``agent.mirrorage``).

    ``adopt_from``: a folder holding (some of) the files already (``shoal import``): each
    that matches the plan becomes the cache's (``agent.adopt``; ``move`` moves it there)
    and only the rest is fetched.

    ``offers``: manifests offered besides the peers' (``protocol.Answer``s: a bundle's,
    ``agent.bundle``), trusted under the same rule. ``gate``: a ``picking.Gate`` that
    pauses the pull while closed. ``wanted``: (path, index) of chunks someone waits for
    now (the gateway's readers), fetched first (``picking.FifoPicker``).
    """
    started = time.monotonic()
    result_parts = {"troubles": [], "by_source": {}, "chunks": 0, "first_byte": None}
    part: SwarmPart | None = None

    def record(event) -> None:
        if isinstance(event, MirrorAge):
            result_parts["mirror"] = {"made_at": event.made_at, "upstream_moved": event.upstream_moved}
        if isinstance(event, SourceTrouble):
            result_parts["troubles"].append(event.message)
        elif isinstance(event, ChunkFetched):
            by_source = result_parts["by_source"]
            by_source[event.source] = by_source.get(event.source, 0) + event.nbytes
            result_parts["chunks"] += 1
            if result_parts["first_byte"] is None:
                result_parts["first_byte"] = round(time.monotonic() - started, 3)
        if part is not None:
            part.on_event(event)
        emit(event)

    own_sources = sources is None
    sources = ([] if settings.offline else make_sources(settings)) if own_sources else sources
    used = [] if settings.offline else [s for s in sources if s.name != "oss"] if fresh else sources
    store = await trio.to_thread.run_sync(Store, settings.cache_dir)
    try:
        offers = [*offers, *(swarm.offers if swarm is not None and not fresh else [])]
        plan, refused = plan_from_offers(ref, offers, trust) if offers and trust else (None, [])
        cached = None if plan is not None else await trio.to_thread.run_sync(cached_plan, store, ref,
                                                                               settings.offline)
        if cached is not None and (cached[1] or settings.offline):
            plan = cached[0]  # a revision pinned by manifest id, or offline: no origin is asked
        if plan is None:
            try:
                plan = await resolve(ref, used, record, settings.chunk_size)
            except (NotFound, SourceUnavailable) as e:
                if refused:  # the only answer came from peers we may not believe: say so
                    raise refused[0] from e
                if cached is not None and cached[1] is False and isinstance(e, SourceUnavailable):
                    # Complete here; upstream unreachable: what the hub's client does offline.
                    record(SourceTrouble("cache", f"upstream could not be checked ({_first_line(e)}); using "
                                         f"the complete copy in the cache"))
                    plan = cached[0]
                elif settings.offline:
                    raise NotFound(f"{ref} is not in the cache and the room has no copy this agent trusts; "
                                   "offline (SHOAL_OFFLINE / --offline) no origin is asked: pull it once "
                                   "online, or from a room that holds it") from e
                else:
                    raise
        result_parts["plan_s"] = round(time.monotonic() - started, 3)
        if swarm is not None and plan.trusted:
            part = SwarmPart(swarm, plan.manifest(), settings, wanted)
            if gate is not None:  # paused, it says it is not pulling: the room's origin chunks are not left to it
                gate.on_change.append(lambda is_open, part=part: part.board is not None
                                      and part.board.set_pulling(is_open))
        directory = check_target(Path(to), settings.cache_dir) if to else store.default_dir(ref)
        await trio.to_thread.run_sync(store.lock, ref)
        try:
            async with trio.open_nursery() as nursery:
                checked = trio.Event()
                if not fresh:
                    nursery.start_soon(_check_mirror_age, plan, used, record, checked)
                if adopt_from is not None:
                    from agent.adopt import adopt
                    found = await trio.to_thread.run_sync(adopt, store, plan.files, plan.chunk_size, plan.trusted,
                                                          Path(adopt_from), move)
                    result_parts["imported"] = found.bytes
                    record(Imported(len(found.kept), found.bytes, found.refused))
                result = await _run(plan, directory, store, [part.source, *used] if part else used, settings,
                                    record, rate if rate is not None else TokenBucket(settings.download_rate), part,
                                    found.chunks if adopt_from is not None else None, gate, wanted)
                with trio.move_on_after(MIRROR_AGE_GRACE):  # a moment for the answer; never more
                    await checked.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the pull's own error, not the nursery's wrapping
            raise single_error(group) from None
        finally:
            store.unlock(ref)
    finally:
        store.close()
        if part is not None:
            part.close()
        if own_sources:
            for source in sources:
                source.close()
    result.elapsed = time.monotonic() - started
    result.endgame_duplicates = sum(p.duplicates for p in part.pickers) if part else 0
    result.troubles = result_parts["troubles"]
    result.fetched_by_source = result_parts["by_source"]
    result.chunks_fetched = result_parts["chunks"]
    result.first_byte_s = result_parts["first_byte"]
    result.mirror = result_parts.get("mirror")
    result.imported_bytes = result_parts.get("imported", 0)
    result.timings["plan_s"] = result_parts["plan_s"]
    if result.first_request_at is not None:
        result.timings["first_request_s"] = round(result.first_request_at - started, 3)
    if result.first_byte_s is not None:  # kept here too: a client reports its own first byte as first_byte_s
        result.timings["first_chunk_s"] = result.first_byte_s
    if part is not None and part.view.settled_at is not None:
        result.timings["room_s"] = round(part.view.settled_at - started, 3)
    return result


async def _run(plan: Plan, directory: Path, store: Store, sources: list[ChunkSource],
               settings: Settings, emit, rate: TokenBucket, part: SwarmPart | None,
               hashed: dict | None = None, gate=None, wanted: set | None = None) -> PullResult:
    ref = plan.ref

    # Each step below is a blocking call, made in a worker thread; they go in two hops,
    # not one each: a pull's first request waits on them, and on a busy machine (a room of
    # agents starting at once) every hop waits for a time slice.
    def check_space() -> tuple[int, list, int, dict, list[str]]:
        # Check the space before the pull, not in the middle of it: preallocation would
        # fail on the first file that does not fit. Nothing is created before these checks.
        # What the cache holds by content under another model or revision is linked, not
        # fetched, and takes no new space (agent.store.content).
        store.check_dir_free(ref, directory)
        held, notes = store.held(ref, plan.files, plan.chunk_size, plan.trusted, hashed)
        need, grow = _bytes_needed(store, directory, plan, held)
        evicted = store.make_room(ref, grow, settings.quota, settings.quota_high, settings.quota_low,
                                  kept=frozenset(h.sha256 for h in held.values()))
        return need, evicted, _free_bytes(directory), held, notes
    need, evicted, free, held, notes = await trio.to_thread.run_sync(check_space)
    for note in notes:
        emit(SourceTrouble("cache", note))
    for gone in evicted:
        emit(Evicted(str(gone.ref), gone.total_size))
    if need > free:
        raise DiskFull(f"{ref} needs {need} more bytes in {directory} and only {free} are free: "
                       "free some space (`shoal rm` a model you no longer need) and pull again")

    def record() -> tuple[SafeDir, int]:
        # Only a pull that passed the checks above is recorded in the index.
        model = store.open_dir(directory, create=True)
        try:
            store.begin(ref, model.path, plan.chunk_size, [(f.path, f.size, f.sha256) for f in plan.files])
            if plan.trusted:  # LAN peers may fetch what this pull has verified while it runs
                store.expect(ref, plan.manifest())
                if plan.signature is not None:  # and learn whose it is from here too
                    store.save_signature(plan.manifest().id, plan.signature)
            linked = store.link_held(ref, model, held)
        except BaseException:
            model.close()
            raise
        return model, linked
    model, linked = await trio.to_thread.run_sync(record)
    try:
        async def fetch() -> PullResult:
            return await _fetch_all(plan, model, store, sources, settings, emit, rate,
                                    part.picker if part else functools.partial(FifoPicker, wanted=wanted),
                                    linked, gate)
        return await (part.run(fetch) if part else fetch())
    finally:
        model.close()


async def _fetch_all(plan: Plan, model: SafeDir, store: Store, sources: list[ChunkSource],
                     settings: Settings, emit, rate: TokenBucket, picker, linked: int = 0,
                     gate=None) -> PullResult:
    ref, directory = plan.ref, model.path
    tasks: list[FileTask] = []
    reused = linked
    try:
        def open_files() -> int:  # in one thread hop for them all (see _run); what is held already
            nonlocal reused
            already = 0
            opened = store.open_files(ref, model, [(f.path, f.size, f.sha256, f.chunks) for f in plan.files],
                                      plan.chunk_size)
            for f, pf in zip(plan.files, opened):
                if pf is None:
                    already += f.size
                    continue
                if plan.trusted and pf.missing:  # chunks this cache verified under another file
                    reused += store.reuse_chunks(pf, f.chunks)
                already += sum(chunk_span(f.size, plan.chunk_size, i)[1] for i in pf.have)
                pf.track_sha256 = not plan.trusted or settings.always_sha256
                pf.defer_claim = not plan.trusted  # no peer reads this pull's claims before it ends
                tasks.append(FileTask(pf, f.chunks, check_sha256=pf.track_sha256))
            return already
        already = await trio.to_thread.run_sync(open_files)
        emit(PlanReady(plan, directory, already, reused))
        states = [SourceState(s) for s in sources]
        first_request_at = None
        for round_ in range(MAX_ROUNDS):
            scheduler = Scheduler(ref, states, settings, emit, rate, picker, finish=store.finish_files, gate=gate)
            outcome = await scheduler.run(tasks)
            first_request_at = first_request_at or scheduler.first_request_at
            if not outcome.mismatched:
                break
            tasks = []
            for task in outcome.mismatched:
                bad = sorted(task.used | task.exclude)
                emit(SourceTrouble(",".join(bad), f"{task.file.rel} does not match the SHA-256 the origin "
                                   f"listed after fetching it from {', '.join(bad)}; fetching it again elsewhere"))
                task.exclude |= task.used
                task.used = set()
                await trio.to_thread.run_sync(task.file.forget, list(task.file.have))
                tasks.append(task)
            if round_ == MAX_ROUNDS - 1 or all(
                    not [s for s in states if s.source.name not in t.exclude] for t in tasks):
                names = ", ".join(t.file.rel for t in tasks)
                raise IntegrityError(
                    f"{names} of {ref} does not match the SHA-256 the origin listed, from every source "
                    "that has it; nothing unverified was kept. The origin's copy or listing may be "
                    "damaged: report it, or pin a known-good revision")
    finally:
        for task in tasks:
            task.file.close()
    manifest = plan.manifest() if plan.trusted else await trio.to_thread.run_sync(plan_manifest, plan, store)
    manifest_id = await trio.to_thread.run_sync(store.complete, ref, manifest)
    return PullResult(ref, directory, manifest_id, plan.total_size, reused_bytes=reused,
                      first_request_at=first_request_at)


def event_to_wire(event) -> dict:
    """A pull event as a plain dict: what --json prints and the control API streams."""
    if isinstance(event, PlanReady):
        plan = event.plan
        return {"type": "plan", "model": str(plan.ref), "plan": plan.origin, "trusted": plan.trusted,
                "files": len(plan.files), "total_bytes": plan.total_size, "already_bytes": event.already,
                "reused_bytes": event.reused,
                "chunk_size": plan.chunk_size, "directory": str(event.directory)}
    if isinstance(event, ChunkFetched):
        return {"type": "chunk", "path": event.path, "index": event.index, "nbytes": event.nbytes,
                "source": event.source}
    if isinstance(event, ChunkRejected):
        return {"type": "rejected", "path": event.path, "index": event.index, "source": event.source}
    if isinstance(event, FileDone):
        return {"type": "file_done", "path": event.path, "size": event.size}
    if isinstance(event, SourceTrouble):
        return {"type": "trouble", "source": event.source, "message": event.message}
    if isinstance(event, Evicted):
        return {"type": "evicted", "model": event.model, "size": event.size}
    if isinstance(event, Imported):
        return {"type": "imported", "files": event.kept, "bytes": event.kept_bytes, "refused": event.refused}
    if isinstance(event, MirrorAge):
        return {"type": "mirror_age", "made_at": event.made_at, "upstream_moved": event.upstream_moved,
                "message": event.message}
    raise TypeError(f"not a pull event: {event!r}")


def result_to_wire(result: PullResult) -> dict:
    return {"model": str(result.ref), "directory": str(result.directory), "manifest_id": result.manifest_id,
            "total_bytes": result.total_size, "reused_bytes": result.reused_bytes,
            "imported_bytes": result.imported_bytes,
            "fetched_by_source": result.fetched_by_source,
            "chunks_fetched": result.chunks_fetched, "endgame_duplicates": result.endgame_duplicates,
            "origin_duplicate_chunks": result.origin_duplicate_chunks, "first_byte_s": result.first_byte_s,
            "timings": result.timings, "mirror_copy": result.mirror,
            "elapsed_s": round(result.elapsed, 3), "troubles": result.troubles}
