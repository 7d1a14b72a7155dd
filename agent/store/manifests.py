"""The manifests a cache keeps (``CACHE/manifests/``): ``{manifest-id}.shoal``, the canonical
encoding (its BLAKE3 is its name, so a file can be checked against it), and beside it
``{manifest-id}.sig``, a publisher's signature of it (served to peers with it). Written
atomically, read without following links and with a size bound. Blocking."""

from __future__ import annotations

from agent.errors import NotFound, disk_error
from agent.manifest import MAX_MANIFEST_BYTES, Manifest, decode
from agent.safefs import SafeDir

MAX_SIGNATURE = 4096


def check_id(manifest_id: str) -> str:
    if not (len(manifest_id) == 64 and all(c in "0123456789abcdef" for c in manifest_id)):
        raise NotFound(f"{manifest_id!r} is not a manifest id")
    return manifest_id


class ManifestShelf:
    def __init__(self, folder: SafeDir):
        self.folder = folder

    def keep(self, manifest: Manifest) -> str:
        """Write ``manifest`` (once); its id."""
        mid = manifest.id
        if self.folder.is_own_file(f"{mid}.shoal"):
            return mid
        try:
            self.folder.write_atomic(f"{mid}.shoal", manifest.encode())
        except OSError as e:
            raise disk_error(e, self.folder.path / f"{mid}.shoal") from e
        return mid

    def encoded(self, manifest_id: str) -> bytes:
        """The canonical encoding, as kept (what peers are sent)."""
        return self.folder.read_bytes(f"{check_id(manifest_id)}.shoal", limit=MAX_MANIFEST_BYTES)

    def read(self, manifest_id: str) -> Manifest:
        return decode(self.encoded(manifest_id))

    def save_signature(self, manifest_id: str, envelope: bytes) -> None:
        self.folder.write_atomic(f"{check_id(manifest_id)}.sig", envelope)

    def signature(self, manifest_id: str) -> bytes | None:
        try:
            return self.folder.read_bytes(f"{check_id(manifest_id)}.sig", limit=MAX_SIGNATURE)
        except FileNotFoundError:
            return None
