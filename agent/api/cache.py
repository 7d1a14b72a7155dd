"""Control API methods on pulls and the store: pull, cancel, list, remove, pin, unpin, gc,
du, model_detail, mirror_models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.api.table import Call, ModelParams, NoParams, method
from agent.errors import StoreLocked, UsageError
from agent.manifest import ModelRef
from agent.pull import event_to_wire
from agent.store import model_row


@dataclass(frozen=True)
class PullParams:
    model: ModelRef
    to: str | None = None  # an absolute folder; only the agent's own user or root
    fresh: bool = False  # upstream's current files, not the mirror's copy (agent.pull)
    offline: bool = False  # ask no origin: the cache and the room only


def _target(agent, to: str | None, uid: int) -> Path | None:
    if to is None:
        return None
    # Where the agent writes is its own business and root's: anyone else (the control
    # group) gets the cache's own model folder. See agent.safefs for how the folder itself
    # is then opened.
    if uid not in (os.getuid(), 0):
        raise UsageError(f"only the agent's own user (uid {os.getuid()}) or root may pull into a folder "
                         "of their choosing (--to); leave --to out and use the cache's folder "
                         "(`shoal ls` shows it)")
    if not os.path.isabs(to) or "\0" in to:
        raise UsageError("'to' must be an absolute directory path")
    from agent.pull import check_target
    return check_target(Path(to), agent.settings.cache_dir)


async def follow_wire(agent, ref: ModelRef, directory: Path | None, call: Call, *, fresh: bool = False,
                      offline: bool = False) -> dict:
    """Start or join the pull of ``ref`` and stream its events to the caller."""
    async def send(event) -> None:
        await call.send_event(event_to_wire(event))
    return await agent.pulls.follow(agent.pulls.start(ref, directory, fresh=fresh, offline=offline), send)


@method("pull", PullParams, "Pull a model (or join its running pull); the result names its folder.",
        streams=True)
async def pull(agent, p: PullParams, call: Call):
    # The target's checks open and stat folders: off the event loop.
    target = await trio.to_thread.run_sync(_target, agent, p.to, call.uid)
    return await follow_wire(agent, p.model, target, call, fresh=p.fresh, offline=p.offline)


@dataclass(frozen=True)
class ImportParams:
    model: ModelRef
    dir: str  # an absolute folder holding (some of) the files; only the agent's own user or root
    move: bool = False  # move matching files into the cache instead of linking or copying them


def callers_folder(call: Call, folder: str, command: str) -> None:
    """Reading a folder of the caller's choosing is for the agent's own user and root, as
    --to is: the agent may read what the caller may not."""
    if call.uid not in (os.getuid(), 0):
        raise UsageError(f"only the agent's own user (uid {os.getuid()}) or root may have the agent read a folder "
                         f"of their choosing; run {command} as that user, or copy the folder somewhere it can read")
    if not os.path.isabs(folder) or "\0" in folder:
        raise UsageError("'dir' must be an absolute directory path")


@method("import", ImportParams, "Adopt a folder's files that match the plan (`shoal import`), then fetch the rest.",
        streams=True)
async def import_dir(agent, p: ImportParams, call: Call):
    from agent.adopt import check_source
    callers_folder(call, p.dir, "`shoal import`")
    if str(p.model) in agent.pulls:
        raise StoreLocked(f"{p.model} is being pulled; wait for it (or `shoal cancel {p.model}`) and import again")
    source = await trio.to_thread.run_sync(check_source, Path(p.dir))

    async def send(event) -> None:
        await call.send_event(event_to_wire(event))
    return await agent.pulls.follow(agent.pulls.start(p.model, None, adopt_from=source, move=p.move), send)


@method("cancel", ModelParams, "Stop the running pull of a model; verified chunks are kept.")
async def cancel(agent, p: ModelParams, call: Call):
    await agent.pulls.cancel(p.model)
    return {"cancelled": str(p.model)}


@method("list", NoParams, "Every model in the cache (`shoal ls`).", quiet=True)
async def list_models(agent, p: NoParams, call: Call):
    models = await trio.to_thread.run_sync(agent.store.models)
    return [model_row(m, str(m.ref) in agent.pulls) for m in models]


@method("remove", ModelParams, "Remove a model from the cache (not while it is pulled).")
async def remove(agent, p: ModelParams, call: Call):
    ref = p.model
    if str(ref) in agent.pulls:
        raise StoreLocked(f"{ref} is being pulled; `shoal cancel {ref}` first")

    def work():
        agent.store.lock(ref)
        try:
            return agent.store.remove(ref)
        finally:
            agent.store.unlock(ref)
    return model_row(await trio.to_thread.run_sync(work), False)


@method("pin", ModelParams, "Never evict this model.")
async def pin(agent, p: ModelParams, call: Call):
    return model_row(await trio.to_thread.run_sync(agent.store.set_pinned, p.model, True), False)


@method("unpin", ModelParams, "Let this model be evicted when the cache is over its quota.")
async def unpin(agent, p: ModelParams, call: Call):
    return model_row(await trio.to_thread.run_sync(agent.store.set_pinned, p.model, False), False)


@method("gc", NoParams, "Evict least recently used unpinned models down to the low watermark.")
async def gc(agent, p: NoParams, call: Call):
    evicted = await trio.to_thread.run_sync(agent.store.gc, agent.settings.quota, agent.settings.quota_low)
    return [model_row(m, False) for m in evicted]


@method("du", NoParams, "Disk use (each file once) and, per model, what removing it would free; the quota.", quiet=True)
async def du(agent, p: NoParams, call: Call):
    from agent.store import du_rows
    report = await trio.to_thread.run_sync(lambda: du_rows(agent.store, active=set(agent.pulls)))
    return {**report, "quota_bytes": agent.settings.quota}


@method("model_detail", ModelParams, "One model: its row, its files' chunk maps, the LAN peers holding it.", quiet=True)
async def model_detail(agent, p: ModelParams, call: Call):
    info = await trio.to_thread.run_sync(agent.store.find, p.model)
    files = await trio.to_thread.run_sync(agent.store.chunk_map, p.model)
    return {**model_row(info, str(p.model) in agent.pulls), "files": files,
            "peers": agent.swarm.holders(info.ref, info.manifest_id) if agent.swarm is not None else []}


@method("mirror_models", NoParams, "Models the OSS mirror holds (empty without a mirror).", quiet=True)
async def mirror_models(agent, p: NoParams, call: Call):
    oss = next((s for s in agent.sources if s.name == "oss"), None)
    if oss is None:
        return []
    found = await trio.to_thread.run_sync(oss.list_models)
    return [{"model": m, "revision": r} for m, r in found]
