"""The ``shoal`` command: pull, ls, verify, rm, mirror push, demo.

Exit codes (``agent.errors``): 0 ok, 1 other error, 2 usage or configuration, 3 not
found, 4 no reachable source, 5 integrity, 6 disk full, 7 credentials rejected,
8 store busy, 130 interrupted (verified chunks are kept; run the same command again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path

from agent.config import ENV_NAMES, Settings, load_settings
from agent.errors import IntegrityError, ShoalError, Terminated, UsageError, single_error
from agent.manifest import ModelRef
from agent.progress import Progress, human_bytes, human_time
from agent.sources import registry


# ------------------------------------------------------------------------ progress output

class PullReporter:
    """Turns pull events into a progress line (TTY), periodic lines (pipes) or JSON lines."""

    def __init__(self, ref: ModelRef, *, json_mode: bool, stream=None):
        self.ref, self.json_mode = ref, json_mode
        self.stream = stream or (sys.stdout if json_mode else sys.stderr)
        self.tty = (not json_mode) and self.stream.isatty()
        self.progress: Progress | None = None
        self._seen_troubles: set[str] = set()
        self._last_line = 0.0
        self._width = 0
        self.first_byte_s: float | None = None  # from this process's start to the first chunk

    def _json(self, **payload) -> None:
        print(json.dumps(payload), file=self.stream, flush=True)

    def event(self, event: dict) -> None:
        """Take one pull event in wire form (``agent.pull.event_to_wire``)."""
        now = time.monotonic()
        kind = event["type"]
        if kind == "plan":
            self.progress = Progress(event["total_bytes"], already=event["already_bytes"])
            if self.json_mode:
                self._json(event="plan", **{k: v for k, v in event.items() if k != "type"})
            else:
                self._say(f"{self.ref}: {human_bytes(event['total_bytes'])} in {event['files']} files "
                          f"(from the {event['plan']}"
                          + (f"; {human_bytes(event['already_bytes'])} already here" if event["already_bytes"] else "")
                          + ")")
        elif kind == "chunk" and self.progress is not None:
            if self.first_byte_s is None:
                from agent.cpu import process_started
                self.first_byte_s = round(time.time() - process_started(), 3)
            self.progress.add(event["source"], event["nbytes"], now)
            settled = now - self.progress.started >= 0.5  # no speed or ETA from one tiny chunk
            if settled and now - self._last_line >= (0.2 if self.tty else 0.5 if self.json_mode else 5.0):
                self.render(now)
        elif kind == "file_done" and self.json_mode:
            self._json(event="file_done", path=event["path"], size=event["size"])
        elif kind == "evicted":
            if self.json_mode:
                self._json(event="evicted", model=event["model"], size=event["size"])
            else:
                self._say(f"evicted {event['model']} ({human_bytes(event['size'])}) to stay within the cache quota")
        elif kind == "trouble" and event["message"] not in self._seen_troubles:
            self._seen_troubles.add(event["message"])
            if self.json_mode:
                self._json(event="trouble", source=event["source"], message=event["message"])
            else:
                self._say(f"! {registry.label(event['source'])}: {event['message']}")

    def render(self, now: float | None = None) -> None:
        if self.progress is None:
            return
        now = time.monotonic() if now is None else now
        self._last_line = now
        p = self.progress
        speed, eta = p.speed(now), p.eta(now)
        if self.json_mode:
            self._json(event="progress", done_bytes=p.done, total_bytes=p.total, bytes_per_s=round(speed),
                       eta_s=None if eta is None else round(eta, 1), source=p.current_source,
                       by_source=dict(p.by_source))
            return
        frac = p.done / p.total if p.total else 1.0
        bar = "█" * int(frac * 24) + "░" * (24 - int(frac * 24))
        where = f"from {registry.label(p.current_source)} " if p.current_source else ""
        line = (f"{frac * 100:5.1f}% {bar} {human_bytes(p.done)}/{human_bytes(p.total)} "
                f"{where}{human_bytes(speed)}/s ETA {human_time(eta)}"
                + (f"  [{p.split()}]" if len(p.by_source) > 1 else ""))
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self._width = len(line)
        else:
            print(line, file=self.stream, flush=True)

    def _say(self, text: str) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.stream, flush=True)

    def finish(self, result: dict) -> None:
        """Take the pull's result in wire form (``agent.pull.result_to_wire``)."""
        self.render()
        if self.tty:
            self.stream.write("\n")
        fetched = result["fetched_by_source"]
        split = ", ".join(f"{registry.short(k)} {human_bytes(v)}"
                          for k, v in sorted(fetched.items(), key=lambda kv: -kv[1]))
        elapsed = result["elapsed_s"]
        speed = sum(fetched.values()) / elapsed if elapsed else 0
        if self.json_mode:
            # The first byte as the person running `shoal pull` saw it: from the command's start.
            self._json(event="done", **{k: v for k, v in result.items() if k != "troubles"} |
                       {"first_byte_s": self.first_byte_s})
        else:
            self._say(f"done: {result['model']} in {result['directory']}\n"
                      f"  {human_bytes(result['total_bytes'])} verified; fetched "
                      f"{split or 'nothing (already complete)'} in {elapsed:.1f} s"
                      + (f" ({human_bytes(speed)}/s)" if split else "")
                      + f"\n  manifest {result['manifest_id']}")


# ------------------------------------------------------------------------------ commands

def _settings(args) -> Settings:
    return load_settings(cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                         concurrency=getattr(args, "concurrency", None),
                         oss_bucket=getattr(args, "bucket", None))


def agent_client(settings: Settings):
    """A client of the running agent for this cache, or None when none runs."""
    from agent.rpc import ControlClient
    path = settings.socket_path
    client = ControlClient(str(path), timeout=10)
    try:
        if not path.exists():
            return None
        client.call("status")
    except (ConnectionRefusedError, FileNotFoundError):
        return None  # a socket left behind by an agent that died
    except PermissionError:
        raise UsageError(f"you may not use the shoal agent at {path}: ask the lab admin to add you to its "
                         "group (agent.control_group, `shoal` by default), or use a cache of your own with "
                         "SHOAL_CACHE_DIR=~/.cache/shoal") from None
    return client


def require_agent(settings: Settings):
    client = agent_client(settings)
    if client is None:
        raise ShoalError(f"no shoal agent is running for {settings.cache_dir} (socket {settings.socket_path}); "
                         "start one with `shoal agent` (or `systemctl start shoal-agent`)")
    return client


def cmd_pull(args) -> int:
    settings = _settings(args)
    if args.no_modelscope:
        settings = settings.with_(use_modelscope=False)
    ref = ModelRef.parse(args.model)
    reporter = PullReporter(ref, json_mode=args.json)
    client = agent_client(settings)
    if client is not None:
        # The agent pulls (shared with anyone else pulling the same model on this machine).
        params = {"model": str(ref)}
        if args.to:
            params["to"] = str(Path(args.to).resolve())
        if args.no_modelscope:
            raise ShoalError("--no-modelscope applies to in-process pulls; the agent uses its own sources "
                             "(set SHOAL_USE_MODELSCOPE=0 in its config)")
        reporter.finish(client.call("pull", params, on_event=reporter.event, timeout=600))
        return 0
    from agent.pull import event_to_wire, pull, result_to_wire  # in-process only: the agent's client starts faster
    result = run_until_signal(lambda: pull(ref, settings, to=Path(args.to) if args.to else None,
                                           emit=lambda e: reporter.event(event_to_wire(e))))
    reporter.finish(result_to_wire(result))
    return 0


def run_until_signal(async_fn):
    """``trio.run(async_fn)``, where SIGTERM cancels the work as Ctrl-C does: chunks being
    written finish (worker threads are not abandoned), verified chunks are kept."""
    import trio  # only in-process work needs it: a command the agent serves starts faster without

    async def main():
        outcome = {}
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    async def stop_on_signal():
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            return
                    nursery.start_soon(stop_on_signal)
                    outcome["value"] = await async_fn()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        if "value" not in outcome:
            raise Terminated("terminated by SIGTERM; verified chunks are kept, run the same command to resume")
        return outcome["value"]
    return trio.run(main)


def _local_rows(settings: Settings) -> list[dict]:
    from agent.store import model_row
    from agent.store import Store
    store = Store(settings.cache_dir)
    try:
        return [model_row(m, store.in_use(m.ref) and m.state != "complete") for m in store.models()]
    finally:
        store.close()


def _table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _model_table(models: list[dict]) -> None:
    rows = [("MODEL", "REVISION", "SIZE", "COMPLETE", "STATE", "PINNED", "DIRECTORY")]
    for m in models:
        pct = 100.0 * m["have"] / m["size"] if m["size"] else 100.0
        state = "pulling now" if m["active"] else m["state"]
        rows.append((m["model"], m["revision"], human_bytes(m["size"]), f"{pct:.1f}%", state,
                     "yes" if m["pinned"] else "", m["dir"]))
    _table(rows)


def cmd_ls(args) -> int:
    settings = _settings(args)
    client = agent_client(settings)
    models = client.call("list") if client else _local_rows(settings)
    if args.json:
        print(json.dumps(models, indent=2))
    elif not models:
        print("no models in the cache yet; try `shoal pull OWNER/NAME`")
    else:
        _model_table(models)
    return 0


def cmd_verify(args) -> int:
    from agent.verify import verify_model
    settings = _settings(args)
    report = verify_model(ModelRef.parse(args.model), settings)
    for line in report.lines():
        print(line)
    if report.damaged:
        raise IntegrityError(f"{report.ref}: {len(report.damaged)} file(s) damaged; the damaged chunks "
                             f"were dropped from the index: run `shoal pull {report.ref}` to repair them")
    return 0


def cmd_rm(args) -> int:
    settings = _settings(args)
    ref = ModelRef.parse(args.model)
    client = agent_client(settings)
    if client is not None:
        row = client.call("remove", {"model": str(ref)})
        print(f"removed {ref} ({human_bytes(row['size'])}) from {row['dir']}")
        return 0
    from agent.store import Store
    store = Store(settings.cache_dir)
    try:
        store.lock(ref)
        info = store.remove(ref)
    finally:
        store.close()
    print(f"removed {info.ref} ({human_bytes(info.total_size)}) from {info.dir}")
    return 0


def _with_store(settings: Settings, fn):
    from agent.store import Store
    store = Store(settings.cache_dir)
    try:
        return fn(store)
    finally:
        store.close()


def cmd_pin(args) -> int:
    from agent.store import model_row
    settings, ref = _settings(args), ModelRef.parse(args.model)
    pinned = args.command == "pin"
    client = agent_client(settings)
    if client is not None:
        client.call(args.command, {"model": str(ref)})
    else:
        _with_store(settings, lambda store: model_row(store.set_pinned(ref, pinned), False))
    print(f"{ref} is {'pinned: never evicted' if pinned else 'unpinned: evictable when the cache is full'}")
    return 0


def cmd_gc(args) -> int:
    from agent.store import model_row
    settings = _settings(args)
    client = agent_client(settings)
    if client is not None:
        evicted = client.call("gc")
    else:
        evicted = _with_store(settings, lambda store: [model_row(m, False) for m in
                                                       store.gc(settings.quota, settings.quota_low)])
    if not settings.quota and not evicted:
        print("no quota is set (SHOAL_QUOTA), so nothing is evicted; `shoal rm` removes a model")
    for m in evicted:
        print(f"evicted {m['model']}@{m['revision']} ({human_bytes(m['size'])})")
    if settings.quota and not evicted:
        print("nothing to evict: the cache is below its low watermark (or the rest is pinned or in use)")
    return 0


def cmd_du(args) -> int:
    settings = _settings(args)
    client = agent_client(settings)
    models = client.call("du")["models"] if client else _local_rows(settings)
    usage = sum(m["size"] for m in models)
    if args.json:
        print(json.dumps({"usage_bytes": usage, "quota_bytes": settings.quota, "models": models}, indent=2))
        return 0
    rows = [("MODEL", "SIZE", "PINNED", "LAST USED")]
    for m in sorted(models, key=lambda m: -m["size"]):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["last_used"])) if m["last_used"] else "-"
        rows.append((f"{m['model']}@{m['revision']}", human_bytes(m["size"]), "yes" if m["pinned"] else "", used))
    _table(rows)
    quota = f" of {human_bytes(settings.quota)} quota ({100 * usage / settings.quota:.0f}%)" if settings.quota else ""
    print(f"total {human_bytes(usage)}{quota}")
    return 0


def cmd_cancel(args) -> int:
    from agent.launcher.commands import cancel_job, is_job_id
    settings = _settings(args)
    if is_job_id(settings, args.target):
        job = cancel_job(settings, args.target)
        print(f"job {job.id} is {job.state}")
        return 0
    require_agent(settings).call("cancel", {"model": str(ModelRef.parse(args.target))})
    print(f"cancelled the pull of {args.target}; verified chunks are kept")
    return 0


def cmd_peers(args) -> int:
    settings = _settings(args)
    peers = require_agent(settings).call("peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("no LAN peers yet: the agent finds them by mDNS and the DHT when SHOAL_SWARM=1, or dials "
              "SHOAL_SWARM_PEERS=<multiaddr>,...")
        return 0
    rows = [("PEER", "ADDRESS", "FOUND BY", "STATE", "RTT", "HOLDS", "DOWN", "UP", "PROBLEM")]
    for p in peers:
        holds = ", ".join(f"{m} {h['chunks']}/{h['of']}" for m, h in (p.get("holds") or {}).items()) or "-"
        rtt = f"{p['rtt_ms']:.0f} ms" if p.get("rtt_ms") is not None else "-"
        problem = f"dropped: {p['dropped']}" if p.get("dropped") else (p.get("error") or "")
        state = "connected" if p.get("connected") else "down"
        rows.append((p["id"][:20], p.get("addr") or "", p.get("via") or "", state, rtt,
                     holds[:50], human_bytes(p.get("bytes_down", 0)), human_bytes(p.get("bytes_up", 0)),
                     problem[:60]))
    _table(rows)
    return 0


def cmd_status(args) -> int:
    settings = _settings(args)
    status = require_agent(settings).call("status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    quota = human_bytes(status["quota_bytes"]) if status["quota_bytes"] else "none"
    rate = lambda r: f"{human_bytes(r)}/s" if r else "unlimited"  # noqa: E731
    print(f"shoal agent {status['version']} pid {status['pid']}, up {status['uptime_s']:.0f} s\n"
          f"  cache {status['cache_dir']}: {human_bytes(status['usage_bytes'])} used, quota {quota}\n"
          f"  control socket {status['socket']}\n"
          f"  ModelScope gateway {status['gateway']}  (MODELSCOPE_ENDPOINT={status['gateway']})\n"
          f"  download cap {rate(status['download_rate'])}, upload cap {rate(status['upload_rate'])}, "
          f"{status['upload_slots']} upload slots\n"
          f"  sources: {', '.join(status['sources'])}")
    if status.get("swarm"):
        print(f"  swarm: {', '.join(status['swarm']['addrs'])}  ({len(status['peers'])} peers; `shoal peers`)")
    for p in status["pulls"]:
        pct = 100 * p["done_bytes"] / p["total_bytes"] if p["total_bytes"] else 0
        print(f"  pulling {p['model']}: {pct:.0f}% of {human_bytes(p['total_bytes'])} ({p['clients']} clients)")
    return 0


def cmd_config(args) -> int:
    from agent.config import describe
    settings = _settings(args)
    if args.config_command == "set":
        rows = require_agent(settings).call("config_set", {"key": args.key, "value": args.value})
        print(f"{args.key} = {args.value} (until the agent restarts; put it in the config file to keep it)")
        return 0
    client = agent_client(settings)
    rows = client.call("config_show") if client else [list(r) for r in describe(settings)]
    _table([("SETTING", "VALUE", "ENVIRONMENT", "TOML KEY")] + [tuple(r) for r in rows])
    return 0


def cmd_id(args) -> int:
    from agent.swarm.trust import Identity
    settings = _settings(args)
    identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
    print(identity.publisher_id)
    return 0


def cmd_publish(args) -> int:
    """Sign a complete model's manifest with this agent's key (the teacher's machine)."""
    from agent.store import Store
    from agent.swarm.trust import Identity
    settings = _settings(args)
    ref = ModelRef.parse(args.model)
    identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
    store = Store(settings.cache_dir)
    try:
        info = store.find(ref)
        if info.state != "complete" or not info.manifest_id:
            raise UsageError(f"{ref} is not complete here; pull it first (`shoal pull {ref}`), then publish")
        store.save_signature(info.manifest_id, identity.sign_manifest(info.manifest_id))
    finally:
        store.close()
    print(f"published {ref}: manifest {info.manifest_id}\nsigned by {identity.publisher_id}\n"
          f"students trust it with SHOAL_TRUSTED_PUBLISHERS={identity.publisher_id}")
    return 0


def cmd_tui(args) -> int:
    try:
        from tui.app import run_tui
    except ImportError as e:
        raise UsageError(f"the terminal UI needs Textual ({e.name}): pip install shoal") from None
    flags = {k: v for k, v in (("model_type", args.model_type), ("template", args.template)) if v}
    return run_tui(_settings(args), flags)


def cmd_agent(args) -> int:
    from agent.service import serve_agent
    settings = _settings(args)
    logging.getLogger("shoal").setLevel(logging.INFO)
    if args.log_json:
        from agent.logs import JsonLogFormatter
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())

    async def main():
        await serve_agent(settings)

    print(f"shoal agent: serving {settings.cache_dir} (socket {settings.socket_path}); "
          "Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    try:
        run_until_signal(main)
    except Terminated:
        pass
    print("shoal agent: stopped; verified chunks are kept", file=sys.stderr)
    return 0


def cmd_mirror_push(args) -> int:
    from agent.mirror import check_push_target, manifest_from_dir, push_directory
    settings = _settings(args)
    check_push_target(settings, args.bucket)
    ref = ModelRef.parse(args.model)
    if args.from_dir:
        directory = Path(args.from_dir)
        print(f"hashing {directory} ...", file=sys.stderr)
        manifest = manifest_from_dir(ref, directory, settings.chunk_size)
    else:
        # Pull from ModelScope only (never from the mirror we are filling), proving every
        # file against the origin's SHA-256, then upload what was proven.
        from agent.pull import event_to_wire, pull, result_to_wire
        from agent.store import Store
        origin = dataclasses.replace(settings, oss_bucket=None, use_modelscope=True)
        reporter = PullReporter(ref, json_mode=False)
        result = run_until_signal(lambda: pull(ref, origin, emit=lambda e: reporter.event(event_to_wire(e))))
        reporter.finish(result_to_wire(result))
        store = Store(settings.cache_dir)
        try:
            manifest = store.manifest(result.manifest_id)
        finally:
            store.close()
        directory = result.directory
    result = push_directory(ref, directory, settings, manifest, bucket_name=args.bucket,
                            on_file=lambda path, what: print(f"  {path}: {what}", file=sys.stderr))
    print(f"mirrored {ref} to oss://{args.bucket or settings.oss_bucket}/ "
          f"({len(result.uploaded)} uploaded, {len(result.skipped)} already there); manifest {result.manifest_id}")
    return 0


def cmd_demo(args) -> int:
    from agent.demo import run_demo, run_lan_demo
    demo = run_lan_demo if args.lan else run_demo
    return demo(size_mb=args.size_mb, workdir=Path(args.workdir) if args.workdir else None, keep=args.keep)


# ---------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Peer-to-peer model cache: verified, resumable, parallel model pulls.",
        epilog="Settings come from ~/.config/shoal/config.toml and the environment: "
               + ", ".join(sorted(ENV_NAMES.values())) + ". See the README.")
    parser.add_argument("--cache-dir", help=f"where models and the index live (${ENV_NAMES['cache_dir']})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a model revision (OSS mirror first, then ModelScope)")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.add_argument("--to", metavar="DIR", help="put the files in DIR instead of the cache's model folder")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout, for scripts")
    p.add_argument("--concurrency", type=int, help=f"chunks in flight (${ENV_NAMES['concurrency']}, default 8)")
    p.add_argument("--bucket", help=f"OSS mirror bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--no-modelscope", action="store_true", help="never fall back to ModelScope")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ls", help="list cached models with size and completeness")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help="re-hash a cached model and report any damage")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rm", help="remove a cached model")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_rm)

    for name, text in (("pin", "never evict a cached model"), ("unpin", "let a cached model be evicted")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("gc", help="evict least recently used unpinned models down to the low watermark")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("du", help="disk use of the cache by model, against the quota")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_du)

    p = sub.add_parser("agent", help="run the background agent (control socket, gateway, metrics)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line (for journald)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("status", help="what the running agent is doing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("peers", help="the agent's LAN peers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("cancel", help="stop a job (by id) or a pull the agent is running (by model)")
    p.add_argument("target", metavar="JOB|OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_cancel)

    from agent.launcher.commands import add_parsers
    add_parsers(sub)

    p = sub.add_parser("id", help="this agent's publisher key (give it to those who should trust what you publish)")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("publish", help="sign a cached model's manifest with this agent's key")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("tui", help="the terminal UI: browse, pull, watch, chat, train")
    p.add_argument("--model-type", help="ms-swift model type for chats and training started from the UI")
    p.add_argument("--template", help="ms-swift chat template for chats and training started from the UI")
    p.set_defaults(func=cmd_tui)

    config = sub.add_parser("config", help="show the effective settings, or change a limit at run time")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    p = csub.add_parser("show", help="every setting, its value (secrets masked) and where to set it")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("set", help="change download_rate, upload_rate or upload_slots in the running agent")
    p.add_argument("key", choices=["download_rate", "upload_rate", "upload_slots"])
    p.add_argument("value", help="bytes per second (e.g. 50MB, 0 for unlimited), or a slot count")
    p.set_defaults(func=cmd_config)

    mirror = sub.add_parser("mirror", help="manage the lab's OSS mirror")
    msub = mirror.add_subparsers(dest="mirror_command", required=True, metavar="COMMAND")
    p = msub.add_parser("push", help="upload a model revision and its manifest to the mirror")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.add_argument("--bucket", help=f"target bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--from-dir", metavar="DIR", help="upload this local directory instead of pulling from ModelScope")
    p.set_defaults(func=cmd_mirror_push)

    p = sub.add_parser("demo", help="run a complete pull against local OSS and ModelScope servers")
    p.add_argument("--size-mb", type=int, default=256, help="size of the generated model (default 256)")
    p.add_argument("--workdir", help="keep servers' data and the cache here (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp folder")
    p.add_argument("--lan", action="store_true",
                   help="a classroom instead: a teacher's agent seeds, students' agents pull over the LAN swarm")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.logs import configure
    configure(args.verbose)
    try:
        return args.func(args)
    except ShoalError as e:
        print(f"\nshoal: {e.title}: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"event": "error", "exit_code": e.exit_code, "title": e.title,
                              "message": str(e)}), flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nshoal: interrupted; verified chunks are kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except (ConnectionError, TimeoutError) as e:
        print(f"\nshoal: Agent unreachable: lost the connection to the agent ({e}); "
              "check `shoal status` or its log", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
