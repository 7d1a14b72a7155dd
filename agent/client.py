"""One way to the cache for every command and the TUI: a ``Backend``, chosen once.

``open_backend(settings)`` returns an ``AgentBackend`` when an agent serves this cache
(its control socket answers), else a ``LocalBackend`` that opens the store in this
process. Commands call the backend's methods and never ask which one they hold; a
method only an agent can serve (status, peers, run-time config) raises ``AgentNeeded``
from the local backend, with the command that starts one.

Both backends answer in the control API's wire form (``agent.api``): rows are the dicts
``agent.store.model_row`` builds, a pull's result is ``agent.pull.result_to_wire``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from agent.config import Settings
from agent.errors import AgentNeeded, NotFound, UsageError
from agent.manifest import ModelRef

PULL_TIMEOUT = 600.0  # seconds without any frame from the agent before a pull's client gives up

OnEvent = Callable[[dict], None]


class Backend(Protocol):
    """What a command may ask of the cache. See module docstring."""

    settings: Settings
    kind: str  # "agent" or "local", for messages

    def pull(self, ref: ModelRef, *, to: Path | None = None, on_event: OnEvent | None = None,
             fresh: bool = False, offline: bool = False) -> dict: ...
    def import_dir(self, ref: ModelRef, source: Path, *, move: bool = False,
                   on_event: OnEvent | None = None) -> dict: ...
    def models(self) -> list[dict]: ...
    def remove(self, ref: ModelRef) -> dict: ...
    def set_pinned(self, ref: ModelRef, pinned: bool) -> dict: ...
    def gc(self) -> list[dict]: ...
    def usage(self) -> dict: ...
    def config(self) -> list[list[str]]: ...
    def call(self, method: str, params: dict | None = None, *, on_event: OnEvent | None = None,
             timeout: float | None = None): ...


def open_backend(settings: Settings, *, need_agent: bool = False) -> "AgentBackend | LocalBackend":
    """The agent's backend when one runs for ``settings.cache_dir``, else the local one
    (or ``AgentNeeded`` with ``need_agent``)."""
    backend = AgentBackend.connect(settings)
    if backend is not None:
        return backend
    if need_agent:
        raise AgentNeeded(f"no shoal agent is running for {settings.cache_dir} (socket {settings.socket_path}); "
                          "start one with `shoal agent` (or `systemctl start shoal-agent`)")
    return LocalBackend(settings)


def ensure_model(backend: Backend, ref: ModelRef, on_event: OnEvent | None = None,
                 on_pull: Callable[[], None] | None = None) -> tuple[Path, dict | None]:
    """The folder of ``ref`` in the cache, pulled first when missing or incomplete.
    Returns (folder, the pull's result or None when it was already complete)."""
    from agent.store import Store
    store = Store(backend.settings.cache_dir)
    try:
        try:
            info = store.find(ref)
            if info.state == "complete" and info.dir.is_dir():
                store.touch(ref)
                return info.dir, None
        except NotFound:
            pass
    finally:
        store.close()
    if on_pull is not None:
        on_pull()
    result = backend.pull(ref, on_event=on_event)
    return Path(result["directory"]), result


class AgentBackend:
    """The running agent, over its control socket (``agent.rpc``)."""

    kind = "agent"

    def __init__(self, settings: Settings, client):
        self.settings, self.client = settings, client

    @classmethod
    def connect(cls, settings: Settings, *, timeout: float = 10) -> "AgentBackend | None":
        """The agent serving ``settings``' cache, or None when none answers."""
        from agent.rpc import ControlClient
        path = settings.socket_path
        try:
            if not path.exists():
                return None
            client = ControlClient(str(path), timeout=timeout)
            client.call("ping")
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket left behind by an agent that died
        except PermissionError:
            # The socket, or the agent's cache directory around it (0750), is closed to us.
            group = f"group {settings.control_group!r}" if settings.control_group else "control group"
            raise UsageError(f"you may not use the shoal agent at {path}: ask the lab admin to add you to its "
                             f"{group} (agent.control_group), or use a cache of your own with "
                             "SHOAL_CACHE_DIR=~/.cache/shoal") from None
        return cls(settings, client)

    def call(self, method: str, params: dict | None = None, *, on_event: OnEvent | None = None,
             timeout: float | None = None):
        return self.client.call(method, params, on_event=on_event, timeout=timeout)

    def pull(self, ref: ModelRef, *, to: Path | None = None, on_event: OnEvent | None = None,
             fresh: bool = False, offline: bool = False) -> dict:
        # The agent pulls (shared with anyone else pulling the same model on this machine).
        params = {"model": str(ref)}
        if to is not None:
            params["to"] = str(Path(to).resolve())
        if fresh:
            params["fresh"] = True
        if offline:
            params["offline"] = True
        return self.call("pull", params, on_event=on_event, timeout=PULL_TIMEOUT)

    def import_dir(self, ref: ModelRef, source: Path, *, move: bool = False,
                   on_event: OnEvent | None = None) -> dict:
        params = {"model": str(ref), "dir": str(Path(source).resolve()), "move": move}
        return self.call("import", params, on_event=on_event, timeout=PULL_TIMEOUT)

    def import_bundle(self, source: Path) -> dict:
        return self.call("bundle_import", {"dir": str(Path(source).resolve())}, timeout=PULL_TIMEOUT)

    def models(self) -> list[dict]:
        return self.call("list")

    def remove(self, ref: ModelRef) -> dict:
        return self.call("remove", {"model": str(ref)})

    def set_pinned(self, ref: ModelRef, pinned: bool) -> dict:
        return self.call("pin" if pinned else "unpin", {"model": str(ref)})

    def gc(self) -> list[dict]:
        return self.call("gc")

    def usage(self) -> dict:
        return self.call("du")

    def config(self) -> list[list[str]]:
        return self.call("config_show")


class LocalBackend:
    """No agent: the store opened in this process for each call, pulls run here."""

    kind = "local"

    def __init__(self, settings: Settings):
        self.settings = settings

    def _with_store(self, fn):
        from agent.store import Store
        store = Store(self.settings.cache_dir)
        try:
            return fn(store)
        finally:
            store.close()

    def call(self, method: str, params: dict | None = None, *, on_event: OnEvent | None = None,
             timeout: float | None = None):
        raise AgentNeeded(f"`{method}` needs the shoal agent, and none is running for {self.settings.cache_dir} "
                          f"(socket {self.settings.socket_path}); start one with `shoal agent` "
                          "(or `systemctl start shoal-agent`)")

    def pull(self, ref: ModelRef, *, to: Path | None = None, on_event: OnEvent | None = None,
             fresh: bool = False, offline: bool = False) -> dict:
        from agent.pull import event_to_wire, pull, result_to_wire
        from agent.runtime import run_until_signal
        emit = (lambda e: on_event(event_to_wire(e))) if on_event else (lambda e: None)
        settings = self.settings.with_(offline=True) if offline else self.settings
        return result_to_wire(run_until_signal(lambda: pull(ref, settings, to=to, emit=emit, fresh=fresh)))

    def import_dir(self, ref: ModelRef, source: Path, *, move: bool = False,
                   on_event: OnEvent | None = None) -> dict:
        from agent.adopt import check_source
        from agent.pull import event_to_wire, pull, result_to_wire
        from agent.runtime import run_until_signal
        emit = (lambda e: on_event(event_to_wire(e))) if on_event else (lambda e: None)
        folder = check_source(source)
        return result_to_wire(run_until_signal(lambda: pull(ref, self.settings, emit=emit, adopt_from=folder,
                                                            move=move)))

    def import_bundle(self, source: Path) -> dict:
        """``agent.bundle`` without an agent: checked, then pulled here from the bundle alone."""
        from agent.assign import record as rec
        from agent.bundle import check_bundle
        from agent.pull import pull, result_to_wire
        from agent.runtime import run_until_signal
        from agent.swarm.trust import TrustPolicy, parse_publishers
        settings = self.settings.with_(offline=True)
        trust = TrustPolicy(parse_publishers(settings.trusted_publishers))
        items, assignment = check_bundle(Path(source), trust)
        assigned: set[str] = set()
        if assignment is not None and settings.swarm_secret:
            try:
                signed = rec.accept(assignment, room=rec.room_id(settings.swarm_secret), trusted=trust.publishers,
                                    newest={})
                assigned = {str(i.ref) for i in signed.record.items}
            except rec.AssignmentRefused:
                pass
        done = []
        for item in items:
            result = result_to_wire(run_until_signal(lambda item=item: pull(
                item.ref, settings, adopt_from=item.folder, trust=trust, offers=(item.offer(),))))
            if str(item.ref) in assigned:
                self.set_pinned(item.ref, True)
            done.append({"ref": str(item.ref), "kind": item.kind, "manifest_id": result["manifest_id"],
                         "imported_bytes": result.get("imported_bytes", 0), "pinned": str(item.ref) in assigned})
        return {"items": done, "assignment": assignment is not None}

    def models(self) -> list[dict]:
        from agent.store import model_row
        return self._with_store(lambda store: [model_row(m, store.in_use(m.ref) and m.state != "complete")
                                               for m in store.models()])

    def remove(self, ref: ModelRef) -> dict:
        from agent.store import model_row

        def remove(store):
            store.lock(ref)
            return model_row(store.remove(ref), False)
        return self._with_store(remove)

    def set_pinned(self, ref: ModelRef, pinned: bool) -> dict:
        from agent.store import model_row
        return self._with_store(lambda store: model_row(store.set_pinned(ref, pinned), False))

    def gc(self) -> list[dict]:
        from agent.store import model_row
        return self._with_store(lambda store: [model_row(m, False) for m in
                                               store.gc(self.settings.quota, self.settings.quota_low)])

    def usage(self) -> dict:
        from agent.store import du_rows
        return self._with_store(lambda store: {**du_rows(store, active=set()), "quota_bytes": self.settings.quota})

    def config(self) -> list[list[str]]:
        from agent.config import describe
        return [list(r) for r in describe(self.settings)]
