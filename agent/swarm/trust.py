"""Who may say what a model is: the agent's Ed25519 identity, signed manifests, trust policy.

A manifest learned from a LAN peer is used only if it is signed by a publisher key this
agent trusts (``SHOAL_TRUSTED_PUBLISHERS``), or if the person pinned its id
(``shoal pull MODEL@<manifest-id>``). That is what makes an offline classroom safe: the
teacher runs ``shoal publish MODEL`` and gives students the printed key once; a peer
can then serve bytes, but never decide which bytes are right.

The identity is a raw 32-byte Ed25519 seed in a file only its owner can read (the same
key format libp2p's Ed25519 keys load from, so the swarm's peer identity can be this key).
A signature envelope is canonical msgpack ``[1, manifest id, publisher public key, signature]``
over ``b"shoal-manifest-v1:" + manifest id``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import ConfigError, ManifestError, UntrustedManifest

ENVELOPE_VERSION = 1
DOMAIN = b"shoal-manifest-v1:"
MAX_ENVELOPE = 256


# ------------------------------------------------------------------------------- identity

class Identity:
    """This agent's Ed25519 key pair. See module docstring for the file format."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        """Read the key (never through a link, only a file of ours that nobody else may
        read), or create it (0600) when there is none."""
        from agent.safefs import SafeDir
        path = Path(path)
        with SafeDir.open(path.parent, create=True, mode=0o700) as folder:
            try:
                fd = folder.open_file(path.name, os.O_RDONLY)
            except FileNotFoundError:
                key = Ed25519PrivateKey.generate()
                fd = folder.open_file(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, key.private_bytes_raw())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return cls(key)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                raise ConfigError(f"identity key {path} is readable by others (mode {mode:o}): anyone who reads "
                                  f"it can publish as this agent. Run: chmod 600 {path}")
            seed = os.read(fd, 33)
        finally:
            os.close(fd)
        if len(seed) != 32:
            raise ConfigError(f"identity key {path} is not a 32-byte Ed25519 seed; move it away to "
                              "create a new identity (peers will see a new publisher key)")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        """The raw private seed, for the libp2p host (the same key is the peer identity)."""
        return self._key.private_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def publisher_id(self) -> str:
        """What a teacher hands out: the public key in hex."""
        return self.public_key.hex()

    def sign_bytes(self, data: bytes) -> bytes:
        """A raw Ed25519 signature of ``data`` (callers put a domain of their own in front)."""
        return self._key.sign(data)

    def sign_manifest(self, manifest_id: str) -> bytes:
        signature = self._key.sign(DOMAIN + manifest_id.encode())
        return msgpack.packb([ENVELOPE_VERSION, manifest_id, self.public_key, signature], use_bin_type=True)


# ------------------------------------------------------------------------------ envelopes

@dataclass(frozen=True)
class Signature:
    manifest_id: str
    publisher: bytes  # raw Ed25519 public key
    signature: bytes

    @property
    def publisher_id(self) -> str:
        return self.publisher.hex()

    def valid(self) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.publisher).verify(
                self.signature, DOMAIN + self.manifest_id.encode())
            return True
        except (InvalidSignature, ValueError):
            return False


def decode_signature(data: bytes) -> Signature:
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_ENVELOPE:
        raise ManifestError("a manifest signature must be at most 256 bytes")
    try:
        body = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=64, max_array_len=4,
                               max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ManifestError(f"manifest signature is not valid msgpack ({type(e).__name__})") from e
    if (not isinstance(body, list) or len(body) != 4 or body[0] != ENVELOPE_VERSION
            or not isinstance(body[1], str) or len(body[1]) != 64
            or not isinstance(body[2], bytes) or len(body[2]) != 32
            or not isinstance(body[3], bytes) or len(body[3]) != 64):
        raise ManifestError("manifest signature is malformed")
    return Signature(body[1], body[2], body[3])


# --------------------------------------------------------------------------------- policy

def parse_publishers(value: str | list | None) -> frozenset[str]:
    """Publisher keys from a setting: comma-separated hex (environment) or a list (TOML)."""
    if not value:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else list(value)
    keys = set()
    for item in items:
        key = str(item).strip().lower()
        try:
            ok = len(bytes.fromhex(key)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"trusted publisher {item!r} is not a 64-hex-digit Ed25519 public key "
                              "(what `shoal id` prints on the publisher's machine)")
        keys.add(key)
    return frozenset(keys)


@dataclass(frozen=True)
class TrustPolicy:
    publishers: frozenset[str] = frozenset()
    pinned: frozenset[str] = field(default_factory=frozenset)

    def check(self, manifest_id: str, envelope: bytes | None) -> str:
        """Why ``manifest_id`` may be used ("pinned", "signed by KEY"), or ``UntrustedManifest``."""
        if manifest_id in self.pinned:
            return "pinned"
        if envelope is None:
            raise UntrustedManifest(
                f"manifest {manifest_id[:16]}… from a peer is not signed, and you did not pin it; "
                f"pin it if you know it is right (shoal pull MODEL@{manifest_id}) or ask the publisher "
                "to `shoal publish` it")
        signature = decode_signature(envelope)
        if signature.manifest_id != manifest_id:
            raise UntrustedManifest(f"the signature a peer sent is for manifest {signature.manifest_id[:16]}…, "
                                    f"not {manifest_id[:16]}…; the peer is dropped")
        if not signature.valid():
            raise UntrustedManifest(f"manifest {manifest_id[:16]}… carries a forged or damaged signature; "
                                    "the peer is dropped")
        if signature.publisher_id not in self.publishers:
            raise UntrustedManifest(
                f"manifest {manifest_id[:16]}… is signed by {signature.publisher_id[:16]}…, a publisher you do "
                "not trust; add its key to SHOAL_TRUSTED_PUBLISHERS (the teacher's `shoal id`) or pin the "
                f"manifest (shoal pull MODEL@{manifest_id})")
        return f"signed by {signature.publisher_id[:16]}…"
