"""The pushed HAVE stream between swarm peers, as pure functions: encode, decode, validate,
apply. No I/O here, so every path a hostile peer can reach is testable with hypothesis.

A pulling agent *subscribes* to each peer that holds or pulls the same manifest: one TCP
connection to the peer's data port (``agent.swarm.datapath``, hello mode ``"sub"``), on
which the peer pushes what changes, as it changes, coalesced, instead of being asked every
second. Chunks are named by their **ordinal** in the manifest (files in manifest order,
chunks in file order), so a HAVE is one small integer.

Frames: ``u32 length`` + a msgpack map, at most ``MAX_FRAME`` bytes::

    {"t": "snap",  "seq": n, "have": bitmap, "origin": bitmap, "claims": [ordinal...],
     "pulling": bool}                      the whole state (first frame, or after a gap)
    {"t": "delta", "seq": n, "have": [...], "origin": [...], "claim": [...],
     "unclaim": [...], "pulling": bool}    what changed since the frame before
    {"t": "beat",  "seq": n}               nothing changed (a liveness heartbeat)

- ``have``: chunks the peer holds, verified (a delta leaves out those the subscriber
  holds already, as the subscriber's own stream told the peer: nobody needs to hear of a
  chunk it has); ``origin``: those it fetched from the origin itself (always told, so a
  room can count origin bytes paid twice);
- ``claims``: chunks the peer is fetching from the origin right now. Nobody else fetches a
  claimed chunk from the origin while the claimer is alive (``agent.swarm.picker``);
- ``pulling``: whether the peer is pulling this manifest (it shares the origin's work).

``seq`` grows by one per frame; a frame whose ``seq`` is not above the last one applied is
a duplicate and is ignored (``PeerState.apply``). Applying is idempotent set arithmetic,
so a duplicate or replayed delta changes nothing. Anything malformed raises ``PeerBroken``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import msgpack

from agent.errors import PeerBroken
from agent.manifest import Manifest

MAX_FRAME = 256 * 1024  # a snapshot of 1 TiB in 4 MiB chunks is a 32 KiB bitmap
MAX_LIST = 65536  # ordinals in one list of a delta
FRAME_HEADER = struct.Struct(">I")
SNAP, DELTA, BEAT = "snap", "delta", "beat"


# ------------------------------------------------------------------------------ ordinals

class Ordinals:
    """Chunk ordinals of one manifest: (path, index) <-> one integer."""

    def __init__(self, manifest: Manifest):
        self.starts: dict[str, int] = {}
        self.spans: list[tuple[int, str]] = []  # (first ordinal, path), ascending
        total = 0
        for f in manifest.files:
            self.starts[f.path] = total
            self.spans.append((total, f.path))
            total += len(f.chunks)
        self.total = total

    def of(self, path: str, index: int) -> int:
        return self.starts[path] + index

    def find(self, path: str, index: int) -> int | None:
        """``of``, or None for a chunk this manifest does not have."""
        start = self.starts.get(path)
        if start is None or index < 0:
            return None
        end = next((s for s, _ in self.spans if s > start), self.total)
        return start + index if start + index < end else None

    def key(self, ordinal: int) -> tuple[str, int]:
        lo, hi = 0, len(self.spans) - 1
        while lo < hi:  # the last span starting at or before ``ordinal``
            mid = (lo + hi + 1) // 2
            if self.spans[mid][0] <= ordinal:
                lo = mid
            else:
                hi = mid - 1
        start, path = self.spans[lo]
        return path, ordinal - start


def bitmap(ordinals, total: int) -> bytes:
    bits = bytearray((total + 7) // 8)
    for i in ordinals:
        if 0 <= i < total:
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def from_bitmap(bits: bytes, total: int) -> set[int]:
    return {i for i in range(total) if bits[i >> 3] >> (i & 7) & 1}


# -------------------------------------------------------------------------------- frames

@dataclass(frozen=True)
class Message:
    kind: str
    seq: int
    have: frozenset[int] = frozenset()
    origin: frozenset[int] = frozenset()
    claim: frozenset[int] = frozenset()
    unclaim: frozenset[int] = frozenset()
    pulling: bool | None = None


def frame(payload: dict) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a HAVE frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return FRAME_HEADER.pack(len(body)) + body


def encode_snapshot(seq: int, have, origin, claims, pulling: bool, total: int) -> bytes:
    return frame({"t": SNAP, "seq": seq, "have": bitmap(have, total), "origin": bitmap(origin, total),
                  "claims": sorted(claims)[:MAX_LIST], "pulling": pulling})


def encode_delta(seq: int, *, have=(), origin=(), claim=(), unclaim=(), pulling: bool | None = None) -> bytes:
    payload = {"t": DELTA, "seq": seq, "have": sorted(have), "origin": sorted(origin), "claim": sorted(claim),
               "unclaim": sorted(unclaim)}
    if pulling is not None:
        payload["pulling"] = pulling
    return frame(payload)


def encode_beat(seq: int) -> bytes:
    return frame({"t": BEAT, "seq": seq})


def frame_length(header: bytes) -> int:
    """The body length a frame header announces; ``PeerBroken`` past ``MAX_FRAME``."""
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME:
        raise PeerBroken(f"a HAVE frame of {length} bytes exceeds {MAX_FRAME}")
    return length


def _ordinals(value: object, total: int, what: str) -> frozenset[int]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise PeerBroken(f"{what} must be a list of at most {MAX_LIST} chunk numbers")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < total:
            raise PeerBroken(f"{what} names chunk {item!r}, outside 0..{total - 1}")
    return frozenset(value)


def _bits(value: object, total: int, what: str) -> frozenset[int]:
    if not isinstance(value, bytes) or len(value) != (total + 7) // 8:
        raise PeerBroken(f"{what} must be a bitmap of {(total + 7) // 8} bytes")
    return frozenset(from_bitmap(value, total))


def decode(body: bytes, total: int) -> Message:
    """Validate one frame's body for a manifest of ``total`` chunks; raises ``PeerBroken``."""
    if len(body) > MAX_FRAME:
        raise PeerBroken(f"a HAVE frame of {len(body)} bytes exceeds {MAX_FRAME}")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, max_str_len=16, max_bin_len=MAX_FRAME,
                                  max_array_len=MAX_LIST, max_map_len=16, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PeerBroken(f"undecodable HAVE frame ({type(e).__name__})") from e
    if not isinstance(payload, dict):
        raise PeerBroken("a HAVE frame must be a map")
    kind, seq = payload.get("t"), payload.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 62:
        raise PeerBroken("a HAVE frame needs a sequence number")
    if kind == BEAT:
        return Message(BEAT, seq)
    pulling = payload.get("pulling")
    if pulling is not None and not isinstance(pulling, bool):
        raise PeerBroken("'pulling' must be true or false")
    if kind == SNAP:
        have = _bits(payload.get("have"), total, "have")
        return Message(SNAP, seq, have=have, origin=_bits(payload.get("origin"), total, "origin") & have,
                       claim=_ordinals(payload.get("claims"), total, "claims"), pulling=bool(pulling))
    if kind == DELTA:
        return Message(DELTA, seq, have=_ordinals(payload.get("have", []), total, "have"),
                       origin=_ordinals(payload.get("origin", []), total, "origin"),
                       claim=_ordinals(payload.get("claim", []), total, "claim"),
                       unclaim=_ordinals(payload.get("unclaim", []), total, "unclaim"), pulling=pulling)
    raise PeerBroken(f"unknown HAVE frame kind {str(kind)[:20]!r}")


# ------------------------------------------------------------------------------ applying

@dataclass
class PeerState:
    """What one peer has told us about one manifest, frame by frame."""

    have: set[int] = field(default_factory=set)
    origin: set[int] = field(default_factory=set)
    claims: set[int] = field(default_factory=set)
    pulling: bool = False
    seq: int = -1

    def apply(self, message: Message) -> bool:
        """Apply a frame; False when it is stale (a duplicate or out of order: ignored)."""
        if message.seq <= self.seq:
            return False
        self.seq = message.seq
        if message.kind == SNAP:
            self.have, self.origin = set(message.have), set(message.origin)
            self.claims = set(message.claim) - self.have
            self.pulling = bool(message.pulling)
        elif message.kind == DELTA:
            self.have |= message.have
            self.origin |= message.origin & self.have
            self.claims |= message.claim
            self.claims -= message.unclaim | self.have
            if message.pulling is not None:
                self.pulling = message.pulling
        return True
