"""How a pull looks to a person or a script: a progress line on a TTY, periodic lines in a
pipe, JSON lines with ``--json``. Fed the pull's events and result in wire form
(``agent.pull.event_to_wire``/``result_to_wire``), so it serves an agent-run pull and an
in-process one alike (``agent.client``)."""

from __future__ import annotations

import json
import sys
import time

from agent.manifest import ModelRef
from agent.progress import Progress, human_bytes, human_time
from agent.sources import registry


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
                          + (f", {human_bytes(event['reused_bytes'])} of it held under another model or revision"
                             if event.get("reused_bytes") else "")
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
        elif kind == "imported":
            if self.json_mode:
                self._json(event="imported", files=event["files"], bytes=event["bytes"], refused=event["refused"])
            else:
                self._say(f"imported {event['files']} file(s), {human_bytes(event['bytes'])}, from the folder "
                          "(hashed: they match the origin)")
                for path, why in sorted(event["refused"].items()):
                    self._say(f"  not imported, fetched instead: {path}: {why}")
        elif kind == "mirror_age":
            if self.json_mode:
                self._json(event="mirror_age", made_at=event["made_at"], upstream_moved=event["upstream_moved"],
                           message=event["message"])
            else:
                self._say(("! " if event["upstream_moved"] else "") + event["message"])
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
                      + (f"; {human_bytes(result['reused_bytes'])} taken from the cache (held under another "
                         "model or revision, not fetched)" if result.get("reused_bytes") else "")
                      + f"\n  manifest {result['manifest_id']}")
