"""What every command module shares: settings from the flags, the backend, tables."""

from __future__ import annotations

from pathlib import Path

from agent.config import Settings, load_settings
from agent.manifest import hub_repo
from agent.progress import human_bytes


def settings_of(args) -> Settings:
    """The settings this command runs with: the config file and environment, then flags."""
    return load_settings(cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                         concurrency=getattr(args, "concurrency", None),
                         oss_bucket=getattr(args, "bucket", None))


def backend_of(args, *, need_agent: bool = False):
    """The backend (``agent.client``) for this command's cache."""
    from agent.client import open_backend
    return open_backend(settings_of(args), need_agent=need_agent)


def add_ref_argument(p, name: str = "model", metavar: str = "OWNER/NAME[@REVISION]") -> None:
    """The positional OWNER/NAME[@REV] of a command that takes one cache entry, and its
    ``--dataset`` flag (the dataset of that name; ``datasets/OWNER/NAME`` also works)."""
    p.add_argument(name, metavar=metavar)
    p.add_argument("--dataset", action="store_true",
                   help="the name is a dataset repository's, not a model's (or write datasets/OWNER/NAME)")


def ref_of(args, name: str = "model"):
    """The ``ModelRef`` the command was given (see ``add_ref_argument``)."""
    from agent.manifest import ModelRef
    return ModelRef.parse(getattr(args, name), dataset=getattr(args, "dataset", False))


def table(rows: list[tuple]) -> None:
    """Print rows as left-aligned columns; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def model_table(models: list[dict]) -> None:
    rows = [("NAME", "KIND", "REVISION", "SIZE", "COMPLETE", "STATE", "PINNED", "DIRECTORY")]
    for m in models:
        pct = 100.0 * m["have"] / m["size"] if m["size"] else 100.0
        state = "pulling now" if m["active"] else m["state"]
        kind, name = hub_repo(m["model"])
        rows.append((name, kind, m["revision"], human_bytes(m["size"]), f"{pct:.1f}%", state,
                     "yes" if m["pinned"] else "", m["dir"]))
    table(rows)
