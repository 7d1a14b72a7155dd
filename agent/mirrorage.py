"""How old the mirror's copy is: when a pull's plan comes from the OSS mirror and
ModelScope answers, one listing call tells whether upstream has moved since the copy was
made (``agent.manifest.files_fingerprint`` of both). It runs beside the pull and never
holds it up (``agent.pull``); ``shoal pull --fresh`` takes upstream's files instead."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ShoalError
from agent.manifest import files_fingerprint


@dataclass(frozen=True)
class MirrorAge:
    made_at: str | None  # when the mirror's copy was made (UTC, ISO 8601), if known
    upstream_moved: bool | None  # None: ModelScope could not be asked
    message: str


def check_mirror_age(plan, oss, modelscope) -> MirrorAge | None:
    """Blocking: the mirror copy's age and whether upstream moved (see module docstring)."""
    ref = plan.ref
    try:
        made_at = oss.made_at(ref)
    except ShoalError:
        made_at = None
    made = f"the mirror's copy of {ref} was made {made_at}" if made_at else f"the mirror's copy of {ref}"
    try:
        listing = modelscope.list_files(ref)
    except ShoalError as e:
        reason = "not reachable" if "cannot reach" in str(e) else str(e).split(": ", 1)[-1][:100]
        return MirrorAge(made_at, None, f"{made}; ModelScope could not say whether it moved since ({reason})")
    if files_fingerprint(listing.files) == files_fingerprint(plan.files):
        return MirrorAge(made_at, False, f"{made}; upstream (ModelScope) has the same files")
    return MirrorAge(made_at, True, f"{made}; upstream (ModelScope) has changed since: "
                                    f"`shoal pull {ref} --fresh` takes upstream's current files")
