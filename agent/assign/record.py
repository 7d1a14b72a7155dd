"""A room's assignments: what the teacher wants on every machine, as one signed record. Pure.

The record is the room's whole current list, not a change: retracting is a newer record
without the item, and a machine that was off needs only the newest record, from anyone.

    record   = canonical msgpack {"v": 1, "room": ROOM_ID, "seq": N, "issued": UNIX_S, "items": [ITEM...]}
    item     = {"ref": "OWNER/NAME@REV" (a dataset's id starts with datasets/), "kind": "model"|"dataset"|"adapter",
                "at": "HH:MM" or None (start then, local time), "by": "HH:MM" or None (wanted by then)}
    envelope = msgpack [1, record, publisher key (32 bytes), Ed25519 signature (64 bytes)]
               signed over b"shoal-assignments-v1:" + record

A member accepts a record only if (``accept``): the signature is valid and the key is one it
trusts (``swarm.trusted_publishers``: the room's teacher key, from the join code); the room
id is its own room's (derived from the swarm secret: a record for another room is refused);
and its ``seq`` is above the newest it accepted from that key (a replayed old record is
refused). The teacher's seq is the larger of its last one plus one and the time in
milliseconds, so a teacher whose cache was wiped still moves forward.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import IntegrityError, UsageError
from agent.hashing import blake3_hash
from agent.manifest import ModelRef

VERSION = 1
DOMAIN = b"shoal-assignments-v1:"
KINDS = ("model", "dataset", "adapter")
MAX_ITEMS = 64
MAX_RECORD = 16 * 1024
MAX_ENVELOPE = MAX_RECORD + 256
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


class AssignmentRefused(IntegrityError):
    """A record a member does not act on: forged, from a key it does not trust, for another
    room, or older than one it has."""


@dataclass(frozen=True)
class Item:
    ref: ModelRef
    kind: str = "model"
    at: str | None = None  # HH:MM, local time: start then
    by: str | None = None  # HH:MM: wanted by then (the room status says who is late)

    def wire(self) -> dict:
        return {"ref": str(self.ref), "kind": self.kind, "at": self.at, "by": self.by}


@dataclass(frozen=True)
class Record:
    room: str
    seq: int
    issued: int
    items: tuple[Item, ...]

    def encode(self) -> bytes:
        return msgpack.packb({"v": VERSION, "room": self.room, "seq": self.seq, "issued": self.issued,
                              "items": [i.wire() for i in self.items]}, use_bin_type=True)

    def item(self, ref: ModelRef) -> Item | None:
        return next((i for i in self.items if i.ref == ref), None)


@dataclass(frozen=True)
class Signed:
    """A record as it travels: the record, who signed it, the envelope's bytes."""

    record: Record
    publisher: str  # hex
    envelope: bytes


def room_id(swarm_secret: str) -> str:
    """The id a room's records carry: derived from its secret (every member has it; the id
    tells nothing of it)."""
    return blake3_hash(b"shoal-room-id:" + swarm_secret.encode())[:16].hex()


def check_clock(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CLOCK.fullmatch(value):
        raise UsageError(f"{what} {value!r} is not a time of day HH:MM (00:00-23:59)")
    return value


def make_item(ref: ModelRef, kind: str, at: str | None = None, by: str | None = None) -> Item:
    if kind not in KINDS:
        raise UsageError(f"an assignment is a model, a dataset or an adapter, not {kind!r}")
    if (kind == "dataset") != ref.is_dataset:
        raise UsageError(f"{ref} is {'a dataset' if ref.is_dataset else 'not a dataset'}: assign it as "
                         f"{'--dataset' if ref.is_dataset else 'a model or an adapter'}")
    if kind == "adapter" and "+lora/" not in ref.model_id:
        raise UsageError(f"{ref} is not an adapter (OWNER/NAME+lora/ADAPTER, what `shoal train` registers)")
    return Item(ref, kind, check_clock(at, "--at"), check_clock(by, "--by"))


def start_at(at: str, issued: float) -> float:
    """When an item with ``at`` (HH:MM, local time) starts: the first such moment after the
    record was issued (a push at 20:00 with --at 07:00 starts the next morning)."""
    hours, minutes = int(at[:2]), int(at[3:])
    local = time.localtime(issued)
    moment = time.mktime((local.tm_year, local.tm_mon, local.tm_mday, hours, minutes, 0, 0, 0, -1))
    return moment if moment > issued else time.mktime((local.tm_year, local.tm_mon, local.tm_mday + 1, hours,
                                                       minutes, 0, 0, 0, -1))


def next_seq(last: int, now: float | None = None) -> int:
    return max(last + 1, int((time.time() if now is None else now) * 1000))


def sign(record: Record, identity) -> bytes:
    """The envelope of ``record`` signed by ``identity`` (``agent.swarm.trust.Identity``)."""
    body = record.encode()
    if len(body) > MAX_RECORD:
        raise UsageError(f"the assignment list is {len(body)} bytes, more than {MAX_RECORD}: assign fewer")
    return msgpack.packb([VERSION, body, identity.public_key, identity.sign_bytes(DOMAIN + body)],
                         use_bin_type=True)


def decode(envelope: bytes) -> Signed:
    """Check an envelope's form and signature (not whom it is from: ``accept`` does)."""
    if not isinstance(envelope, (bytes, bytearray)) or len(envelope) > MAX_ENVELOPE:
        raise AssignmentRefused(f"an assignment envelope is at most {MAX_ENVELOPE} bytes")
    try:
        outer = msgpack.unpackb(envelope, raw=False, max_bin_len=MAX_RECORD, max_str_len=64, max_array_len=4,
                                max_map_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise AssignmentRefused(f"an assignment envelope is not valid msgpack ({type(e).__name__})") from None
    if (not isinstance(outer, list) or len(outer) != 4 or outer[0] != VERSION or not isinstance(outer[1], bytes)
            or not isinstance(outer[2], bytes) or len(outer[2]) != 32
            or not isinstance(outer[3], bytes) or len(outer[3]) != 64):
        raise AssignmentRefused("an assignment envelope is malformed")
    body, key, signature = outer[1], outer[2], outer[3]
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, DOMAIN + body)
    except (InvalidSignature, ValueError):
        raise AssignmentRefused(f"an assignment record signed as {key.hex()[:16]}… carries a forged or damaged "
                                "signature") from None
    return Signed(_decode_record(body), key.hex(), bytes(envelope))


def _decode_record(body: bytes) -> Record:
    try:
        doc = msgpack.unpackb(body, raw=False, max_str_len=512, max_array_len=MAX_ITEMS, max_map_len=8,
                              strict_map_key=True)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("not a version 1 record")
        room, seq, issued, items = doc["room"], doc["seq"], doc["issued"], doc["items"]
        if not isinstance(room, str) or not re.fullmatch(r"[0-9a-f]{32}", room):
            raise ValueError("bad room id")
        if type(seq) is not int or seq < 1 or type(issued) is not int or not isinstance(items, list):
            raise ValueError("bad seq, time or items")
        parsed = []
        for raw in items:
            if not isinstance(raw, dict):
                raise ValueError("an item is not a map")
            ref = ModelRef.parse(raw["ref"]) if isinstance(raw.get("ref"), str) else None
            if ref is None:
                raise ValueError("an item has no ref")
            parsed.append(make_item(ref, raw.get("kind"), raw.get("at"), raw.get("by")))
        if len({i.ref for i in parsed}) != len(parsed):
            raise ValueError("an item is listed twice")
    except (KeyError, TypeError, ValueError, UsageError) as e:
        raise AssignmentRefused(f"an assignment record is malformed: {e}") from None
    except Exception as e:  # msgpack's own errors
        raise AssignmentRefused(f"an assignment record is not valid msgpack ({type(e).__name__})") from None
    return Record(room, seq, issued, tuple(parsed))


def accept(envelope: bytes, *, room: str, trusted: frozenset[str], newest: dict[str, int]) -> Signed:
    """The record in ``envelope`` if this member acts on it (see module docstring), else
    ``AssignmentRefused`` saying why. ``newest``: publisher → highest seq accepted from it."""
    signed = decode(envelope)
    if signed.publisher not in trusted:
        raise AssignmentRefused(f"an assignment record signed by {signed.publisher[:16]}…, a key this machine does "
                                "not trust (the room's teacher key comes with the join code)")
    if signed.record.room != room:
        raise AssignmentRefused(f"an assignment record for another room ({signed.record.room[:8]}…, this is "
                                f"{room[:8]}…)")
    if signed.record.seq <= newest.get(signed.publisher, 0):
        raise AssignmentRefused(f"an assignment record older than the one held (#{signed.record.seq} ≤ "
                                f"#{newest[signed.publisher]}): a replay, or out of date")
    return signed
