"""What this agent holds of another agent's manifest *by content*: the answer to a content
ask (``agent.swarm.datapath``, mode ``content``).

A peer pulling a manifest this agent holds none of by name (a repository that copies
another's files, a new revision of a model held here) sends the manifest itself; the
answer names the chunks this agent verified under any model, found by their BLAKE3
(``Store.held_by_content``). A board of those chunks is kept for the asker's subscription
(static: what is held complete does not change) and the manifest is remembered so its
chunks are served by content (``StoreLocator``).

Nothing of the manifest is believed but the chunk hashes it names, and only chunks whose
bytes hash so are ever sent: it need not be signed, nor held, nor trusted here. Called
in a data-port thread; blocking (one index lookup per chunk of the manifest).
"""

from __future__ import annotations

from agent.errors import ManifestError
from agent.manifest import decode, manifest_id as id_of
from agent.swarm.board import Board
from agent.swarm.protocol import BAD_REQUEST, NOT_HELD, encode_answer, encode_error
from agent.swarm.wire import Ordinals


def content_answer(store, boards, locator, manifest_id: str, data: bytes) -> bytes:
    """The offer answer (``agent.swarm.protocol``) for a content ask, or its error."""
    if id_of(data) != manifest_id:
        return encode_error(BAD_REQUEST, "the manifest sent does not have the id it was sent under")
    try:
        manifest = decode(data)
    except ManifestError as e:
        return encode_error(BAD_REQUEST, f"malformed manifest: {e}"[:300])
    have = store.held_by_content(manifest)
    if not have:
        return encode_error(NOT_HELD, "none of its chunks is held here")
    if boards is not None:
        ordinals = Ordinals(manifest)
        boards.adopt(Board(manifest, have=[ordinals.of(path, i) for path, held in have.items() for i in held]))
    locator.remember(manifest)
    return encode_answer(manifest, None, None, have, False)
