"""This agent's part in a room's assignments (``agent.assign.record``), as a member and as
the teacher.

As a **member** it keeps the newest record it accepted and acts on it: each assigned
revision is pulled in the background, one at a time, from the room first (the pull path
is every pull's: cache, LAN peers, mirror, origin), and pinned once complete; a revision
the teacher retracts is unpinned (unless the person pinned it). A person's own pull goes
first: while one runs, the background pull is stopped (its verified chunks kept) and
resumes after. An item with ``at`` waits until that time of day. A member may refuse an
item (``shoal room refuse``) or every assignment (``room.accept_assignments = false``).

As the **teacher** (``shoal room push``/``retract``) it signs the room's new record with
the agent's identity (its ``shoal id``: the key the join code hands out), signs the pushed
revisions' manifests it holds (so members may take them from the room), and hands the
record to every peer, who hand it on.

Spreading: a new record goes to every connected peer at once; a peer newly connected is
asked once; while the room has assignments every peer is asked every ``REFRESH`` seconds
(what it holds whole: the room's copies, ``keep_copies``). Whoever holds the newest record
gives it, so a machine that was off catches up from anyone.

**Copies that stay**: an assigned revision this member holds whole is kept from eviction
while fewer than ``keep_copies`` other members hold it whole (``Store.room_keeps``; ``shoal
du`` says so).

State (``CACHE/room/assignments.json``, 0600): the record, the newest seq per publisher,
refused items, what the room pinned, the teacher's last seq.

Threads: the data server answers room asks from its threads (``answer``): it reads
immutable snapshots and hands a pushed record to the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.assign import record as rec
from agent.assign import wire
from agent.errors import Cancelled, NotFound, ShoalError, UsageError
from agent.manifest import ModelRef
from agent.pull import ChunkFetched, PlanReady
from agent.safefs import SafeDir

log = logging.getLogger("shoal.room")

REFRESH = 30.0  # seconds between asks of every peer while the room has assignments
WATCH = 1.0  # seconds between looks at the peers and at a person's pulls
RETRY = 60.0  # seconds before a failed item is tried again
ASK_TIMEOUT = 5.0
STATE_FILE = "assignments.json"


@dataclass
class ItemState:
    """How one assigned item stands on this machine (what the teacher's room status shows)."""

    state: str = "waiting"  # waiting, queued, pulling, paused, complete, failed, refused, released
    detail: str = ""
    have: int = 0
    total: int = 0
    by_source: dict = field(default_factory=dict)
    retry_at: float = 0.0

    def wire(self) -> dict:
        return {"state": self.state, "detail": self.detail, "have": self.have, "total": self.total,
                "by_source": dict(self.by_source)}


class RoomWork:
    """See module docstring. ``swarm`` returns the running ``Swarm`` (or None)."""

    def __init__(self, settings, store, pulls, swarm):
        from agent.swarm.trust import parse_publishers
        self.settings, self.store, self.pulls, self._swarm = settings, store, pulls, swarm
        self.room = rec.room_id(settings.swarm_secret) if settings.swarm_secret else None
        self.trusted = parse_publishers(settings.trusted_publishers)
        self.accepting = settings.room_accept_assignments
        self.keep_copies = settings.room_keep_copies
        self.current: rec.Signed | None = None
        self.newest: dict[str, int] = {}
        self.refused: set[str] = set()
        self.room_pins: set[str] = set()  # str(ref) the room pinned (the person had not)
        self.pin_seen: set[str] = set()  # str(ref) whose pin the room has settled once (never again)
        self.teacher_seq = 0
        self.items: dict[str, ItemState] = {}
        self.holders: dict[str, dict[str, float]] = {}  # str(ref) -> peer -> when it said it holds it whole
        self.reports: dict[str, dict] = {}  # peer -> its last status report (the teacher's room status)
        self.refusals: list[str] = []  # the last records refused, and why (shown in `room assignments`)
        self._asked: set[str] = set()  # peers asked since they connected
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._folder = Path(settings.cache_dir) / "room"

    # ------------------------------------------------------------------ state

    def _load(self) -> None:
        try:
            doc = json.loads((self._folder / STATE_FILE).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("the room's state %s is unreadable (%s): starting without it; the newest record "
                        "comes from the room again", self._folder / STATE_FILE, e)
            return
        self.newest = {k: int(v) for k, v in doc.get("newest", {}).items()}
        self.refused = set(doc.get("refused", []))
        self.room_pins = set(doc.get("room_pins", []))
        self.pin_seen = set(doc.get("pin_seen", []))
        self.teacher_seq = int(doc.get("teacher_seq", 0))
        if doc.get("record"):
            try:
                self.current = rec.decode(bytes.fromhex(doc["record"]))
            except ShoalError as e:
                log.warning("the kept assignment record is damaged (%s): waiting for the room's", e)

    def _save(self) -> None:
        doc = {"record": self.current.envelope.hex() if self.current else None, "newest": self.newest,
               "refused": sorted(self.refused), "room_pins": sorted(self.room_pins),
               "pin_seen": sorted(self.pin_seen),
               "teacher_seq": self.teacher_seq}
        with SafeDir.open(self._folder, create=True, mode=0o700) as folder:
            folder.write_atomic(STATE_FILE, json.dumps(doc).encode())

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self._load)
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._work)
            nursery.start_soon(self._spread)
            task_status.started()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _work(self) -> None:
        """Act on the current record: one item at a time, a person's pull first."""
        told: list[str] = []
        while True:
            changed = self._changed
            await self._settle_pins()
            item = await self._next_item()
            if sorted(self.holds()) != told:  # the room's copies changed here: say so now
                told = sorted(self.holds())
                await self._tell_all()
            if item is None:
                with trio.move_on_after(WATCH * 5):
                    await changed.wait()
                continue
            await self._pull(item)

    def _person_pulls(self, besides: ModelRef | None = None) -> list[str]:
        return [key for key, active in list(self.pulls.pulls.items())
                if not active.background and (besides is None or key != str(besides))]

    async def _next_item(self) -> rec.Item | None:
        """The first item to pull now, setting every item's state on the way."""
        record = self.current.record if self.current else None
        if record is None:
            return None
        now = time.time()
        chosen = None
        for item in record.items:
            key = str(item.ref)
            state = self.items.setdefault(key, ItemState())
            if not self.accepting or key in self.refused:
                state.state, state.detail = "refused", ("this machine takes no assignments (room.accept_assignments)"
                                                        if not self.accepting else "refused on this machine")
                continue
            info = await self._find(item.ref)
            if info is not None and info.state == "complete":
                state.state, state.detail, state.have, state.total = "complete", "", info.total_size, info.total_size
                await self._pin(item.ref)  # held before it was assigned: pinned too (once)
                continue
            if key in self.pin_seen:  # it was here and pinned; the person unpinned it and the cache let it go
                state.state, state.detail, state.have = "released", ("unpinned here and evicted; the room keeps its "
                                                                     "copies (`shoal pull` takes it again)"), 0
                continue
            if item.at and now < rec.start_at(item.at, record.issued):
                state.state, state.detail = "waiting", f"starts at {item.at}"
                continue
            if state.state == "failed" and now < state.retry_at:
                continue
            if chosen is None:
                chosen = item
            elif state.state != "failed":
                state.state, state.detail = "queued", f"after {chosen.ref}"
        if chosen is not None and self._person_pulls(chosen.ref):
            state = self.items[str(chosen.ref)]
            state.state, state.detail = "queued", "a person's pull on this machine goes first"
            return None
        return chosen

    async def _find(self, ref: ModelRef):
        try:
            return await trio.to_thread.run_sync(self.store.find, ref)
        except NotFound:
            return None

    async def _pull(self, item: rec.Item) -> None:
        """Pull ``item`` in the background until done, retracted, or a person's pull starts."""
        key, state = str(item.ref), self.items[str(item.ref)]
        state.state, state.detail = "pulling", ""
        active = self.pulls.start(item.ref, None, background=True)

        async def on_event(event) -> None:
            if isinstance(event, PlanReady):
                state.total, state.have = event.plan.total_size, event.already
            elif isinstance(event, ChunkFetched):
                state.have += event.nbytes
                state.by_source[event.source] = state.by_source.get(event.source, 0) + event.nbytes

        with trio.CancelScope() as scope:
            async def yield_to_people() -> None:
                """Paused while a person's pull runs (the chunks in flight finish: no origin
                chunk the room counts on is dropped midway); stopped if no longer wanted."""
                while True:
                    with trio.move_on_after(WATCH):  # or at once when a person's pull starts or ends
                        await self.pulls.people_changed.wait()
                    current = self.current.record if self.current else None
                    if current is None or current.item(item.ref) is None or key in self.refused or not self.accepting:
                        scope.cancel()
                        return
                    if not active.background:  # a person asked for it too: it is theirs now
                        return
                    if self._person_pulls(item.ref):
                        if active.gate.is_open:
                            active.gate.close()
                            state.state, state.detail = "paused", "a person's pull on this machine goes first"
                            log.info("room: %s paused: a person's pull on this machine goes first", key)
                    elif not active.gate.is_open:
                        active.gate.open()
                        state.state, state.detail = "pulling", ""
                        log.info("room: %s resumed", key)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(yield_to_people)
                    await self.pulls.follow(active, on_event)
                    nursery.cancel_scope.cancel()
                await self._pin(item.ref)
                state.state, state.detail = "complete", ""
                log.info("room: %s is here and pinned, as the teacher assigned", key)
            except Cancelled:  # someone stopped it (`shoal cancel`): tried again later, not at once
                state.state, state.detail, state.retry_at = "failed", "cancelled on this machine; tried again later " \
                    "(`shoal room refuse` to keep it off)", time.time() + RETRY
            except ShoalError as e:
                state.state, state.detail, state.retry_at = "failed", _why(e), time.time() + RETRY
                log.warning("room: the assigned %s could not be pulled: %s (trying again in %.0f s)", key, e, RETRY)
            except BaseExceptionGroup as group:
                from agent.errors import single_error
                error = single_error(group)
                if not isinstance(error, ShoalError):
                    raise
                state.state, state.detail, state.retry_at = "failed", _why(error), time.time() + RETRY
        if scope.cancelled_caught and state.state in ("pulling", "paused"):
            state.state, state.detail = "queued", "stopped: no longer assigned here"

    async def _pin(self, ref: ModelRef) -> None:
        """Pin an assigned revision, once: one the person pinned stays theirs (a retraction
        leaves it pinned), and one the person unpinned after is not pinned again."""
        if str(ref) in self.pin_seen:
            return
        info = await self._find(ref)
        if info is None:
            return
        if not info.pinned:
            await trio.to_thread.run_sync(self.store.set_pinned, ref, True)
            self.room_pins.add(str(ref))
        self.pin_seen.add(str(ref))
        await trio.to_thread.run_sync(self._save)

    async def _settle_pins(self) -> None:
        """Unpin what the room pinned and no longer assigns (or this machine refused); keep
        the room's copies (``Store.room_keeps``)."""
        record = self.current.record if self.current else None
        assigned = {str(i.ref) for i in record.items} if record else set()
        self.pin_seen &= assigned - self.refused
        for key in sorted(self.room_pins - (assigned - self.refused)):
            ref = ModelRef.parse(key)
            if await self._find(ref) is not None:
                await trio.to_thread.run_sync(self.store.set_pinned, ref, False)
                log.info("room: %s is no longer assigned: unpinned (the cache may evict it)", key)
            self.room_pins.discard(key)
            await trio.to_thread.run_sync(self._save)
        self.store.room_keeps = self.keeps()

    def keeps(self) -> dict[str, str]:
        """Assigned revisions eviction must leave alone: fewer than ``keep_copies`` other
        members hold them whole (str(ref) -> why, for `shoal du`)."""
        record = self.current.record if self.current else None
        if record is None or self.keep_copies <= 0:
            return {}
        fresh = time.time() - 3 * REFRESH
        kept = {}
        for item in record.items:
            others = sum(1 for seen in self.holders.get(str(item.ref), {}).values() if seen >= fresh)
            if others < self.keep_copies:
                kept[str(item.ref)] = (f"kept for the room: {others} other member{'s' if others != 1 else ''} "
                                       f"hold{'s' if others == 1 else ''} it whole, the room keeps {self.keep_copies}")
        return kept

    # ------------------------------------------------------------------ records

    def offer(self, envelope: bytes, source: str) -> bool:
        """A record from ``source`` (a peer, or a bundle): taken if this member acts on it
        (``record.accept``), refused and logged otherwise. Returns whether it was taken."""
        if self.room is None:
            return False
        try:
            signed = rec.accept(envelope, room=self.room, trusted=self.trusted, newest=self.newest)
        except rec.AssignmentRefused as e:
            if self.current is None or envelope != self.current.envelope:
                log.warning("room: refused an assignment record from %s: %s", source, e)
                self.refusals = (self.refusals + [f"from {source}: {e}"])[-10:]
            return False
        self.newest[signed.publisher] = signed.record.seq
        self.current = signed
        self._save()
        log.info("room: assignment record #%d from %s (%d items): %s", signed.record.seq, source,
                 len(signed.record.items), ", ".join(str(i.ref) for i in signed.record.items) or "none")
        self._poke()
        if self._nursery is not None:
            self._nursery.start_soon(self._hand_on, signed.envelope, source)
        return True

    async def teach(self, items: list[rec.Item], *, retract: list[ModelRef] = (), replace: bool = False) -> rec.Signed:
        """The teacher: a new record with ``items`` added (or replacing the list) and
        ``retract`` removed, signed, kept and handed to every peer."""
        if self.room is None:
            raise UsageError("this agent is in no room: `shoal room create` first (assignments go to a room's "
                             "members)")
        identity = self._identity()
        if identity.publisher_id not in self.trusted and self.trusted:
            log.info("room: this agent signs as %s, which its own settings do not list as trusted",
                     identity.publisher_id[:16])
        kept = [] if replace or self.current is None else [i for i in self.current.record.items
                                                              if self.current.publisher == identity.publisher_id]
        by_ref = {i.ref: i for i in kept}
        for item in items:
            by_ref[item.ref] = item
        for ref in retract:
            if ref not in by_ref:
                raise NotFound(f"{ref} is not assigned to the room (`shoal room assignments` lists what is)")
            del by_ref[ref]
        if len(by_ref) > rec.MAX_ITEMS:
            raise UsageError(f"a room holds at most {rec.MAX_ITEMS} assignments at once; retract some")
        await self._sign_manifests([i.ref for i in items])
        self.teacher_seq = rec.next_seq(max(self.teacher_seq, self.newest.get(identity.publisher_id, 0)))
        record = rec.Record(self.room, self.teacher_seq, int(time.time()), tuple(by_ref.values()))
        envelope = rec.sign(record, identity)
        signed = rec.decode(envelope)
        self.newest[signed.publisher] = record.seq
        self.current = signed
        await trio.to_thread.run_sync(self._save)
        self._poke()
        log.info("room: this teacher's record #%d assigns %s", record.seq, ", ".join(str(i.ref) for i in record.items)
                 or "nothing")
        await self._hand_on(envelope, "this teacher")
        return signed

    def _identity(self):
        from agent.swarm.trust import Identity
        return Identity.load_or_create(Path(self.settings.cache_dir) / "identity.key")

    async def _sign_manifests(self, refs: list[ModelRef]) -> None:
        """What the teacher assigns and holds is signed too, so members may take it from the room."""
        identity = self._identity()
        for ref in refs:
            info = await self._find(ref)
            if info is not None and info.manifest_id and info.state == "complete":
                await trio.to_thread.run_sync(self.store.save_signature, info.manifest_id,
                                              identity.sign_manifest(info.manifest_id))

    def refuse(self, ref: ModelRef, refused: bool = True) -> None:
        """Refuse an item here, or take it again (also one released after an unpin)."""
        (self.refused.add if refused else self.refused.discard)(str(ref))
        if not refused:
            self.pin_seen.discard(str(ref))
            self.room_pins.discard(str(ref))
        self._save()
        self._poke()

    # ------------------------------------------------------------------ the room's peers

    def holds(self) -> list[str]:
        """Assigned revisions this member holds whole (told to peers)."""
        return [key for key, state in self.items.items() if state.state == "complete"]

    def report(self) -> dict:
        """This member's status report (the teacher's `room status`)."""
        record = self.current.record if self.current else None
        usage_free = None
        try:
            st = os.statvfs(self.settings.cache_dir)
            usage_free = st.f_bavail * st.f_frsize
        except OSError:
            pass
        return {"name": socket.gethostname()[:64], "seq": record.seq if record else 0,
                "accepting": self.accepting, "free_bytes": usage_free,
                "items": {str(i.ref): self.items.get(str(i.ref), ItemState()).wire() for i in record.items}
                if record else {}}

    def answer(self, peer: str, request: bytes) -> bytes:
        """A room ask from ``peer``, on the data server's thread: parsed there, answered on the
        event loop (which owns this state): a pushed record is offered, what the asker holds
        noted; the answer is our record when newer, what we hold whole, and our report."""
        seq, push, want_status, holds = wire.parse_ask(request)
        if self._token is None:
            return wire.encode_answer(None, [], None)
        try:
            return trio.from_thread.run_sync(self._answer, peer, seq, push, want_status, holds,
                                             trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):
            return wire.encode_answer(None, [], None)

    def _answer(self, peer: str, seq: int, push: bytes | None, want_status: bool, holds: list[str]) -> bytes:
        self._note_holds(peer, holds)
        if push is not None:
            self.offer(push, f"peer {peer[:12]}…")
        current = self.current
        mine = current.envelope if current is not None and current.record.seq > seq else None
        return wire.encode_answer(mine, self.holds(), self.report() if want_status else None)

    async def ask(self, peer: str, *, push: bytes | None = None, status: bool = False) -> dict | None:
        """Ask ``peer`` (and give it ``push``): takes a newer record it has, notes what it holds;
        its report when ``status``, else {}; None if it could not answer."""
        swarm = self._swarm()
        if swarm is None:
            return None
        seq = self.current.record.seq if self.current else 0
        try:
            data = await swarm.asks.room_ask(peer, wire.encode_ask(seq, push, status, self.holds()), ASK_TIMEOUT)
            if data is None:
                return None
            record, holds, report = wire.parse_answer(data)
        except (ShoalError, OSError, trio.TooSlowError) as e:
            log.debug("room ask of %s: %s", peer[:12], e)
            return None
        self._note_holds(peer, holds)
        now = time.time()
        if record is not None:
            self.offer(record, f"peer {peer[:12]}…")
        if report is not None:
            self.reports[peer] = {**report, "at": now}
        return report or {}

    def _note_holds(self, peer: str, holds: list[str]) -> None:
        """What ``peer`` holds whole of the assignments, as it just said (the room's copies)."""
        now = time.time()
        for key in list(self.holders):
            self.holders[key].pop(peer, None)
        for key in holds:
            self.holders.setdefault(key, {})[peer] = now
        self.store.room_keeps = self.keeps()

    async def _tell_all(self) -> None:
        """Ask every connected peer once (each ask says what this member holds whole)."""
        swarm = self._swarm()
        if swarm is None:
            return
        async with trio.open_nursery() as nursery:
            for peer in swarm.node.connected() - swarm.node.refused_by:
                nursery.start_soon(lambda p=peer: self.ask(p))

    async def _hand_on(self, envelope: bytes, source: str) -> None:
        swarm = self._swarm()
        if swarm is None:
            return
        async with trio.open_nursery() as nursery:
            for peer in swarm.node.connected() - swarm.node.refused_by:
                nursery.start_soon(lambda p=peer: self.ask(p, push=envelope))

    async def _spread(self) -> None:
        """Ask each newly connected peer once; every peer each ``REFRESH`` while assignments stand."""
        last_round = 0.0
        while True:
            await trio.sleep(WATCH)
            swarm = self._swarm()
            if swarm is None or self.room is None:
                continue
            connected = swarm.node.connected() - swarm.node.refused_by
            self._asked &= connected
            due = connected - self._asked
            if self.current is not None and self.current.record.items and time.monotonic() - last_round >= REFRESH:
                due, last_round = connected, time.monotonic()
            if due:
                self._asked |= due
                async with trio.open_nursery() as nursery:
                    for peer in due:
                        nursery.start_soon(lambda p=peer: self.ask(p))
                self.store.room_keeps = self.keeps()

    async def room_status(self) -> dict:
        """The room as the teacher sees it (``agent.assign.status``)."""
        from agent.assign.status import room_view
        swarm = self._swarm()
        peers = swarm.snapshot() if swarm is not None else []
        connected = [p["id"] for p in peers if p.get("connected")]
        async with trio.open_nursery() as nursery:
            for peer in connected:
                nursery.start_soon(lambda p=peer: self.ask(p, status=True))
        return room_view(self.current.record if self.current else None, peers, self.reports, self.report(),
                         self.settings, time.time())


def _why(error: ShoalError) -> str:
    return f"{error.title}: {str(error)[:300]}"
