"""Manifests: what one model revision is made of, and the chunk maths over it. Pure, no I/O.

A manifest names a model revision and, per file, its relative path, size, the origin's
SHA-256 and the BLAKE3 hash of every fixed-size chunk. Its canonical encoding is msgpack
of plain arrays with files sorted by path; the **manifest id** is the BLAKE3 of that
encoding. ``decode`` validates every field and also re-encodes, so one manifest has
exactly one id.

A ``Listing`` is the weaker thing a hub gives before any byte was fetched: path, size
and SHA-256 per file, no chunk hashes. It is validated by the same path rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import blake3
import msgpack

from agent.errors import ManifestError, UsageError

FORMAT_VERSION = 1

# Limits. A manifest comes from the network (OSS, later LAN peers), so every size is
# bounded before we allocate anything for it.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_FILES = 100_000
MAX_FILE_SIZE = 1 << 40  # 1 TiB: no model shard is near it; larger is a lying listing
MAX_TOTAL_SIZE = 1 << 42  # 4 TiB per model revision
MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_ID_CHARS = 256
MIN_CHUNK_SIZE = 16 * 1024  # small chunks only make sense in tests
MAX_CHUNK_SIZE = 256 * 1024 * 1024

# Default chunk size: Dragonfly aims at ~500 pieces; BitTorrent's per-piece overhead is
# what small pieces cost. We aim at ~1,024 and clamp to 4-16 MiB because every chunk in
# flight is held in RAM once to be verified before it is written (concurrency x chunk
# size): a 2-4 GiB model keeps 4 MiB chunks and the agent's buffers at 32 MiB (at 512 a
# 2 GiB model took 8 MiB chunks, and its room's agents peaked 40 MB above the 256 MiB
# model's: issue 28), and 8 in flight x 16 MiB bound them at 128 MiB even for a 15 GB
# model (~900 chunks, a 30 KB manifest). More chunks also spread sooner in a room.
DEFAULT_TARGET_CHUNKS = 1024
DEFAULT_MIN_CHUNK = 4 * 1024 * 1024
DEFAULT_MAX_CHUNK = 16 * 1024 * 1024

PARTIAL_SUFFIX = ".partial"
HASH_LEN = 32

# OWNER/NAME, or OWNER/NAME+lora/ADAPTER for a LoRA adapter trained on OWNER/NAME.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
                       r"(\+lora/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# A dataset repository is a cache entry like a model; its id is ``datasets/OWNER/NAME``
# (ModelScope's own URL spelling). The kind is thus part of every identity built from the
# id: the manifest, the store's folder and index key, the DHT key, the swarm's offers and
# the mirror's layout. A model may not be owned by "datasets", so the two never collide.
DATASET_PREFIX = "datasets/"
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---------------------------------------------------------------------------- chunk maths

def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of a file of ``size`` bytes (0 for an empty file)."""
    return -(-size // chunk_size)


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index``; the last chunk is shorter."""
    offset = index * chunk_size
    if index < 0 or offset >= size:
        raise IndexError(f"chunk {index} is outside a file of {size} bytes")
    return offset, min(chunk_size, size - offset)


def default_chunk_size(total_bytes: int) -> int:
    """A power of two near total/1024, clamped to 4-16 MiB (see module constants for why)."""
    target = max(1, total_bytes // DEFAULT_TARGET_CHUNKS)
    size = 1 << max(0, math.ceil(math.log2(target)))
    return max(DEFAULT_MIN_CHUNK, min(DEFAULT_MAX_CHUNK, size))


def check_chunk_size(chunk_size: int) -> int:
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
            or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
            or chunk_size & (chunk_size - 1)):
        raise ManifestError(
            f"chunk size {chunk_size!r} is not a power of two between "
            f"{MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    return chunk_size


# ------------------------------------------------------------------------- identifiers

def check_model_id(model_id: object) -> str:
    """A cache entry's id: ``OWNER/NAME``, ``OWNER/NAME+lora/ADAPTER`` or ``datasets/OWNER/NAME``."""
    if isinstance(model_id, str) and model_id.startswith(DATASET_PREFIX):
        if len(model_id) > MAX_ID_CHARS or not _HUB_ID.match(model_id[len(DATASET_PREFIX):]):
            raise UsageError(f"{model_id!r} is not a dataset id of the form datasets/OWNER/NAME (letters, "
                             "digits, '.', '_', '-'), e.g. datasets/AI-ModelScope/alpaca-gpt4-data-zh "
                             "(or --dataset OWNER/NAME); 'datasets' is no model owner")
        return model_id
    if not isinstance(model_id, str) or len(model_id) > MAX_ID_CHARS or not _MODEL_ID.match(model_id):
        raise UsageError(
            f"model id {model_id!r} is not of the form OWNER/NAME "
            "(letters, digits, '.', '_', '-'), e.g. qwen/Qwen2.5-0.5B-Instruct, "
            "or OWNER/NAME+lora/ADAPTER for an adapter")
    return model_id


def is_dataset(model_id: str) -> bool:
    """Whether a cache entry's id names a dataset repository (``datasets/OWNER/NAME``)."""
    return model_id.startswith(DATASET_PREFIX)


def hub_repo(model_id: str) -> tuple[str, str]:
    """(kind, OWNER/NAME) as a hub names the entry: ``("dataset", "o/n")`` or ``("model", "o/n")``."""
    if is_dataset(model_id):
        return "dataset", model_id[len(DATASET_PREFIX):]
    return "model", model_id


def check_revision(revision: object) -> str:
    if not isinstance(revision, str) or not _REVISION.match(revision):
        raise UsageError(
            f"revision {revision!r} is not a plain branch, tag or commit name "
            "(letters, digits, '.', '_', '-'; at most 128 characters), e.g. master or v1.0")
    return revision


def is_manifest_id(text: str) -> bool:
    """A revision that is a manifest id (64 hex digits) pins one exact manifest."""
    return len(text) == 2 * HASH_LEN and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class ModelRef:
    """``OWNER/NAME[@REVISION]`` as typed by a person."""

    model_id: str
    revision: str = "master"

    @classmethod
    def parse(cls, text: str, *, dataset: bool = False) -> "ModelRef":
        """``OWNER/NAME[@REV]``; with ``dataset``, the dataset of that name (``datasets/``
        may be written or left out)."""
        model_id, _, revision = text.partition("@")
        if dataset and not model_id.startswith(DATASET_PREFIX):
            model_id = DATASET_PREFIX + model_id
        return cls(check_model_id(model_id), check_revision(revision or "master"))

    @property
    def is_dataset(self) -> bool:
        return is_dataset(self.model_id)

    def __str__(self) -> str:
        return f"{self.model_id}@{self.revision}"


# -------------------------------------------------------------------------------- paths

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")


def check_relpath(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a model directory.

    Refuses absolute paths, ``..`` and ``.`` components, empty components, backslashes,
    NUL and other control characters, over-long names, and our own ``.partial`` suffix.
    """
    if not isinstance(path, str):
        raise ManifestError(f"file path {path!r} is not a string")
    why = None
    if not path:
        why = "it is empty"
    elif len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        why = f"it is longer than {MAX_PATH_BYTES} bytes"
    elif _CONTROL.search(path):
        why = "it contains NUL or another control character"
    elif "\\" in path:
        why = "it contains a backslash"
    elif path.startswith("/"):
        why = "it is absolute"
    elif _DRIVE.match(path):
        why = "it starts with a drive letter"
    elif path.endswith(PARTIAL_SUFFIX):
        why = f"it ends in {PARTIAL_SUFFIX}, which shoal uses for unfinished files"
    else:
        for part in path.split("/"):
            if part in ("", ".", ".."):
                why = f"it has a {part or 'empty'!r} component" if part else "it has an empty component"
                break
            if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
                why = f"a component is longer than {MAX_COMPONENT_BYTES} bytes"
                break
    if why:
        raise ManifestError(f"unsafe file path {path!r}: {why}; refusing the whole listing")
    return path


def _check_tree(paths: list[str]) -> None:
    """No duplicates, and no path that is also a directory of another path."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise ManifestError(f"file path {path!r} appears twice; refusing the whole listing")
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise ManifestError(
                    f"file path {path!r} lies under {'/'.join(parts[:i])!r}, which is a file")


def _check_size(path: str, size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
        raise ManifestError(
            f"file {path!r} has an absurd size {size!r} (allowed: 0 to {MAX_FILE_SIZE} bytes)")
    return size


def _check_hash(what: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_LEN:
        raise ManifestError(f"{what} is not a {HASH_LEN}-byte hash")
    return value


# ------------------------------------------------------------------------------ listing

@dataclass(frozen=True)
class ListedFile:
    """One file as the origin lists it: no chunk hashes yet."""

    path: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class Listing:
    model_id: str
    revision: str
    files: tuple[ListedFile, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def files_fingerprint(files) -> str:
    """What a revision's content is, as one hex digest: SHA-256 over its sorted
    path/size/SHA-256 lines (a listing's ``ListedFile``s or a manifest's ``FileEntry``s
    give the same digest for the same files). The mirror's sync and staleness check
    compare upstream with it: the modelscope SDK tells no commit id for a branch."""
    import hashlib
    lines = sorted(f"{f.path}\t{f.size}\t{f.sha256.hex()}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def make_listing(model_id: str, revision: str, entries: list[tuple[object, object, object]]) -> Listing:
    """Validate ``(path, size, sha256_hex)`` triples from a hub into a ``Listing``."""
    if len(entries) > MAX_FILES:
        raise ManifestError(f"the listing has {len(entries)} files, more than {MAX_FILES}")
    files = []
    for path, size, sha_hex in entries:
        path = check_relpath(path)
        size = _check_size(path, size)
        try:
            digest = bytes.fromhex(sha_hex) if isinstance(sha_hex, str) else None
        except ValueError:
            digest = None
        if digest is None or len(digest) != HASH_LEN:
            raise ManifestError(
                f"file {path!r} has no valid SHA-256 in the listing ({sha_hex!r}); "
                "shoal cannot verify it, so it refuses the listing")
        files.append(ListedFile(path, size, digest))
    files.sort(key=lambda f: f.path)
    _check_tree([f.path for f in files])
    total = sum(f.size for f in files)
    if total > MAX_TOTAL_SIZE:
        raise ManifestError(f"the listing adds up to {total} bytes, more than {MAX_TOTAL_SIZE}")
    return Listing(check_model_id(model_id), check_revision(revision), tuple(files))


# ----------------------------------------------------------------------------- manifest

@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: bytes
    chunks: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class Manifest:
    model_id: str
    revision: str
    chunk_size: int
    files: tuple[FileEntry, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def total_chunks(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def encode(self) -> bytes:
        return encode(self)

    @cached_property
    def id(self) -> str:
        # Kept once worked out (the manifest is frozen): the swarm names chunks and
        # connections by it on every request and pick.
        return manifest_id(self.encode())


def build_manifest(model_id: str, revision: str, chunk_size: int,
                   files: list[FileEntry]) -> Manifest:
    """Make a manifest from parts, validating it exactly as ``decode`` would."""
    manifest = Manifest(model_id, revision, chunk_size,
                        tuple(sorted(files, key=lambda f: f.path)))
    return decode(encode(manifest))


def encode(manifest: Manifest) -> bytes:
    """Canonical msgpack: arrays only, files sorted by path, bin for hashes."""
    body = [
        FORMAT_VERSION,
        manifest.model_id,
        manifest.revision,
        manifest.chunk_size,
        [[f.path, f.size, f.sha256, list(f.chunks)]
         for f in sorted(manifest.files, key=lambda f: f.path)],
    ]
    return msgpack.packb(body, use_bin_type=True)


def manifest_id(encoded: bytes) -> str:
    return blake3.blake3(encoded).hexdigest()


def decode(data: bytes) -> Manifest:
    """Parse and validate an encoded manifest; raise ``ManifestError`` saying what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError("a manifest must be bytes")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        body = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_PATH_BYTES * 4, max_bin_len=HASH_LEN,
            max_array_len=max(MAX_FILES, MAX_FILE_SIZE // MIN_CHUNK_SIZE + 1),
            max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ManifestError(f"manifest is not valid msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(body, list) or len(body) != 5:
        raise ManifestError("manifest is not a 5-element array")
    version, model_id, revision, chunk_size, raw_files = body
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format {version!r} is not {FORMAT_VERSION}; upgrade shoal to read it")
    try:
        model_id = check_model_id(model_id)
        revision = check_revision(revision)
    except UsageError as e:
        raise ManifestError(f"manifest names a bad model: {e}") from e
    chunk_size = check_chunk_size(chunk_size)
    if not isinstance(raw_files, list) or len(raw_files) > MAX_FILES:
        raise ManifestError(f"manifest files must be a list of at most {MAX_FILES}")
    files = []
    total = 0
    for raw in raw_files:
        if not isinstance(raw, list) or len(raw) != 4:
            raise ManifestError("a manifest file entry is not a 4-element array")
        path, size, sha, chunks = raw
        path = check_relpath(path)
        size = _check_size(path, size)
        sha = _check_hash(f"SHA-256 of {path!r}", sha)
        want = chunk_count(size, chunk_size)
        if not isinstance(chunks, list) or len(chunks) != want:
            raise ManifestError(
                f"file {path!r} of {size} bytes needs {want} chunk hashes, "
                f"the manifest has {len(chunks) if isinstance(chunks, list) else 'none'}")
        chunks = tuple(_check_hash(f"chunk {i} of {path!r}", c) for i, c in enumerate(chunks))
        files.append(FileEntry(path, size, sha, chunks))
        total += size
    if [f.path for f in files] != sorted(f.path for f in files):
        raise ManifestError("manifest files are not sorted by path (not canonical)")
    _check_tree([f.path for f in files])
    if total > MAX_TOTAL_SIZE:
        raise ManifestError(f"manifest adds up to {total} bytes, more than {MAX_TOTAL_SIZE}")
    manifest = Manifest(model_id, revision, chunk_size, tuple(files))
    if encode(manifest) != bytes(data):
        raise ManifestError("manifest encoding is not canonical")
    return manifest
