"""The swarm's control messages, as pure functions: encode, parse, validate. No I/O here,
so every path a hostile peer can reach is testable with hypothesis.

**Hello** (libp2p protocol ``/shoal/hello/3.0.0``, once per connection, both ways, and again
every ``agent.swarm.membership.CONTACT_REFRESH``)::

    request = {"proof": bytes | nil}            # swarm membership, see ``SwarmAccess``
    answer  = {"data": [host, port], "key": bytes, "tls": bytes | nil}
            | {"error": text, "code": "not-in-swarm" | "bad-request"}

The answer is the asker's **contact** for the answerer's data port: the address, a key
(``agent.swarm.datapath.Ticket``: an id and a secret, issued to the asker's peer id and
address) and, when the data port is encrypted, its certificate's hash. Everything a pull
says after that goes over the data port, keyed by it: libp2p (Noise, Yamux, in Python)
carries one hello per pair of agents, not an ask per peer per second.

**Offer** (data port, mode ``"offer"``, one request and one answer, msgpack maps)::

    request = {"manifest_id": hex, "model": "owner/name", "revision": rev}  (an id, a model, or both)
              "known": bool              # the asker has the manifest: do not resend it
    answer  = {"manifest_id": hex, "manifest": bytes | nil, "signature": bytes | nil,
               "have": {path: bitmap}, "pulling": bool}
            | {"error": text, "code": "not-held" | "pending" | "bad-request"}

``pending``: the peer is pulling the model too but has not planned yet; the asker tries
again shortly (two agents starting together would otherwise each think the other idle).

``have`` is one bit per chunk (bit i of byte i // 8, least significant first): 475 bytes
for a 15 GB model in 4 MiB chunks. What changes after the answer comes on the peer's HAVE
stream (``agent.swarm.wire``).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgpack

from agent.errors import NotInSwarm, PeerBroken, ShoalError
from agent.manifest import Manifest, decode, is_manifest_id
from agent.swarm.location import checked as checked_location

PROTOCOL = "/shoal/hello/3.0.0"
MAX_REQUEST = 4 * 1024
MAX_ANSWER = 8 * 1024 * 1024  # a manifest of ~100k files still fits
TICKET_LEN = 48  # agent.swarm.datapath.Ticket: a 16-byte id and a 32-byte secret
NOT_HELD, NOT_IN_SWARM, BAD_REQUEST, PENDING = "not-held", "not-in-swarm", "bad-request", "pending"


class PeerPending(LookupError):
    """The peer pulls this model too but has not planned yet (it knows no manifest): ask again shortly."""


# ------------------------------------------------------------------------- membership

class SwarmAccess:
    """Who is in the swarm: holders of the swarm secret, and/or an allowlist of peer ids.

    A request carries ``proof = HMAC-SHA256(secret, asker id | answerer id)``. The ids are
    the Noise-authenticated libp2p identities of the two ends, so a proof seen on the wire
    is useless to any other peer. With neither a secret nor an allowlist the swarm is open
    (every shoal agent that can reach this one).
    """

    def __init__(self, secret: str | None = None, allow: frozenset[str] = frozenset()):
        self._key = hashlib.sha256(b"shoal-swarm-v1:" + secret.encode()).digest() if secret else None
        self.allow = frozenset(allow)

    @property
    def open(self) -> bool:
        return self._key is None and not self.allow

    @property
    def tag(self) -> str:
        """A public name for this swarm (mDNS service name, DHT protocol prefix), not the secret."""
        if self._key is None:
            return "open"
        return hashlib.sha256(b"shoal-swarm-tag:" + self._key).hexdigest()[:16]

    @property
    def psk(self) -> str | None:
        """The libp2p private-network key (hex) of a swarm with a secret: every libp2p
        connection, the DHT's included, is then encrypted with it before anything else, so an
        agent without the secret cannot complete a handshake, look anything up or be told
        anything (py-libp2p's pnet: XSalsa20 under the Noise channel's own encryption)."""
        if self._key is None:
            return None
        return hashlib.sha256(b"shoal-pnet-v1:" + self._key).hexdigest()

    def member(self, peer: str) -> bool:
        """Whether ``peer`` (a Noise-authenticated id) may take part: with an allowlist, only
        those listed; with a secret alone, whoever completed the private-network handshake."""
        return not self.allow or peer in self.allow

    def proof(self, asker: str, answerer: str) -> bytes | None:
        if self._key is None:
            return None
        return hmac.new(self._key, f"{asker}|{answerer}".encode(), hashlib.sha256).digest()

    def admits(self, asker: str, answerer: str, proof: bytes | None) -> bool:
        if self.allow and asker not in self.allow:
            return False
        if self._key is None:
            return True
        expected = self.proof(asker, answerer)
        return isinstance(proof, bytes) and hmac.compare_digest(proof, expected)


# ------------------------------------------------------------------------------- hello

MAX_PEX = 16  # peers' addresses a hello answer passes on (and addresses a hello gives of its sender)
MAX_ADDR = 160  # an IPv6 address, a port and a peer id fit; 16 of them stay well inside MAX_REQUEST


def _addresses(value, what: str) -> tuple[str, ...]:
    """A bounded list of dialable libp2p addresses (``/ip4|ip6/.../p2p/<id>``); ``PeerBroken`` else."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PEX or not all(
            isinstance(a, str) and len(a) <= MAX_ADDR and a.startswith(("/ip4/", "/ip6/")) and "/p2p/" in a
            for a in value):
        raise PeerBroken(f"a hello's {what} must be at most {MAX_PEX} libp2p addresses with a peer id")
    return tuple(value)


def encode_hello_request(proof: bytes | None, addrs: list[str] = ()) -> bytes:
    return msgpack.packb({"proof": proof, "addrs": list(addrs)[:MAX_PEX]}, use_bin_type=True)


def parse_hello_request(data: bytes) -> tuple[bytes | None, tuple[str, ...]]:
    """The proof a hello carries and the addresses its sender listens on; raises ``PeerBroken``."""
    if len(data) > MAX_REQUEST:
        raise PeerBroken(f"a hello of {len(data)} bytes exceeds {MAX_REQUEST}")
    message = _unpack(data, max_len=MAX_REQUEST)
    proof = message.get("proof")
    if proof is not None and (not isinstance(proof, bytes) or len(proof) != 32):
        raise PeerBroken("a hello's proof must be 32 bytes")
    return proof, _addresses(message.get("addrs"), "addresses")


@dataclass(frozen=True)
class Contact:
    """How to reach a peer's data port: its address, the key it gave us, its certificate;
    and other swarm members it is connected to (``peers``: their libp2p addresses), so that
    a room told only one bootstrap address still finds everyone; and where it is on the
    campus (``agent.swarm.location``; None: it did not say)."""

    data: tuple[str, int]
    key: bytes
    tls: bytes | None = None
    peers: tuple[str, ...] = ()
    location: tuple[str, ...] | None = None


def encode_contact(data: tuple[str, int], key: bytes, tls: bytes | None, peers: list[str] = (),
                   location: tuple[str, ...] | None = None) -> bytes:
    message = {"data": [data[0], data[1]], "key": key, "tls": tls, "peers": list(peers)[:MAX_PEX]}
    if location is not None:
        message["loc"] = list(location)
    return msgpack.packb(message, use_bin_type=True)


def parse_contact(data: bytes) -> Contact:
    """Validate a hello answer; raises ``PeerBroken`` (malformed) or ``NotInSwarm`` (refused)."""
    if len(data) > MAX_REQUEST:
        raise PeerBroken(f"a hello answer of {len(data)} bytes exceeds {MAX_REQUEST}")
    message = _unpack(data, max_len=MAX_REQUEST)
    _raise_error(message)
    try:
        host, port = message["data"]
        key, tls = message["key"], message.get("tls")
        if (not isinstance(host, str) or len(host) > 64 or not isinstance(port, int) or not 0 < port < 65536
                or not isinstance(key, bytes) or len(key) != TICKET_LEN
                or not (tls is None or (isinstance(tls, bytes) and len(tls) == 32))):
            raise ValueError("data address, key or TLS fingerprint")
        location = checked_location(message.get("loc"))
    except (KeyError, TypeError, ValueError) as e:  # (LocationError is a ValueError)
        raise PeerBroken(f"malformed hello answer ({e})"[:300]) from e
    return Contact((host, port), key, tls, _addresses(message.get("peers"), "peer list"), location)


# ---------------------------------------------------------------------------- requests

def encode_request(*, manifest_id: str | None = None, model: str | None = None, revision: str | None = None,
                   known: bool = False) -> bytes:
    message: dict = {"known": known}
    if manifest_id is not None:
        message["manifest_id"] = manifest_id
    if model is not None:
        message["model"], message["revision"] = model, revision
    return msgpack.packb(message, use_bin_type=True)


@dataclass(frozen=True)
class Request:
    manifest_id: str | None
    model: str | None
    revision: str | None
    known: bool


def parse_request(data: bytes) -> Request:
    """Validate an offer request; raises ``PeerBroken``."""
    if len(data) > MAX_REQUEST:
        raise PeerBroken(f"a swarm request of {len(data)} bytes exceeds {MAX_REQUEST}")
    message = _unpack(data, max_len=MAX_REQUEST)
    known = message.get("known", False)
    if not isinstance(known, bool):
        raise PeerBroken("a swarm request's 'known' must be true or false")
    manifest_id = message.get("manifest_id")
    if manifest_id is not None and (not isinstance(manifest_id, str) or not is_manifest_id(manifest_id)):
        raise PeerBroken("a swarm request's manifest id must be 64 hex digits")
    model, revision = message.get("model"), message.get("revision")
    if model is None and revision is None and manifest_id is not None:
        return Request(manifest_id, None, None, known)
    if not (isinstance(model, str) and isinstance(revision, str) and 0 < len(model) <= 256
            and 0 < len(revision) <= 256):
        raise PeerBroken("a swarm request names neither a manifest id nor a model and revision")
    return Request(manifest_id, model, revision, known)


# ----------------------------------------------------------------------------- answers

def bitmap(indices, count: int) -> bytes:
    bits = bytearray((count + 7) // 8)
    for i in indices:
        if 0 <= i < count:
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def indices(bits: bytes, count: int) -> set[int]:
    return {i for i in range(count) if bits[i >> 3] >> (i & 7) & 1}


def encode_answer(manifest: Manifest, manifest_bytes: bytes | None, signature: bytes | None,
                  have: dict[str, set[int]], pulling: bool) -> bytes:
    return msgpack.packb({
        "manifest_id": manifest.id, "manifest": manifest_bytes, "signature": signature,
        "have": {f.path: bitmap(have.get(f.path, ()), len(f.chunks)) for f in manifest.files},
        "pulling": pulling}, use_bin_type=True)


def encode_error(code: str, text: str) -> bytes:
    return msgpack.packb({"error": text[:500], "code": code}, use_bin_type=True)


@dataclass
class Answer:
    """One peer's offer: what it holds of one manifest."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    have: dict[str, set[int]]
    pulling: bool
    peer: str = ""  # set by the asker: who answered
    where: str = "LAN peer"  # what holds it, for people: a LAN peer, or a bundle (agent.bundle)


def _raise_error(message: dict) -> None:
    if "error" in message:
        text = str(message["error"])[:500]
        if message.get("code") == NOT_IN_SWARM:
            raise NotInSwarm(text)
        if message.get("code") == NOT_HELD:
            raise LookupError(text)
        if message.get("code") == PENDING:
            raise PeerPending(text)
        raise PeerBroken(f"the peer refused the request: {text}")


def parse_answer(data: bytes, known: Manifest | None = None) -> Answer:
    """Validate an offer; raises ``PeerBroken`` (malformed), ``NotInSwarm`` (refused), or
    ``LookupError`` (the peer holds nothing of it). ``known``: the manifest the asker
    already has, for an answer that does not repeat it."""
    if len(data) > MAX_ANSWER:
        raise PeerBroken(f"a swarm answer of {len(data)} bytes exceeds {MAX_ANSWER}")
    message = _unpack(data, max_len=MAX_ANSWER)
    _raise_error(message)
    try:
        raw = message.get("manifest")
        if raw is not None:
            if not isinstance(raw, bytes):
                raise ValueError("manifest is not bytes")
            manifest = decode(raw)
            if manifest.id != message["manifest_id"]:
                raise ValueError("manifest id does not match the manifest")
        elif known is not None and message["manifest_id"] == known.id:
            manifest, raw = known, known.encode()
        else:
            raise ValueError("no manifest")
        signature = message.get("signature")
        if signature is not None and (not isinstance(signature, bytes) or len(signature) > 256):
            raise ValueError("signature")
        bitmaps = message["have"]
        if not isinstance(bitmaps, dict):
            raise ValueError("have is not a map")
        have: dict[str, set[int]] = {}
        for f in manifest.files:
            bits = bitmaps.get(f.path, b"")
            if not isinstance(bits, bytes) or len(bits) not in (0, (len(f.chunks) + 7) // 8):
                raise ValueError(f"have-bitmap of {f.path[:80]!r} has the wrong length")
            have[f.path] = indices(bits, len(f.chunks)) if bits else set()
        pulling = message.get("pulling", False)
        if not isinstance(pulling, bool):
            raise ValueError("pulling")
    except (KeyError, TypeError, ValueError, ShoalError) as e:
        raise PeerBroken(f"malformed offer ({e})"[:300]) from e
    return Answer(manifest, raw, signature, have, pulling)


def _unpack(data: bytes, *, max_len: int) -> dict:
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=max_len,
                                  max_bin_len=max_len, max_array_len=1 << 16, max_map_len=1 << 17)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PeerBroken(f"undecodable swarm message ({type(e).__name__})") from e
    if not isinstance(message, dict):
        raise PeerBroken("a swarm message must be a map")
    return message

