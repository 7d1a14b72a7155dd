"""Control API methods on a room's assignments (``agent.assign``): room_push, room_retract,
room_assignments, room_refuse, room_status; and offline bundles (``agent.bundle``):
bundle_import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.api.table import Call, NoParams, method
from agent.assign.record import KINDS, make_item
from agent.errors import UsageError
from agent.manifest import ModelRef


def _room(agent):
    if agent.room is None:
        raise UsageError("this agent is in no room's swarm (swarm off): `shoal room create` (the teacher) or "
                         "`shoal room join CODE` (a student) first")
    return agent.room


def _teacher(call: Call) -> None:
    if call.uid not in (os.getuid(), 0):
        raise UsageError(f"only the agent's own user (uid {os.getuid()}) or root may assign to the room")


@dataclass(frozen=True)
class PushParams:
    items: list  # [{"ref": "OWNER/NAME[@REV]", "kind": "model" | "dataset" | "adapter"}, ...]
    at: str | None = None  # HH:MM: members start then
    by: str | None = None  # HH:MM: wanted by then


@method("room_push", PushParams, "The teacher: assign models, datasets or adapters to every machine of the room "
        "(signed with this agent's key, handed to every member); the new record.")
async def room_push(agent, p: PushParams, call: Call):
    _teacher(call)
    if not p.items or len(p.items) > 64:
        raise UsageError("push 1 to 64 items")
    items = []
    for raw in p.items:
        if not isinstance(raw, dict) or not isinstance(raw.get("ref"), str) or raw.get("kind", "model") not in KINDS:
            raise UsageError("each item is {ref: OWNER/NAME[@REV], kind: model|dataset|adapter}")
        kind = raw.get("kind", "model")
        items.append(make_item(ModelRef.parse(raw["ref"], dataset=kind == "dataset"), kind, p.at, p.by))
    signed = await _room(agent).teach(items)
    return _record(signed)


@dataclass(frozen=True)
class RetractParams:
    refs: list  # ["OWNER/NAME[@REV]" or "datasets/OWNER/NAME[@REV]", ...]


@method("room_retract", RetractParams, "The teacher: take assignments back (members unpin them); the new record.")
async def room_retract(agent, p: RetractParams, call: Call):
    _teacher(call)
    if not p.refs or not all(isinstance(r, str) for r in p.refs):
        raise UsageError("name the assignments to retract (OWNER/NAME[@REV])")
    signed = await _room(agent).teach([], retract=[ModelRef.parse(r) for r in p.refs])
    return _record(signed)


@method("room_assignments", NoParams, "The room's assignments as this machine holds them: each item's state, "
        "what this machine refused, records it refused and why.", quiet=True)
async def room_assignments(agent, p: NoParams, call: Call):
    room = _room(agent)
    current = room.current
    report = room.report()
    return {"room": room.room, "accepting": room.accepting, "keep_copies": room.keep_copies,
            "record": _record(current) if current else None, "items": report["items"],
            "envelope": current.envelope.hex() if current else None,
            "refused": sorted(room.refused), "refusals": list(room.refusals), "keeps": room.keeps()}


@dataclass(frozen=True)
class RefuseParams:
    model: ModelRef
    undo: bool = False


@method("room_refuse", RefuseParams, "Refuse an assignment on this machine (or take it back with undo): it is "
        "not pulled, and the room pins nothing of it here.")
async def room_refuse(agent, p: RefuseParams, call: Call):
    _room(agent).refuse(p.model, not p.undo)
    return {"model": str(p.model), "refused": not p.undo}


@method("room_status", NoParams, "The room from the teacher's seat: every member, each assignment's state and "
        "percent, bytes by source, who is stuck and why, the ETA beside the Kumar-Ross bound.", quiet=True)
async def room_status(agent, p: NoParams, call: Call):
    return await _room(agent).room_status()


def _record(signed) -> dict:
    record = signed.record
    return {"seq": record.seq, "issued": record.issued, "publisher": signed.publisher,
            "items": [i.wire() for i in record.items]}


@dataclass(frozen=True)
class BundleParams:
    dir: str  # an absolute folder: a bundle (`shoal bundle export`)


@method("bundle_import", BundleParams, "Check an offline bundle (signatures, every chunk) and add its revisions to "
        "the cache, asking no origin; its assignment record goes to the room.", streams=True)
async def bundle_import(agent, p: BundleParams, call: Call):
    import trio

    from agent.bundle import check_bundle
    from agent.pull import event_to_wire
    from agent.api.cache import callers_folder
    callers_folder(call, p.dir, "`shoal bundle import`")
    items, assignment = await trio.to_thread.run_sync(check_bundle, Path(p.dir), agent.pulls.trust)
    assigned: set[str] = set()
    if assignment is not None and agent.room is not None:
        agent.room.offer(assignment, f"bundle {p.dir}")
    if agent.room is not None and agent.room.current is not None:
        assigned = {str(i.ref) for i in agent.room.current.record.items}

    async def send(event) -> None:
        await call.send_event(event_to_wire(event))
    done = []
    for item in items:
        active = agent.pulls.start(item.ref, None, adopt_from=item.folder, offline=True, offers=(item.offer(),))
        result = await agent.pulls.follow(active, send)
        if str(item.ref) in assigned:
            await trio.to_thread.run_sync(agent.store.set_pinned, item.ref, True)
        done.append({"ref": str(item.ref), "kind": item.kind, "manifest_id": result["manifest_id"],
                     "imported_bytes": result.get("imported_bytes", 0), "pinned": str(item.ref) in assigned})
    return {"items": done, "assignment": assignment is not None}
